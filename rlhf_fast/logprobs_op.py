"""``rf.logprobs``: per-token log-probs and entropy of ``softmax(logits / temperature)``.

Two implementations behind one autograd contract (gradients through both outputs):

- ``triton``: one kernel pass over each row forward (running max, log-sum-exp, entropy), one pass
  backward writing ``dlogits``; saves only three floats per row (max, log-normalizer, entropy).
- ``torch``: the same algorithm chunked over rows, so that the float32 temporaries are
  ``O(chunk * V)`` instead of the several ``[N, V]`` float32 tensors of the eager composition.

Both can write the gradient over the logits buffer (``inplace_backward=True``), saving one ``[N, V]``
buffer when the caller no longer needs the logits. Without ``return_entropy`` (log-probs only, as
``rf.sequence_logprobs`` asks) neither implementation forms the entropy: the forward skips its
softmax-weighted sum, the backward its gradient terms; likewise the backward of a returned entropy that
receives no gradient.
"""

from dataclasses import dataclass

import torch

from . import _amp, _checks, _vocab_parallel, truncation
from ._dispatch import resolve
from ._fused_chunk import pad_rows
from ._softmax_torch import as_btv, grad_or_zeros, logp_grad_, row_chunks, scaled_float_copy, softmax_grad_, softmax_stats_

# Rows per chunk of the PyTorch implementation: about 2M elements, so each float32 temporary is 8 MiB
# (three live at a time), small next to any [N, V] tensor worth chunking and big enough that per-chunk
# overhead is negligible (measured on a 2-core CPU at V = 50000: see benchmarks/results/cpu).
_TORCH_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class LogprobsOptions:
    temperature: float = 1.0
    ignore_index: int = -100
    inplace_backward: bool = False
    with_entropy: bool = True  # False: log-probs only (entropy None, no entropy work forward or backward)


# ----------------------------------------------------------------------------------------------- torch


def _chunk_rows(V: int) -> int:
    return max(1, _TORCH_CHUNK_ELEMENTS // V)


def _torch_forward(x: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                   with_entropy: bool = True, tau: torch.Tensor | None = None):  # fmt: skip
    """``(logp, entropy, row_max, log_norm)`` of ``[B, T, V]`` logits, chunk by chunk.

    The PyTorch twin of ``kernels.logprobs.logprobs_forward`` (same arguments, same outputs): ``entropy`` is
    ``None`` without ``with_entropy``. ``tau [B*T]`` (truncated sampling): the statistics of the row's
    entries ``>= tau`` only, the others as if ``-inf`` (a label among them gets ``-inf``).
    """
    ignored = labels == ignore_index
    safe_labels = labels.masked_fill(ignored, 0)
    logp = torch.empty(labels.numel(), dtype=torch.float32, device=x.device)
    row_max, log_norm = torch.empty_like(logp), torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    for r, (chunk,) in row_chunks([x], _chunk_rows(x.shape[-1])):
        n = chunk.shape[0]
        rows = slice(r, r + n)
        # A single row is reduced with a second (zero) one: alone, PyTorch would split its sums over the threads
        # and round them differently from the same row in a bigger chunk (README "Batch invariance").
        z = scaled_float_copy(chunk, temperature)
        if tau is not None:
            truncation.mask_below_(z, tau[rows])
        z, chunk_labels = pad_rows(z, 2), pad_rows(safe_labels[rows], 2)
        stats = softmax_stats_(z, chunk_labels, with_entropy)
        logp[rows], ent, row_max[rows], log_norm[rows] = (None if t is None else t[:n] for t in stats)
        if with_entropy:
            entropy[rows] = ent
    return logp.masked_fill_(ignored, 0.0), entropy, row_max, log_norm


def _torch_backward(x, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature: float,
                    ignore_index: int, grad_logits: torch.Tensor | None = None, label_grad=None,
                    tau: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Gradient with respect to ``[B, T, V]`` logits, chunk by chunk, into ``grad_logits`` when given.

    The PyTorch twin of ``kernels.logprobs.logprobs_backward``; ``grad_logits`` may be ``x`` (in place).
    ``entropy`` and ``grad_entropy`` ``None``: the gradient of the log-probs alone (no entropy terms).
    ``label_grad`` ``[B*T]``: what the label term adds at the label, when not ``grad_logp`` (a vocabulary
    shard's rows whose label another rank owns: rlhf_fast/_vocab_parallel.py). ``tau``: as in
    ``_torch_forward``; entries below it get no gradient, and a row whose label is below it none at all
    (its log-prob is the constant ``-inf``).
    """
    ignored = labels == ignore_index
    safe_labels = labels.masked_fill(ignored, 0)
    g_logp = grad_logp.masked_fill(ignored, 0.0)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if grad_logits is None else grad_logits
    for r, (chunk, out_chunk) in row_chunks([x, out], _chunk_rows(x.shape[-1])):
        rows = slice(r, r + chunk.shape[0])
        z = scaled_float_copy(chunk, temperature)
        lg = None if label_grad is None else label_grad[rows]
        g_row = g_logp[rows]
        if tau is not None:
            missed = z.gather(-1, safe_labels[rows].unsqueeze(-1)).squeeze(-1) < tau[rows]
            g_row = g_row.masked_fill(missed, 0.0)
            truncation.mask_below_(z, tau[rows])
        if entropy is None:
            g = logp_grad_(z, row_max[rows], log_norm[rows], g_row, safe_labels[rows], temperature, lg)
        else:
            g = softmax_grad_(z, row_max[rows], log_norm[rows], entropy[rows], g_row, grad_entropy[rows],
                              safe_labels[rows], temperature, lg)  # fmt: skip
        out_chunk.copy_(g)
    return out


# -------------------------------------------------------------------------------------------- autograd


def _backend(impl: str):
    """``(forward, backward)`` of an implementation: the Triton launchers or their PyTorch twins."""
    if impl == "triton":
        from .kernels.logprobs import logprobs_backward, logprobs_forward

        return logprobs_forward, logprobs_backward
    return _torch_forward, _torch_backward


class _Logprobs(torch.autograd.Function):
    @staticmethod
    @_amp.float32_op
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, opts: LogprobsOptions, impl: str,
                trunc: "truncation.RowTruncation | None" = None):  # fmt: skip
        x = as_btv(logits)
        flat_labels = labels.reshape(-1).contiguous()
        forward, _ = _backend(impl)
        # Truncated sampling: each row's kept-set threshold first, then the statistics of the kept entries.
        tau = None if trunc is None else truncation.thresholds(impl)(x, trunc, opts.temperature)
        extra = {} if tau is None else {"tau": tau}  # untruncated: the launchers' calls exactly as before
        logp, entropy, row_max, log_norm = forward(x, flat_labels, opts.temperature, opts.ignore_index,
                                                   opts.with_entropy, **extra)  # fmt: skip
        ctx.save_for_backward(x, flat_labels, row_max, log_norm, entropy, tau)
        ctx.opts, ctx.impl = opts, impl
        ctx.logits_shape = logits.shape
        ctx.set_materialize_grads(False)
        return logp.view(labels.shape), None if entropy is None else entropy.view(labels.shape)

    @staticmethod
    @_amp.float32_op
    def backward(ctx, grad_logp, grad_entropy):
        opts = ctx.opts
        if opts.inplace_backward and getattr(ctx, "logits_overwritten", False):
            raise RuntimeError(
                "rf.logprobs(..., inplace_backward=True): the first backward wrote the gradient over the "
                "logits, so a second backward through this graph (retain_graph=True) cannot recompute it; "
                "use inplace_backward=False to backpropagate more than once"
            )
        x, labels, row_max, log_norm, entropy, tau = ctx.saved_tensors
        n = labels.numel()
        # No gradient reaches the entropy (not requested, or unused by the loss): the log-prob gradient alone.
        if grad_entropy is None:
            entropy, g_entropy = None, None
        else:
            g_entropy = grad_or_zeros(grad_entropy, n, x.device)
        _, backward = _backend(ctx.impl)
        grad = backward(
            x,
            labels,
            row_max,
            log_norm,
            entropy,
            grad_or_zeros(grad_logp, n, x.device),
            g_entropy,
            opts.temperature,
            opts.ignore_index,
            grad_logits=x if opts.inplace_backward else None,
            **({} if tau is None else {"tau": tau}),
        )
        if opts.inplace_backward:
            # The logits now hold the gradient: a second backward must raise, not read it as logits; and
            # any other graph node that saved these logits must see them modified (a kernel's writes do not
            # bump the version counter as an in-place PyTorch op does).
            ctx.logits_overwritten = True
            torch.autograd.graph.increment_version(x)
        return grad.reshape(ctx.logits_shape), None, None, None, None


def vocab_parallel(logits, labels, opts: LogprobsOptions, impl: str, shard, trunc=None):
    """``_Logprobs.apply`` on a vocabulary shard ``logits [..., V_r]`` (rlhf_fast/_vocab_parallel.py): the
    ``(logp, entropy | None)`` of the whole vocabulary, shaped like ``labels``; the gradient of the shard.
    ``trunc``: truncated sampling over the whole vocabulary (rlhf_fast/_truncation_parallel.py)."""
    forward, backward = _backend(impl)
    o = _vocab_parallel.LogprobsShardOptions(shard, impl, forward, backward, linear=False, temperature=opts.temperature,
                                             ignore_index=opts.ignore_index, with_entropy=opts.with_entropy,
                                             trunc=trunc, row_functions=(forward, backward))  # fmt: skip
    logp, entropy = _vocab_parallel.logprobs(o, labels, logits)
    return logp.view(labels.shape), None if entropy is None else entropy.view(labels.shape)


# ---------------------------------------------------------------------------------------------- public


@_amp.float32_op
def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
    inplace_backward: bool = False,
    process_group: "torch.distributed.ProcessGroup | None" = None,
    top_k: "int | torch.Tensor | None" = None,
    top_p: "float | torch.Tensor | None" = None,
    min_p: "float | torch.Tensor | None" = None,
    sampler: str = "vllm",
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
            Only when nothing else reads these logits after the forward: they are overwritten. A second
            backward through the same graph (``retain_graph=True``) raises ``RuntimeError``.
        process_group: tensor parallelism (``None``: none). ``logits`` is this rank's contiguous slice of
            the vocabulary, slices in rank order (any sizes); ``labels`` are global ids. Every rank returns
            the outputs of the whole vocabulary and gets the gradient of its slice; three small all-reduces
            per forward (the slice sizes, then a MAX and a SUM over ``[N]`` vectors), none in backward. Layout and method: rlhf_fast/_vocab_parallel.py. Not with
            ``inplace_backward``.
        top_k, top_p, min_p, sampler: truncated sampling (README "Truncated sampling",
            rlhf_fast/truncation.py): the log-probs, entropy and gradient of the distribution a sampler with
            these settings draws from, ``softmax(logits / T)`` restricted to its kept tokens and
            renormalised. Each is a number or a per-row tensor (the logits' leading shape, ``[N]``, or a
            leading part such as ``[B]``); ``top_k`` 0 or ``>= V``, ``top_p`` 1 and ``min_p`` 0 are off
            (bitwise the untruncated op). A label outside the kept set gets ``-inf`` and no gradient; the
            gradient reaches kept logits only. ``sampler="vllm"`` (default) or ``"hf"`` (the order of the
            rules). With ``process_group``: the truncation of the whole vocabulary (the same arguments on
            every rank; rlhf_fast/_truncation_parallel.py).

    Returns:
        float32 ``logp`` of shape ``[...]``, or ``(logp, entropy)`` with ``return_entropy=True``.
        Both are differentiable with respect to ``logits``; the gradient has the logits' dtype. Without
        ``return_entropy`` no entropy work is done, forward or backward (the same ``logp`` and gradient).

    Vocabulary entries equal to ``-inf`` have probability 0 and add nothing to the entropy. A row whose
    entries are all ``-inf`` is no distribution: its outputs are NaN (or ``-inf``), as in PyTorch.

    Under ``torch.autocast`` the op computes in float32 all the same (rlhf_fast/_amp.py), forward and
    backward. ``labels`` may have any integer dtype.

    Batch invariant (both impls; PyTorch on CPU): a row's ``logp`` and ``entropy`` are bitwise the same
    whatever the batch around it (README "Batch invariance"); gradients are not claimed.
    """
    _checks.check_float_tensor(logits, "logits", min_dim=1)
    labels = _checks.as_labels(labels)
    _checks.check_shape("labels", labels, logits.shape[:-1], "the leading dimensions of logits")
    _checks.check_same_device("labels", labels, "logits", logits)
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    opts = LogprobsOptions(
        temperature=_checks.check_positive("temperature", temperature),
        ignore_index=_checks.check_int("ignore_index", ignore_index),
        inplace_backward=bool(inplace_backward),
        with_entropy=bool(return_entropy),
    )
    impl = resolve(impl, logits.device)
    shard = _vocab_parallel.shard_of(process_group, V, logits.device, _vocab_parallel.row_arguments(
        labels, opts.temperature, opts.ignore_index, top_k, top_p, min_p, sampler))  # fmt: skip
    if shard is not None and opts.inplace_backward:
        raise ValueError("inplace_backward=True is not supported with a process_group")
    trunc = truncation.check_truncation(top_k, top_p, min_p, sampler, logits.shape[:-1],
                                        V if shard is None else shard.vocab, logits.device)  # fmt: skip
    _checks.check_labels_in_range(labels, V if shard is None else shard.vocab, opts.ignore_index)
    if shard is None:
        logp, entropy = _Logprobs.apply(logits, labels, opts, impl, trunc)
    else:
        logp, entropy = vocab_parallel(logits, labels, opts, impl, shard, trunc)
    return (logp, entropy) if opts.with_entropy else logp
