"""``rf.linear_logprobs``: log-probs and entropy of ``softmax((hidden @ weight.T + bias) / T)``, never
building the ``[N, V]`` logits.

- ``torch``: chunks of rows; each chunk's logits are computed, reduced to per-row statistics
  (max, log-normalizer, entropy, label log-prob) and dropped. Backward recomputes each chunk's logits,
  turns them into ``dlogits`` with the same formula as ``rf.logprobs`` and multiplies them into
  ``d_hidden``, ``d_weight`` and ``d_bias``. Extra memory: ``O(N + chunk * V)`` (plus a float32 copy of
  the weight and its gradient accumulator when the weight is bf16/fp16).
  Without ``return_entropy`` (log-probs only, as ``rf.linear_dpo_loss`` and SFT ask) neither implementation
  forms the entropy: the forward skips its softmax-weighted sum, the backward its gradient terms.
- ``triton``: the forward kernel tiles ``hidden x weight^T`` with ``tl.dot`` and merges the online
  statistics of each vocabulary tile; backward recomputes logit tiles into a bounded ``[chunk, V]``
  ``dlogits`` buffer and hands the two products to cuBLAS (see kernels/linear_logprobs.py).

Truncated sampling (``top_k`` / ``top_p`` / ``min_p``, rlhf_fast/truncation.py): a row's threshold needs
its whole row of logits, so both implementations take one route: per chunk of rows, the float32 logits
``[rows, V]`` by one matmul (cuBLAS / PyTorch, into a buffer every chunk reuses), the chunk's thresholds
``tau`` (the sort-free Triton kernel of kernels/truncation.py, or ``truncation.row_thresholds``) and its
statistics over the kept entries (``rf.logprobs``' truncated row kernels, or the compiled chunk bodies of
the untruncated PyTorch route, which mask below ``tau`` as they read). Backward recomputes each chunk's
logits with the same matmul and their truncated gradient (entries below ``tau`` get none; a row whose label
is below it none on its log-prob), then the two gradient products. So the lm_head is read once forward and three times
backward, as untruncated (no extra pass: the threshold is computed on the chunk the statistics read), and
the extra memory is the chunk buffer plus ``[N]`` thresholds. What it gives up on the Triton side is the
fused matmul-and-statistics kernel: the chunk's logits go through memory once.
"""

from dataclasses import dataclass

import torch

from . import _amp, _checks, _vocab_parallel, truncation
from . import logprobs_op as _logprobs_op
from ._dispatch import resolve
from ._fused_chunk import MIN_CHUNK_ROWS, chunk_buffer, chunk_grad, chunk_rows, chunk_stats, pad_rows
from ._linear_common import LinearGrads, _chunk_logits, check_linear_operands, chunk_logits, matmul_operands
from ._skip_rows import check_skip_ignored, labeled_rows, scatter_rows
from ._softmax_torch import grad_or_zeros

# float32 [rows, V] temporaries a chunk of the PyTorch implementation holds at once: the logits and, in
# backward, dlogits (the compiled bodies make no others; the eager ones work in place).
_CHUNK_TEMPORARIES = 2


@dataclass(frozen=True)
class LinearLogprobsOptions:
    temperature: float = 1.0
    ignore_index: int = -100
    with_entropy: bool = True  # False: log-probs only (entropy None, no entropy work forward or backward)


def _torch_forward(hidden, weight, bias, labels, temperature: float, with_entropy: bool = True):
    """``(logp, entropy, row_max, log_norm)``, chunk by chunk; the twin of ``linear_logprobs_forward``.

    ``entropy`` is ``None`` without ``with_entropy``.
    """
    N, V = hidden.shape[0], weight.shape[0]
    native, w_mm, b32 = matmul_operands(hidden, weight, bias)
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    row_max, log_norm = torch.empty_like(logp), torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    step = chunk_rows(V, _CHUNK_TEMPORARIES)
    # chunks of at least MIN_CHUNK_ROWS rows (short ones padded): a row's results do not depend on the batch
    z_buf = chunk_buffer(max(step, MIN_CHUNK_ROWS), max(N, MIN_CHUNK_ROWS), V, hidden.device)
    for r in range(0, N, step):
        rows = slice(r, r + step)
        h = hidden[rows] if native else hidden[rows].float()
        n = h.shape[0]
        h, chunk_labels = pad_rows(h, MIN_CHUNK_ROWS), pad_rows(labels[rows], MIN_CHUNK_ROWS)
        z = _chunk_logits(h, w_mm, b32, out=z_buf[: h.shape[0]])
        stats = chunk_stats(z, chunk_labels, temperature, with_entropy)
        logp[rows], ent, row_max[rows], log_norm[rows] = (None if t is None else t[:n] for t in stats)
        if with_entropy:
            entropy[rows] = ent
    return logp, entropy, row_max, log_norm


def _torch_backward(hidden, weight, bias, labels, row_max, log_norm, entropy, grad_logp, grad_entropy,
                    temperature: float, need_hidden: bool, need_weight: bool, need_bias: bool, label_grad=None):  # fmt: skip
    """``(d_hidden, d_weight, d_bias)`` with recomputed chunk logits; the twin of ``linear_logprobs_backward``.

    ``entropy`` and ``grad_entropy`` ``None``: the gradient of the log-probs alone (no entropy terms). The weight
    gradient accumulates in float32 and is cast once at the end. ``label_grad``: as in ``rf.logprobs``'
    ``_torch_backward`` (a vocabulary shard's label term).
    """
    N, V = hidden.shape[0], weight.shape[0]
    w32 = weight.float()
    b32 = None if bias is None else bias.float()
    grads = LinearGrads(hidden, weight, bias, need_hidden, need_weight, need_bias)
    step = chunk_rows(V, _CHUNK_TEMPORARIES)
    z_buf, g_buf = chunk_buffer(step, N, V, hidden.device), chunk_buffer(step, N, V, hidden.device)
    for r in range(0, N, step):
        rows = slice(r, r + step)
        h32 = hidden[rows].float()
        n = h32.shape[0]
        z = _chunk_logits(h32, w32, b32, out=z_buf[:n])
        g = chunk_grad(z, row_max[rows], log_norm[rows], None if entropy is None else entropy[rows], grad_logp[rows],
                       None if grad_entropy is None else grad_entropy[rows], labels[rows], temperature, out=g_buf[:n],
                       label_grad=None if label_grad is None else label_grad[rows])  # fmt: skip
        grads.add(rows, g, h32, w32)
    return grads.result()


_NO_LABEL = -1  # labels are in [0, V) here: no row is ignored by rf.logprobs' row functions (the caller masks)


def _scaled_chunk(hidden, rows, native, w_mm, b32, z_buf, temperature: float) -> torch.Tensor:
    """The chunk's float32 logits divided by the temperature, in ``z_buf``: the values the thresholds and
    the statistics read (``x / T`` rounded as ``rf.logprobs``' PyTorch twin rounds it)."""
    z = chunk_logits(hidden, rows, native, w_mm, b32, out=z_buf)
    return z if temperature == 1.0 else z.div_(temperature)


def _truncated_forward(hidden, weight, bias, labels, temperature: float, with_entropy: bool, trunc, impl: str):
    """``(logp, entropy | None, row_max, log_norm, tau)`` of the truncated distribution, chunk by chunk (module
    docstring): each chunk's logits once, their thresholds, then the statistics of the kept entries. The
    PyTorch route divides the chunk buffer by ``T`` in place and hands it, with ``tau``, to the compiled
    statistics body of the untruncated op, which masks the entries below ``tau`` as it reads them
    (``row_max`` and ``log_norm`` are then those of ``x / T``); the Triton route runs ``rf.logprobs``'
    truncated row kernels."""
    N, V = hidden.shape[0], weight.shape[0]
    forward, _ = _logprobs_op._backend(impl)
    thresholds = truncation.thresholds(impl)
    native, w_mm, b32 = matmul_operands(hidden, weight, bias)
    outs = [torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(5)]
    logp, entropy, row_max, log_norm, tau = outs
    step = chunk_rows(V, _CHUNK_TEMPORARIES)
    z_buf = chunk_buffer(step, N, V, hidden.device)
    for r in range(0, N, step):
        rows = slice(r, r + step)
        if impl == "torch":
            z = _scaled_chunk(hidden, rows, native, w_mm, b32, z_buf, temperature)
            tau[rows] = truncation.row_thresholds(z, trunc.rows(rows))
            stats = chunk_stats(z, labels[rows], 1.0, with_entropy, tau=tau[rows])
        else:
            z = chunk_logits(hidden, rows, native, w_mm, b32, out=z_buf).unsqueeze(0)
            tau[rows] = thresholds(z, trunc.rows(rows), temperature)
            stats = forward(z, labels[rows], temperature, _NO_LABEL, with_entropy, tau=tau[rows])
        logp[rows], ent, row_max[rows], log_norm[rows] = stats
        if with_entropy:
            entropy[rows] = ent
    return logp, entropy if with_entropy else None, row_max, log_norm, tau


def _truncated_backward(hidden, weight, bias, labels, row_max, log_norm, entropy, tau, grad_logp, grad_entropy,
                        temperature: float, need: tuple, impl: str):  # fmt: skip
    """``(d_hidden, d_weight, d_bias)``: each chunk's logits recomputed by the forward's matmul (the same
    values, so the same kept sets), their gradient (the PyTorch route: the compiled gradient body with
    ``tau``, no gradient on the log-prob of a row whose label is below it; the Triton route:
    ``rf.logprobs``' truncated backward written over them), then the products."""
    N, V = hidden.shape[0], weight.shape[0]
    _, backward = _logprobs_op._backend(impl)
    native, w_mm, b32 = matmul_operands(hidden, weight, bias)
    w32 = weight.float()
    grads = LinearGrads(hidden, weight, bias, *need)
    step = chunk_rows(V, _CHUNK_TEMPORARIES)
    z_buf = chunk_buffer(step, N, V, hidden.device)
    g_buf = chunk_buffer(step, N, V, hidden.device) if impl == "torch" else None
    for r in range(0, N, step):
        rows = slice(r, r + step)
        ent, g_ent = (None, None) if entropy is None else (entropy[rows], grad_entropy[rows])
        if impl == "torch":
            z = _scaled_chunk(hidden, rows, native, w_mm, b32, z_buf, temperature)
            missed = z.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1) < tau[rows]
            g = chunk_grad(z, row_max[rows], log_norm[rows], ent, grad_logp[rows].masked_fill(missed, 0.0), g_ent,
                           labels[rows], 1.0, out=g_buf[: z.shape[0]], tau=tau[rows])  # fmt: skip
            g = g if temperature == 1.0 else g.div_(temperature)
        else:
            z = chunk_logits(hidden, rows, native, w_mm, b32, out=z_buf).unsqueeze(0)
            g = backward(z, labels[rows], row_max[rows], log_norm[rows], ent, grad_logp[rows], g_ent, temperature,
                         _NO_LABEL, grad_logits=z, tau=tau[rows])[0]  # fmt: skip
        grads.add(rows, g, hidden[rows].float(), w32)
    return grads.result()


def _backend(impl: str):
    """``(forward, backward)`` of an implementation: the Triton launchers or their PyTorch twins."""
    if impl == "triton":
        from .kernels.linear_logprobs import linear_logprobs_backward, linear_logprobs_forward

        return linear_logprobs_forward, linear_logprobs_backward
    return _torch_forward, _torch_backward


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    @_amp.float32_op
    def forward(ctx, hidden, weight, bias, labels, opts: LinearLogprobsOptions, impl: str, trunc=None):
        ignored = labels == opts.ignore_index
        safe_labels = labels.masked_fill(ignored, 0).contiguous()
        tau = None
        if trunc is None:
            forward, _ = _backend(impl)
            logp, entropy, row_max, log_norm = forward(hidden, weight, bias, safe_labels, opts.temperature,
                                                       opts.with_entropy)  # fmt: skip
        else:
            logp, entropy, row_max, log_norm, tau = _truncated_forward(hidden, weight, bias, safe_labels, opts.temperature,
                                                                       opts.with_entropy, trunc, impl)  # fmt: skip
        logp.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(hidden, weight, bias, safe_labels, ignored, row_max, log_norm, entropy, tau)
        ctx.opts, ctx.impl = opts, impl
        ctx.set_materialize_grads(False)
        return logp, entropy  # entropy None without opts.with_entropy

    @staticmethod
    @_amp.float32_op
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, safe_labels, ignored, row_max, log_norm, entropy, tau = ctx.saved_tensors
        N = hidden.shape[0]
        g_logp = grad_or_zeros(grad_logp, N, hidden.device).masked_fill(ignored, 0.0)
        # No gradient reaches the entropy (not requested, or unused by the loss): the log-prob gradient alone.
        if grad_entropy is None:
            entropy, g_entropy = None, None
        else:
            g_entropy = grad_or_zeros(grad_entropy, N, hidden.device)
        if tau is not None:
            d_hidden, d_weight, d_bias = _truncated_backward(hidden, weight, bias, safe_labels, row_max, log_norm, entropy,
                                                             tau, g_logp, g_entropy, ctx.opts.temperature,
                                                             tuple(ctx.needs_input_grad[:3]), ctx.impl)  # fmt: skip
            return d_hidden, d_weight, d_bias, None, None, None, None
        _, backward = _backend(ctx.impl)
        d_hidden, d_weight, d_bias = backward(
            hidden, weight, bias, safe_labels, row_max, log_norm, entropy, g_logp, g_entropy,
            ctx.opts.temperature, *ctx.needs_input_grad[:3],
        )  # fmt: skip
        return d_hidden, d_weight, d_bias, None, None, None, None


def vocab_parallel(hidden, weight, bias, labels, opts: LinearLogprobsOptions, impl: str, shard, trunc=None):
    """``_LinearLogprobs.apply`` with ``weight [V_r, H]`` (``bias [V_r]``) a vocabulary shard and ``hidden``
    replicated (rlhf_fast/_vocab_parallel.py): ``(logp, entropy | None)`` ``[N]`` of the whole vocabulary;
    gradients to the shard's weight and bias and, all-reduced, to ``hidden``. ``trunc``: truncated sampling over
    the whole vocabulary (rlhf_fast/_truncation_parallel.py)."""
    forward, backward = _backend(impl)
    o = _vocab_parallel.LogprobsShardOptions(shard, impl, forward, backward, linear=True, temperature=opts.temperature,
                                             ignore_index=opts.ignore_index, with_entropy=opts.with_entropy,
                                             trunc=trunc, row_functions=_logprobs_op._backend(impl))  # fmt: skip
    return _vocab_parallel.logprobs(o, labels, hidden, weight, bias)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
    skip_ignored: bool = False,
    process_group: "torch.distributed.ProcessGroup | None" = None,
    top_k: "int | torch.Tensor | None" = None,
    top_p: "float | torch.Tensor | None" = None,
    min_p: "float | torch.Tensor | None" = None,
    sampler: str = "vllm",
    matmul_dtype: "torch.dtype | None" = None,
):
    """``rf.logprobs(hidden @ weight.T + bias, labels, ...)`` without materializing the ``[N, V]`` logits.

    Args:
        hidden: ``[..., H]`` float32, bfloat16 or float16 (the last hidden states).
        weight: ``[V, H]`` (the lm_head layout), same dtype as ``hidden`` (under autocast, any: see below).
        labels: ``[...]`` integer token ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]``, same dtype as ``hidden``.
        temperature, ignore_index, return_entropy, impl: as in :func:`rlhf_fast.logprobs`.
        skip_ignored: ``True``: rows whose label is ``ignore_index`` are dropped (``index_select``) before
            any matmul and get log-prob 0, entropy 0 and no gradient; the other rows' results are those of
            ``skip_ignored=False``. Worth it when many rows are ignored (prompts, padding): see
            rlhf_fast/_skip_rows.py for the cost of the gather.
        process_group: tensor parallelism (``None``: none). ``weight`` (and ``bias``) hold this rank's
            contiguous slice of the vocabulary's rows, slices in rank order (Megatron's vocab-parallel
            lm_head, ``gather_output=False``); ``hidden`` and ``labels`` (global ids) are the same on every
            rank. Every rank returns the outputs of the whole vocabulary; ``weight``/``bias`` get their
            slice's gradient and ``hidden`` the full gradient, all-reduced (SUM) over the group in backward:
            do not all-reduce it again. See rlhf_fast/_vocab_parallel.py.
        top_k, top_p, min_p, sampler: truncated sampling, as in :func:`rlhf_fast.logprobs` (README
            "Truncated sampling"): the log-probs, entropy and gradients of the truncated, renormalised
            distribution; a label outside the kept set gets ``-inf`` and no log-prob gradient. Off values
            are bitwise no-ops. Both impls compute it chunk by chunk (module docstring: one matmul per chunk
            forward, thresholds and statistics on that chunk). With ``process_group``: the truncation of the
            whole vocabulary (rlhf_fast/_truncation_parallel.py). Batch invariance is not claimed for
            truncated calls.
        matmul_dtype: ``None`` (the lm_head matmul follows autocast, below) or ``torch.float32``: the matmul
            in float32 under any autocast (operands upcast; gradients still in the inputs' dtypes), the
            fp32 lm_head that shrinks the trainer / rollout mismatch. Anything else: ``ValueError``.

    Returns:
        float32 ``logp`` ``[...]``, or ``(logp, entropy)`` with ``return_entropy=True``; differentiable
        with respect to ``hidden``, ``weight`` and ``bias`` (gradients in their dtypes). Without
        ``return_entropy`` no entropy work is done, forward or backward (the same ``logp`` and gradients).

    Autocast: under ``torch.autocast`` on ``hidden``'s device, ``hidden``, ``weight`` and ``bias`` are cast
    to the autocast dtype as ``F.linear`` casts them (so an fp32 lm_head runs the bf16 matmul, not an
    fp32 one); the products accumulate in float32 and the logits and softmax statistics stay float32
    (never rounded to bf16). Gradients come back in each input's own dtype, through the casts.

    Batch invariant (Triton on a GPU, PyTorch on CPU): a row's ``logp`` and ``entropy`` are bitwise the same
    whatever the batch around it: its size, order, neighbours, padding (README "Batch invariance": fixed
    vocabulary splits in the kernel; chunks of at least 16 rows and a compile choice by ``V`` alone in the
    PyTorch path). So ``skip_ignored=True`` leaves the labeled rows' outputs bitwise unchanged. Gradients
    are not claimed.
    """
    # Under autocast the matmul operands go to the autocast dtype, as F.linear's do (see rlhf_fast/_amp.py).
    hidden, weight, bias = check_linear_operands(hidden, weight, bias, matmul_dtype=matmul_dtype)
    V = weight.shape[0]
    labels = _checks.as_labels(labels)
    _checks.check_shape("labels", labels, hidden.shape[:-1], "the leading dimensions of hidden")
    _checks.check_same_device("labels", labels, "hidden", hidden)
    opts = LinearLogprobsOptions(
        temperature=_checks.check_positive("temperature", temperature),
        ignore_index=_checks.check_int("ignore_index", ignore_index),
        with_entropy=bool(return_entropy),
    )
    impl = resolve(impl, hidden.device)
    shard = _vocab_parallel.shard_of(process_group, V, hidden.device, _vocab_parallel.row_arguments(
        labels, opts.temperature, opts.ignore_index, top_k, top_p, min_p, sampler))  # fmt: skip
    trunc = truncation.check_truncation(top_k, top_p, min_p, sampler, labels.shape, V if shard is None else shard.vocab,
                                        hidden.device)  # fmt: skip
    _checks.check_labels_in_range(labels, V if shard is None else shard.vocab, opts.ignore_index)
    flat_hidden, flat_labels = hidden.reshape(labels.numel(), hidden.shape[-1]), labels.reshape(-1)
    # the same labels on every rank of a group: every rank keeps the same rows
    keep = labeled_rows(flat_labels, opts.ignore_index) if check_skip_ignored(skip_ignored) else None
    if keep is not None:  # compute the labeled rows only; the others get 0 (rlhf_fast/_skip_rows.py)
        flat_hidden, flat_labels = flat_hidden.index_select(0, keep), flat_labels.index_select(0, keep)
        trunc = None if trunc is None else trunc.rows(keep)
    with _amp.no_autocast():
        args = (flat_hidden, weight, bias, flat_labels, opts, impl)
        logp, entropy = _LinearLogprobs.apply(*args, trunc) if shard is None else vocab_parallel(*args, shard, trunc)
    if keep is not None:
        logp, entropy = scatter_rows(logp, keep, labels.numel()), scatter_rows(entropy, keep, labels.numel())
    if not opts.with_entropy:
        return logp.view(labels.shape)
    return logp.view(labels.shape), entropy.view(labels.shape)
