"""The base of the linear ops (``rf.linear_logprobs``, ``rf.linear_full_kl``, ``rf.linear_ppo_loss``):
checking a hidden / lm_head / bias triple, a chunk's float32 logits (``logits = hidden @ weight.T + bias``,
by chunks of rows) and the gradient accumulation of the chunked PyTorch implementations: given a chunk's
``dL/dlogits`` (float32 ``[rows, V]``), ``d_hidden[rows] = g @ weight``, ``d_weight += g.T @ hidden[rows]``
and ``d_bias += sum_rows g``, with the weight and bias gradients accumulated in float32 and cast to their
dtypes once at the end."""

import torch

from . import _amp, _checks


def _mm_out_float32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the forward multiplies bf16/fp16 operands as they are, into float32 logits (CUDA's
    ``torch.mm(..., out_dtype=torch.float32)``: tensor cores, float32 accumulation and output). On CPU
    PyTorch has no such product (``mm.dtype`` is CUDA-only), so the operands are upcast instead: the
    products of bf16/fp16 numbers are exact in float32, so that computes the same float32 logits."""
    return device.type == "cuda" and dtype != torch.float32


def _chunk_logits(h, w, b32, out: torch.Tensor | None = None) -> torch.Tensor:
    """``h @ w.T + b`` for one chunk of rows, float32 (the temperature is applied by the chunk bodies, fused
    with their other elementwise work); into ``out`` when given, else a new tensor.

    ``h`` and ``w`` are both float32, or both bf16/fp16 on CUDA (then multiplied with a float32 output).
    """
    if h.dtype != torch.float32:
        z = torch.mm(h, w.t(), out_dtype=torch.float32)
        z = z if out is None else out.copy_(z)
        return z if b32 is None else z.add_(b32)
    if out is None:
        return torch.addmm(b32, h, w.t()) if b32 is not None else h @ w.t()
    return torch.addmm(b32, h, w.t(), out=out) if b32 is not None else torch.mm(h, w.t(), out=out)


def matmul_operands(hidden, weight, bias):
    """``(native, w, b32)`` of one hidden/lm_head pair for :func:`chunk_logits`: native bf16/fp16 operands
    with a float32 product on CUDA, float32 operands otherwise (as ``rf.linear_logprobs``' forward)."""
    native = _mm_out_float32(hidden.device, hidden.dtype)
    return native, (weight if native else weight.float()), (None if bias is None else bias.float())


def chunk_logits(hidden, rows: slice, native: bool, w, b32, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 logits ``[rows, V]`` of ``hidden[rows]`` with the operands of :func:`matmul_operands`
    (into ``out``, a reused chunk buffer, when given)."""
    h = hidden[rows] if native else hidden[rows].float()
    return _chunk_logits(h, w, b32, out=None if out is None else out[: h.shape[0]])


MATMUL_DTYPES = (None, torch.float32)


def check_matmul_dtype(matmul_dtype):
    """``matmul_dtype`` of the linear ops: ``None`` (the lm_head matmul follows autocast) or ``torch.float32``."""
    if not any(matmul_dtype is d for d in MATMUL_DTYPES):
        raise ValueError(f"matmul_dtype must be None (follow autocast) or torch.float32, got {matmul_dtype!r}")
    return matmul_dtype


def check_linear_operands(hidden, weight, bias, names=("hidden", "weight", "bias"), matmul_dtype=None):
    """Validate ``hidden [..., H]``, ``weight [V, H]``, ``bias [V] | None`` (``ValueError`` naming the
    argument) and return them cast to the autocast dtype where autocast is on (as ``F.linear`` casts its
    operands, rlhf_fast/_amp.py), or to float32 with ``matmul_dtype=torch.float32`` (the lm_head matmul in
    float32 whatever autocast says or the inputs' dtype; differentiable casts: gradients in each input's
    dtype)."""
    h_name, w_name, b_name = names
    _checks.check_float_tensor(hidden, h_name, min_dim=1)
    _checks.check_float_tensor(weight, w_name, min_dim=2)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{w_name} must have shape [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None:
        _checks.check_float_tensor(bias, b_name)
    if check_matmul_dtype(matmul_dtype) is torch.float32:
        hidden, weight, bias = (None if t is None else t.to(torch.float32) for t in (hidden, weight, bias))
    else:
        hidden, weight, bias = _amp.cast_matmul_operands(hidden.device, hidden, weight, bias)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{w_name} must have the dtype of {h_name} ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[0] == 0:
        raise ValueError(f"{w_name} must have at least one row (a non-empty vocabulary)")
    if bias is not None:
        _checks.check_shape(b_name, bias, (weight.shape[0],), f"one entry per vocabulary row of {w_name}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"{b_name} must have the dtype of {h_name} ({hidden.dtype}), got {bias.dtype}")
        _checks.check_same_device(b_name, bias, h_name, hidden)
    _checks.check_same_device(w_name, weight, h_name, hidden)
    return hidden, weight, bias


class LinearGrads:
    def __init__(self, hidden, weight, bias, need_hidden: bool, need_weight: bool, need_bias: bool):
        self.weight_dtype = weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype
        self.d_hidden = torch.empty_like(hidden) if need_hidden else None
        self.d_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        self.d_b32 = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None

    def add(self, rows: slice, g: torch.Tensor, h32: torch.Tensor, w32: torch.Tensor, scale: float | None = None):
        """Accumulate a chunk's ``g = dL/dlogits`` (``h32``: its float32 hidden rows, ``w32``: the float32
        weight); ``scale`` multiplies ``g`` first (in place) when given."""
        if scale is not None:
            g = g.mul_(scale)
        if self.d_hidden is not None:
            if self.d_hidden.dtype == torch.float32:  # straight into the gradient: no [rows, H] temporary
                torch.mm(g, w32, out=self.d_hidden[rows])
            else:
                self.d_hidden[rows] = g @ w32
        if self.d_w32 is not None:
            self.d_w32.addmm_(g.t(), h32)
        if self.d_b32 is not None:
            self.d_b32 += g.sum(0)

    def float32_result(self):
        """``(d_hidden, d_weight, d_bias)`` with the weight and bias gradients still float32."""
        return self.d_hidden, self.d_w32, self.d_b32

    def result(self):
        """``(d_hidden, d_weight, d_bias)`` in the inputs' dtypes (``None`` where not needed)."""
        d_weight = None if self.d_w32 is None else self.d_w32.to(self.weight_dtype)
        d_bias = None if self.d_b32 is None else self.d_b32.to(self.bias_dtype)
        return self.d_hidden, d_weight, d_bias
