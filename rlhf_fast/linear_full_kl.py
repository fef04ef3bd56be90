"""``rf.linear_full_kl``: the exact per-position ``KL(pi || pi_ref)`` over the vocabulary from two hidden-state
/ lm_head pairs, without building either ``[N, V]`` logits tensor.

``pi = softmax((hidden @ weight.T + bias) / T)``, ``pi_ref = softmax((ref_hidden @ ref_weight.T + ref_bias) / T)``;
the gradient flows to ``hidden``, ``weight`` and ``bias`` (the reference side is a constant).

Both implementations stream chunks of rows: per chunk, the two logits chunks ``[rows, V]`` (float32) come from
one matmul each, ``rf.full_kl``'s implementation (``impl``: its Triton kernels, or its chunked PyTorch
twin) turns them into the chunk's KL and softmax statistics, and the chunk's logits are dropped. Backward
recomputes both chunks, gets ``dKL/dlogits`` from ``rf.full_kl``'s backward, and multiplies it into
``d_hidden[rows]``, ``d_weight`` and ``d_bias``. So forward is two matmul passes (policy and reference) and
backward four (the two recomputations and the two gradient products); extra memory is
``O(N + chunk * V)`` (plus a float32 copy of a bf16/fp16 weight and the float32 weight-gradient
accumulator, as in ``rf.linear_logprobs``). With ``impl="triton"`` the matmuls are cuBLAS (torch) calls
and the per-chunk softmax work runs in ``kernels/kl.py``; a single fused kernel over vocabulary tiles is
future work.
"""

from dataclasses import dataclass

import torch

from . import _amp, _checks, _vocab_parallel
from ._dispatch import resolve
from ._fused_chunk import chunk_rows
from ._linear_common import LinearGrads, check_linear_operands, chunk_logits, matmul_operands
from .full_kl import _backend as _full_kl_backend
from ._softmax_torch import grad_or_zeros

# float32 [rows, V] temporaries a chunk holds at once: both logits chunks and dlogits, plus the full_kl
# implementation's own scratch (bounded by its own chunking)
_CHUNK_TEMPORARIES = 4


@dataclass(frozen=True)
class LinearFullKLOptions:
    temperature: float = 1.0


def _chunk(hidden, rows, native, w, b32):
    return chunk_logits(hidden, rows, native, w, b32).unsqueeze(0)  # [1, rows, V]: rf.full_kl's backends' layout


def _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature: float, impl: str):
    N, V = hidden.shape[0], weight.shape[0]
    kl_forward, _ = _full_kl_backend(impl)
    pol = matmul_operands(hidden, weight, bias)
    ref = matmul_operands(ref_hidden, ref_weight, ref_bias)
    kl = torch.empty(N, dtype=torch.float32, device=hidden.device)
    stats = torch.empty((4, N), dtype=torch.float32, device=hidden.device)
    step = chunk_rows(V, _CHUNK_TEMPORARIES)
    for r in range(0, N, step):
        rows = slice(r, r + step)
        kl[rows], stats[:, rows] = kl_forward(_chunk(hidden, rows, *pol), _chunk(ref_hidden, rows, *ref), temperature)
    return kl, stats


def _backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl, stats, grad_kl, temperature: float,
              impl: str, need_hidden: bool, need_weight: bool, need_bias: bool):  # fmt: skip
    N, V = hidden.shape[0], weight.shape[0]
    _, kl_backward = _full_kl_backend(impl)
    w32 = weight.float()
    b32 = None if bias is None else bias.float()
    ref = matmul_operands(ref_hidden, ref_weight, ref_bias)
    grads = LinearGrads(hidden, weight, bias, need_hidden, need_weight, need_bias)
    step = chunk_rows(V, _CHUNK_TEMPORARIES)
    for r in range(0, N, step):
        rows = slice(r, r + step)
        h32 = hidden[rows].float()
        z = _chunk(hidden, rows, False, w32, b32)
        g = kl_backward(z, _chunk(ref_hidden, rows, *ref), kl[rows], stats[:, rows].contiguous(), grad_kl[rows],
                        temperature)[0]  # fmt: skip
        grads.add(rows, g, h32, w32)
    return grads.result()


class _LinearFullKL(torch.autograd.Function):
    @staticmethod
    @_amp.float32_op
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts: LinearFullKLOptions, impl: str):
        kl, stats = _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts.temperature, impl)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl, stats)
        ctx.opts, ctx.impl = opts, impl
        ctx.set_materialize_grads(False)
        return kl

    @staticmethod
    @_amp.float32_op
    def backward(ctx, grad_kl):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl, stats = ctx.saved_tensors
        if grad_kl is None:
            return (None,) * 8
        d_hidden, d_weight, d_bias = _backward(
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl, stats,
            grad_or_zeros(grad_kl, kl.numel(), hidden.device), ctx.opts.temperature, ctx.impl,
            *ctx.needs_input_grad[:3],
        )  # fmt: skip
        return d_hidden, d_weight, d_bias, None, None, None, None, None


def linear_full_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    impl: str = "auto",
    process_group: "torch.distributed.ProcessGroup | None" = None,
) -> torch.Tensor:
    """``rf.full_kl(hidden @ weight.T + bias, ref_hidden @ ref_weight.T + ref_bias)`` without either logits tensor.

    Args:
        hidden: ``[..., H]`` last hidden states of the policy (float32, bfloat16 or float16).
        weight: ``[V, H]`` the policy's lm_head, ``hidden``'s dtype; ``bias``: optional ``[V]``.
        ref_hidden: ``[..., H_ref]`` the reference model's hidden states at the same positions (same leading
            shape); ``ref_weight`` ``[V, H_ref]`` (same ``V``), ``ref_bias`` optional ``[V]``, in
            ``ref_hidden``'s dtype (which may differ from the policy's). Constants: no gradient.
        temperature: positive divisor of both logits.
        impl: ``"auto"`` | ``"triton"`` | ``"torch"`` (see the module docstring).
        process_group: tensor parallelism (``None``: none). ``weight``/``bias`` and ``ref_weight``/``ref_bias``
            hold this rank's contiguous slice of the vocabulary's rows (the same slice), slices in rank
            order; ``hidden`` and ``ref_hidden`` are the same on every rank. Every rank returns the KL over
            the whole vocabulary; ``weight``/``bias`` get their slice's gradient, ``hidden`` the full one,
            all-reduced (SUM) in backward (rlhf_fast/_vocab_parallel.py).

    Returns float32 ``KL(pi || pi_ref)`` ``[...]`` per position, differentiable in ``hidden``, ``weight`` and
    ``bias`` (gradients in their dtypes). Under autocast both sides' matmul operands take the autocast
    dtype as ``F.linear``'s do; the logits and the KL stay float32.

    No ``skip_ignored`` (unlike the other linear ops): this op takes no labels, so it cannot tell which rows
    are prompt or padding. To compute the KL of response rows only, select them before the call
    (``hidden[mask]``, ``ref_hidden[mask]``), which is exactly what ``skip_ignored`` does inside the others.

    Not batch invariant (README "Batch invariance"): its chunk matmuls are not padded, and a one-row product
    rounds unlike the same row of a bigger one (MKL on CPU; cuBLAS picks kernels by the row count).
    """
    hidden, weight, bias = check_linear_operands(hidden, weight, bias)
    ref_hidden, ref_weight, ref_bias = check_linear_operands(ref_hidden, ref_weight, ref_bias,
                                                   ("ref_hidden", "ref_weight", "ref_bias"))  # fmt: skip
    _checks.check_same_device("ref_hidden", ref_hidden, "hidden", hidden)
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ref_hidden must have the leading shape of hidden {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(ref_hidden.shape[:-1])}")  # fmt: skip
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have weight's vocabulary size V={weight.shape[0]}, got {ref_weight.shape[0]}")
    opts = LinearFullKLOptions(temperature=_checks.check_positive("temperature", temperature))
    impl = resolve(impl, hidden.device)
    lead = hidden.shape[:-1]
    N = hidden[..., 0].numel()
    detach = [None if t is None else t.detach() for t in (ref_hidden, ref_weight, ref_bias)]
    args = (hidden.reshape(N, hidden.shape[-1]), weight, bias, detach[0].reshape(N, ref_hidden.shape[-1]), *detach[1:])
    with _amp.no_autocast():
        if process_group is None:
            kl = _LinearFullKL.apply(*args, opts, impl)
        else:
            _vocab_parallel.check_group(process_group)
            o = _vocab_parallel.FullKLShardOptions(process_group, impl, _forward, _backward, linear=True,
                                                   temperature=opts.temperature)  # fmt: skip
            kl = _vocab_parallel.full_kl(o, *args)
    return kl.view(lead)
