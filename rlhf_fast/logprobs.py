"""``rf.logprobs``: per-token log-probs and entropy of ``softmax(logits / temperature)``.

Two implementations behind one autograd contract (gradients through both outputs):

- ``triton``: one kernel pass over each row forward (running max, log-sum-exp, entropy), one pass
  backward writing ``dlogits``; saves only three floats per row (max, log-normalizer, entropy).
- ``torch``: the same algorithm chunked over rows, so that the float32 temporaries are
  ``O(chunk * V)`` instead of the several ``[N, V]`` float32 tensors of the eager composition.

Both can write the gradient over the logits buffer (``inplace_backward=True``), saving one ``[N, V]``
buffer when the caller no longer needs the logits.
"""

import math
from dataclasses import dataclass

import torch

from . import _checks
from ._dispatch import dispatch, register
from ._rowsoftmax import softmax_grad_, softmax_stats_

# Rows per chunk of the PyTorch implementation: about 2M elements, so each float32 temporary is 8 MiB
# (three live at a time), small next to any [N, V] tensor worth chunking and big enough that per-chunk
# overhead is negligible (measured on a 2-core CPU at V = 50000: see benchmarks/results/cpu).
_TORCH_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class LogprobsOptions:
    temperature: float = 1.0
    ignore_index: int = -100
    inplace_backward: bool = False


def _as_btv(logits: torch.Tensor) -> torch.Tensor:
    """A ``[B, T, V]`` view of ``[..., V]`` logits with a contiguous last dimension (a copy only if needed).

    Two free leading strides cover the usual ``logits[:, :-1, :]`` slice without a copy.
    """
    V = logits.shape[-1]
    if logits.dim() == 1:
        x = logits.reshape(1, 1, V)
    elif logits.dim() == 2:
        x = logits.unsqueeze(0)
    else:
        x = logits.reshape(math.prod(logits.shape[:-2]), logits.shape[-2], V)
    return x if x.stride(-1) == 1 else x.contiguous()


def _grad_or_zeros(grad: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if grad is None:
        return torch.zeros(n, dtype=torch.float32, device=device)
    return grad.reshape(-1).to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------- triton


class _LogprobsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, opts: LogprobsOptions):
        from .kernels.logprobs import logprobs_forward

        x = _as_btv(logits)
        flat_labels = labels.reshape(-1).contiguous()
        logp, entropy, row_max, log_norm = logprobs_forward(x, flat_labels, opts.temperature, opts.ignore_index)
        ctx.save_for_backward(x, flat_labels, row_max, log_norm, entropy)
        ctx.opts = opts
        ctx.logits_shape = logits.shape
        ctx.set_materialize_grads(False)
        return logp.view(labels.shape), entropy.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        from .kernels.logprobs import logprobs_backward

        x, labels, row_max, log_norm, entropy = ctx.saved_tensors
        opts = ctx.opts
        n = labels.numel()
        grad = logprobs_backward(
            x,
            labels,
            row_max,
            log_norm,
            entropy,
            _grad_or_zeros(grad_logp, n, x.device),
            _grad_or_zeros(grad_entropy, n, x.device),
            opts.temperature,
            opts.ignore_index,
            grad_logits=x if opts.inplace_backward else None,
        )
        return grad.reshape(ctx.logits_shape), None, None


@register("logprobs", "triton")
def _logprobs_triton(logits, labels, opts):
    return _LogprobsTriton.apply(logits, labels, opts)


# ----------------------------------------------------------------------------------------------- torch


def _row_chunks(x: torch.Tensor, rows: int):
    """Yield ``(row_offset, [n, V] view)`` over the ``B*T`` rows of a ``[B, T, V]`` tensor, ``n <= rows``."""
    B, T, V = x.shape
    try:
        flat = x.view(B * T, V)
    except RuntimeError:  # a strided slice such as logits[:, :-1]: chunk inside each of the B blocks
        for b in range(B):
            for t in range(0, T, rows):
                yield b * T + t, x[b, t : t + rows]
        return
    for r in range(0, B * T, rows):
        yield r, flat[r : r + rows]


def _scaled_float_copy(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """``chunk / temperature`` as a new float32 tensor (``.float()`` alone would alias float32 input)."""
    z = chunk.to(torch.float32, copy=True)
    return z if temperature == 1.0 else z.div_(temperature)


def _chunk_rows(V: int) -> int:
    return max(1, _TORCH_CHUNK_ELEMENTS // V)


class _LogprobsTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, opts: LogprobsOptions):
        x = _as_btv(logits)
        flat_labels = labels.reshape(-1)
        ignored = flat_labels == opts.ignore_index
        safe_labels = flat_labels.masked_fill(ignored, 0)
        n = flat_labels.numel()
        logp = torch.empty(n, dtype=torch.float32, device=x.device)
        entropy = torch.empty_like(logp)
        row_max = torch.empty_like(logp)
        log_norm = torch.empty_like(logp)
        for r, chunk in _row_chunks(x, _chunk_rows(x.shape[-1])):
            rows = slice(r, r + chunk.shape[0])
            z = _scaled_float_copy(chunk, opts.temperature)
            logp[rows], entropy[rows], row_max[rows], log_norm[rows] = softmax_stats_(z, safe_labels[rows])
        logp.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(x, safe_labels, ignored, row_max, log_norm, entropy)
        ctx.opts = opts
        ctx.logits_shape = logits.shape
        ctx.set_materialize_grads(False)
        return logp.view(labels.shape), entropy.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        x, safe_labels, ignored, row_max, log_norm, entropy = ctx.saved_tensors
        opts = ctx.opts
        n = safe_labels.numel()
        g_logp = _grad_or_zeros(grad_logp, n, x.device).masked_fill(ignored, 0.0)
        g_entropy = _grad_or_zeros(grad_entropy, n, x.device)
        B, T, V = x.shape
        out = x if opts.inplace_backward else torch.empty((B * T, V), dtype=x.dtype, device=x.device)
        for r, chunk in _row_chunks(x, _chunk_rows(V)):
            rows = slice(r, r + chunk.shape[0])
            z = _scaled_float_copy(chunk, opts.temperature)
            g = softmax_grad_(z, row_max[rows], log_norm[rows], entropy[rows], g_logp[rows], g_entropy[rows],
                              safe_labels[rows], opts.temperature)  # fmt: skip
            (chunk if opts.inplace_backward else out[rows]).copy_(g)
        return out.reshape(ctx.logits_shape), None, None


@register("logprobs", "torch")
def _logprobs_torch(logits, labels, opts):
    return _LogprobsTorch.apply(logits, labels, opts)


# ---------------------------------------------------------------------------------------------- public


def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
    inplace_backward: bool = False,
):
    """Per-token log-probs ``log_softmax(logits / temperature)[labels]`` and, optionally, the entropy.

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16, any strides.
        labels: ``[...]`` integer token ids in ``[0, V)``, or ``ignore_index``.
        temperature: positive divisor of the logits (the sampling temperature).
        ignore_index: label value whose log-prob is reported as 0 (and gets no gradient through it).
        return_entropy: also return ``entropy[...] = -sum_v p_v log p_v`` of ``softmax(logits / T)``,
            for every position (ignored ones too: it does not depend on the label).
        impl: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``.
        inplace_backward: write the gradient over the ``logits`` buffer (saves one ``[N, V]`` tensor).
            Only when nothing else reads these logits after the forward: they are overwritten.

    Returns:
        float32 ``logp`` of shape ``[...]``, or ``(logp, entropy)`` with ``return_entropy=True``.
        Both are differentiable with respect to ``logits``; the gradient has the logits' dtype.

    Vocabulary entries equal to ``-inf`` have probability 0 and add nothing to the entropy. A row whose
    entries are all ``-inf`` is no distribution: its outputs are NaN (or ``-inf``), as in PyTorch.
    """
    _checks.check_float_tensor(logits, "logits", min_dim=1)
    _checks.check_int_tensor(labels, "labels")
    _checks.check_shape("labels", labels, logits.shape[:-1], "the leading dimensions of logits")
    _checks.check_same_device("labels", labels, "logits", logits)
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    opts = LogprobsOptions(
        temperature=_checks.check_positive("temperature", temperature),
        ignore_index=_checks.check_int("ignore_index", ignore_index),
        inplace_backward=bool(inplace_backward),
    )
    fn = dispatch("logprobs", impl, logits.device)
    _checks.check_labels_in_range(labels, V, opts.ignore_index)
    logp, entropy = fn(logits, labels, opts)
    return (logp, entropy) if return_entropy else logp
