"""``rf.full_kl``: the exact ``KL(pi || pi_ref)`` over the vocabulary at every position.

``sum_v p_v (log p_v - log q_v)`` with ``p = softmax(logits / T)`` and ``q = softmax(ref_logits / T)``.
Unlike the sampled estimators of ``rf.kl_penalty`` (k1/k2/k3 on the log-prob of the sampled token), it
has no variance; in a loss it optimises the reverse-KL objective ``E[r] - beta KL(pi || pi_ref)`` whose
optimum is ``pi_ref exp(r / beta) / Z``. The gradient flows to ``logits`` only.

- ``triton``: one pass over both rows forward, one backward (kernels/full_kl.py).
- ``torch``: the same formulas chunked over rows, ``O(chunk * V)`` float32 temporaries.
"""

from dataclasses import dataclass

import torch

from . import _amp, _checks, _vocab_parallel
from ._dispatch import resolve
from ._fused_chunk import pad_rows
from ._softmax_torch import as_btv, grad_or_zeros, row_chunks, scaled_float_copy

# ~2M elements per chunk and per input (8 MiB float32 temporaries), as rf.logprobs.
_TORCH_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class FullKLOptions:
    temperature: float = 1.0


def _log_softmax_parts(z: torch.Tensor):
    """``log softmax(z)`` in place of ``z`` as ``(z - m) - log sum e^(z - m)``, and ``(m, log s)``."""
    m = z.amax(dim=-1, keepdim=True)
    m.masked_fill_(m == -float("inf"), 0.0)
    d = z.sub_(m)
    log_s = torch.exp(d).sum(-1, keepdim=True).log_()
    return d.sub_(log_s), m, log_s


def _torch_forward(x, ref, temperature: float):
    """``(kl, stats)`` of ``[B, T, V]`` logits and reference logits: the twin of ``full_kl_forward``."""
    B, T, V = x.shape
    kl = torch.empty(B * T, dtype=torch.float32, device=x.device)
    stats = torch.empty((4, B * T), dtype=torch.float32, device=x.device)
    for r, (cx, cr) in row_chunks([x, ref], max(1, _TORCH_CHUNK_ELEMENTS // V)):
        n = cx.shape[0]
        rows = slice(r, r + n)
        # a single row is reduced with a zero one, as in rf.logprobs: alone, its sums would be split over the
        # threads and round differently from the same row in a bigger chunk (README "Batch invariance")
        log_p, m_p, log_sp = _log_softmax_parts(pad_rows(scaled_float_copy(cx, temperature), 2))
        log_q, m_q, log_sq = _log_softmax_parts(pad_rows(scaled_float_copy(cr, temperature), 2))
        terms = log_p.exp().mul_(log_p.sub(log_q))
        terms.masked_fill_(log_p == -float("inf"), 0.0)  # p_v = 0 adds nothing, whatever q_v is
        kl[rows] = terms.sum(-1)[:n]
        for i, v in enumerate((m_p, log_sp, m_q, log_sq)):
            stats[i, rows] = v.squeeze(-1)[:n]
    return kl, stats


def _torch_backward(x, ref, kl, stats, grad_kl, temperature: float) -> torch.Tensor:
    """``dKL/dx = p (log p - log q - KL) / T`` chunk by chunk: the twin of ``full_kl_backward``."""
    B, T, V = x.shape
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for r, (cx, cr, cg) in row_chunks([x, ref, grad], max(1, _TORCH_CHUNK_ELEMENTS // V)):
        rows = slice(r, r + cx.shape[0])
        log_p = scaled_float_copy(cx, temperature).sub_(stats[0, rows, None]).sub_(stats[1, rows, None])
        log_q = scaled_float_copy(cr, temperature).sub_(stats[2, rows, None]).sub_(stats[3, rows, None])
        g = log_p.exp().mul_(log_p - log_q - kl[rows, None]).mul_(grad_kl[rows, None] / temperature)
        cg.copy_(g.masked_fill_(log_p == -float("inf"), 0.0))
    return grad


def _backend(impl: str):
    if impl == "triton":
        from .kernels.full_kl import full_kl_backward, full_kl_forward

        return full_kl_forward, full_kl_backward
    return _torch_forward, _torch_backward


class _FullKL(torch.autograd.Function):
    @staticmethod
    @_amp.float32_op
    def forward(ctx, logits, ref_logits, opts: FullKLOptions, impl: str):
        x, ref = as_btv(logits), as_btv(ref_logits)
        forward, _ = _backend(impl)
        kl, stats = forward(x, ref, opts.temperature)
        ctx.save_for_backward(x, ref, kl, stats)
        ctx.opts, ctx.impl, ctx.logits_shape = opts, impl, logits.shape
        return kl.view(logits.shape[:-1])

    @staticmethod
    @_amp.float32_op
    def backward(ctx, grad_kl):
        x, ref, kl, stats = ctx.saved_tensors
        _, backward = _backend(ctx.impl)
        grad = backward(x, ref, kl, stats, grad_or_zeros(grad_kl, kl.numel(), x.device), ctx.opts.temperature)
        return grad.reshape(ctx.logits_shape), None, None, None


@_amp.float32_op
def full_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    impl: str = "auto",
    process_group: "torch.distributed.ProcessGroup | None" = None,
) -> torch.Tensor:
    """Exact ``KL(softmax(logits / T) || softmax(ref_logits / T))`` at every position, float32 ``[...]``.

    Args:
        logits: ``[..., V]`` policy logits (float32, bfloat16 or float16, any strides); gets the gradient.
        ref_logits: ``[..., V]`` reference logits, same shape (any of the three dtypes); a constant: no
            gradient flows to it even if it requires one.
        temperature: positive divisor of both logits.
        impl: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``.
        process_group: tensor parallelism (``None``: none). ``logits`` and ``ref_logits`` hold this rank's
            contiguous slice of the vocabulary (the same slice), slices in rank order (any sizes). Every rank
            returns the KL over the whole vocabulary and gets its slice's gradient; three small all-reduces
            per forward (the first checks that ``temperature`` and the rows' shape are the same on every
            rank: ``ValueError`` naming the one that is not), none in backward (rlhf_fast/_vocab_parallel.py).

    Entries where ``logits`` is ``-inf`` (masked vocabulary) add nothing; an entry where only
    ``ref_logits`` is ``-inf`` makes the KL ``+inf``. Computed in float32 whatever autocast says.

    Batch invariant (both impls; PyTorch on CPU): a row's KL is bitwise the same whatever the batch around it
    (README "Batch invariance").
    """
    _checks.check_float_tensor(logits, "logits", min_dim=1)
    _checks.check_float_tensor(ref_logits, "ref_logits", min_dim=1)
    _checks.check_shape("ref_logits", ref_logits, logits.shape, "the shape of logits")
    _checks.check_same_device("ref_logits", ref_logits, "logits", logits)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    opts = FullKLOptions(temperature=_checks.check_positive("temperature", temperature))
    impl = resolve(impl, logits.device)
    if process_group is None:
        return _FullKL.apply(logits, ref_logits.detach(), opts, impl)
    _vocab_parallel.same_on_every_rank(process_group, logits.device, {
        "temperature": opts.temperature, "logits.shape[:-1]": logits.shape[:-1]})  # fmt: skip
    o = _vocab_parallel.FullKLShardOptions(process_group, impl, *_backend(impl), linear=False,
                                           temperature=opts.temperature)  # fmt: skip
    return _vocab_parallel.full_kl(o, logits, ref_logits.detach()).view(logits.shape[:-1])
