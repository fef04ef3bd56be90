"""``rf.linear_ppo_loss``: ``rf.ppo_loss_from_logits`` on ``hidden @ weight.T (+ bias)`` without building the
logits, with the gradient computed in the forward where it can be.

For a scalar loss whose per-token terms depend only on the token's own log-prob and entropy (the
token-level modes ``vanilla``, ``cispo``, ``sapo``, with any KL estimator, the entropy bonus, ``delta``,
the dual clip, rollout weights and the KL's bias correction), ``dloss/dlogits`` of a row is known as soon
as the row's softmax statistics are: ``g_logp = w_t dL_t/dlogp_t`` and ``g_H = w_t dL_t/dH_t`` (by
autograd on the chunk's ``[rows]`` vectors), then ``dlogits = g_logp (onehot - p) - g_H p (log p + H)``
(``rf.logprobs``' formula). So both implementations, per chunk of rows: one matmul for the float32
logits, their statistics, ``dlogits``, and the two gradient matmuls (``d_hidden[rows] = dlogits @ W``,
``d_W += dlogits.T @ hidden[rows]``): three matmul passes over the lm_head for forward and backward
together, not four (the chunked composition recomputes the logits in the backward). Backward only scales
the saved gradients by the incoming scalar gradient. The cost: the ``[N, H]`` hidden gradient and the
float32 ``[V, H]`` weight gradient are held from the forward to the backward, and they are computed
whether or not ``backward`` is called (no gradient work at all when no input requires grad).

- ``torch``: the chunk's statistics and ``dlogits`` by the PyTorch chunk bodies (rlhf_fast/_fused_chunk.py).
- ``triton``: the same loop with ``rf.logprobs``' row kernels on the chunk (``dlogits`` written over the
  chunk's logits in place); the matmuls are cuBLAS calls. The gradient products are float32 (the
  chunk's ``dlogits`` is float32), exact but not at the bf16 tensor-core rate on a GPU: casting
  ``dlogits`` to the operand dtype for those two products is the next step there (untested without a
  GPU, so not done).

The sequence-level modes (``gspo``, ``geo_mean``: each token's loss depends on its whole row) take the
ordinary route: ``rf.linear_logprobs`` (statistics forward, a recomputing backward; Triton or PyTorch by
``impl``) and the ``[B, T]`` loss by autograd.
"""

import torch

from . import _amp, _checks, _policy
from ._fused_chunk import chunk_buffer, chunk_grad, chunk_rows, chunk_stats
from ._linear_common import LinearGrads, check_linear_operands, chunk_logits, matmul_operands
from ._policy import PolicyLossOptions
from ._skip_rows import check_skip_ignored, ignored_rows, labeled_rows, scatter_rows
from .linear_logprobs_op import LinearLogprobsOptions, _LinearLogprobs, vocab_parallel
from .ppo_from_logits import (PPOOptions, check_policy_truncation, policy_step_metrics, prepare_policy_step,
                              truncated_result, weighted_token_loss)  # fmt: skip

# float32 [rows, V] temporaries a chunk holds at once: the logits and dlogits (as rf.linear_logprobs)
_CHUNK_TEMPORARIES = 2


def _gradient_in_forward(opts: PPOOptions) -> bool:
    return opts.policy.loss_mode in _policy.TOKEN_LEVEL_MODES


def _chunk_ops(impl: str):
    """``(stats, grad)`` on a float32 chunk of logits ``[rows, V]`` with labels in ``[0, V)``: the PyTorch
    chunk bodies (rlhf_fast/_fused_chunk.py), or ``rf.logprobs``' Triton kernels (the gradient written over
    the chunk in place)."""
    if impl != "triton":
        return (lambda z, labels, temperature: chunk_stats(z, labels, temperature, True)), chunk_grad
    from .kernels.logprobs import logprobs_backward, logprobs_forward

    no_label = -1  # labels are in [0, V): no row is ignored by the kernels (the caller masks them)

    def stats(z, labels, temperature):
        return logprobs_forward(z.unsqueeze(0), labels, temperature, no_label, True)

    def grad(z, row_max, log_norm, entropy, g_logp, g_entropy, labels, temperature, out=None):
        z3 = z.unsqueeze(0)  # the gradient is written over the chunk: no output buffer
        return logprobs_backward(z3, labels, row_max, log_norm, entropy, g_logp.contiguous(), g_entropy.contiguous(),
                                 temperature, no_label, grad_logits=z3)[0]  # fmt: skip

    return stats, grad


class _LinearPPOFused(torch.autograd.Function):
    """Loss, log-probs and entropy ``[N]``; ``d_hidden``, ``d_weight``, ``d_bias`` computed in the forward."""

    @staticmethod
    @_amp.float32_op
    def forward(ctx, hidden, weight, bias, labels, ignored, old, adv, m, weights, ref, rollout_w, opts: PPOOptions,
                impl: str):  # fmt: skip
        N, V = hidden.shape[0], weight.shape[0]
        stats, grad = _chunk_ops(impl)
        need = ctx.needs_input_grad[:3]
        native, w_mm, b32 = matmul_operands(hidden, weight, bias)
        w32 = weight.float() if any(need) else None
        grads = LinearGrads(hidden, weight, bias, *need) if any(need) else None
        logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logp)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = chunk_rows(V, _CHUNK_TEMPORARIES)
        z_buf = chunk_buffer(step, N, V, hidden.device)  # reused by every chunk (see chunk_buffer)
        g_buf = chunk_buffer(step, N, V, hidden.device) if grads is not None and impl != "triton" else None
        for r in range(0, N, step):
            rows = slice(r, r + step)
            z = chunk_logits(hidden, rows, native, w_mm, b32, out=z_buf)
            lp, ent, row_max, log_norm = stats(z, labels[rows], opts.temperature)
            lp = lp.masked_fill(ignored[rows], 0.0)
            logp[rows], entropy[rows] = lp, ent
            with torch.enable_grad():
                lp_leaf, ent_leaf = lp.detach().requires_grad_(True), ent.detach().requires_grad_(True)
                chunk_loss = weighted_token_loss(
                    lp_leaf, ent_leaf, old[rows], adv[rows], m[rows], weights[rows],
                    None if ref is None else ref[rows], None if rollout_w is None else rollout_w[rows], opts,
                )  # fmt: skip
                if grads is not None:
                    g_lp, g_ent = torch.autograd.grad(chunk_loss, (lp_leaf, ent_leaf), allow_unused=True)
            loss += chunk_loss.detach()
            if grads is None:
                continue
            g_lp = torch.zeros_like(lp) if g_lp is None else g_lp.masked_fill(ignored[rows], 0.0)
            g_ent = torch.zeros_like(ent) if g_ent is None else g_ent
            g = grad(z, row_max, log_norm, ent, g_lp, g_ent, labels[rows], opts.temperature,
                     out=None if g_buf is None else g_buf[: z.shape[0]])
            grads.add(rows, g, hidden[rows].float(), w32)
        saved = grads.float32_result() if grads is not None else (None, None, None)
        ctx.save_for_backward(*saved)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    @_amp.float32_op
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        out = []
        for saved, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            out.append(None if saved is None else (saved.float() * grad_loss.float()).to(dtype))
        return (*out, None, None, None, None, None, None, None, None, None, None)


def _logprobs_bt(hidden, weight, bias, labels, B, T, p, impl, shard=None, keep=None, trunc=None):
    """Differentiable ``[B, T]`` ``(logp, entropy)`` by ``rf.linear_logprobs`` (statistics forward, recomputing
    backward; vocabulary-parallel on a ``shard``; truncated with ``trunc``); ``keep``: the rows to compute
    (``skip_ignored``), the others get log-prob and entropy 0."""
    lp_opts = LinearLogprobsOptions(temperature=p.opts.temperature, ignore_index=p.opts.ignore_index, with_entropy=True)
    if keep is not None:
        hidden, labels = hidden.index_select(0, keep), labels.index_select(0, keep)
        trunc = None if trunc is None else trunc.rows(keep)
    args = (hidden, weight, bias, labels, lp_opts, impl)
    logp, entropy = _LinearLogprobs.apply(*args, trunc) if shard is None else vocab_parallel(*args, shard, trunc)
    if keep is not None:
        logp, entropy = scatter_rows(logp, keep, B * T), scatter_rows(entropy, keep, B * T)
    return logp.view(B, T), entropy.view(B, T)


def _ordinary(hidden, weight, bias, labels, B, T, p, impl, shard=None, keep=None):
    """:func:`_logprobs_bt` then the ``[B, T]`` loss by autograd."""
    logp, entropy = _logprobs_bt(hidden, weight, bias, labels, B, T, p, impl, shard, keep)
    loss = weighted_token_loss(logp, entropy, p.old_logp, p.advantages, p.m, p.weights, p.ref_logp, p.rollout_w, p.opts)
    return loss, logp.detach(), entropy.detach()


def _linear_ppo(hidden, weight, bias, labels, B, T, p, impl, shard=None):
    if shard is not None or not _gradient_in_forward(p.opts):
        return _ordinary(hidden, weight, bias, labels, B, T, p, impl, shard)
    ignored = labels == p.opts.ignore_index
    safe = labels.masked_fill(ignored, 0).contiguous()
    flat = [None if t is None else t.reshape(-1) for t in (p.old_logp, p.advantages, p.m, p.weights, p.ref_logp, p.rollout_w)]
    loss, logp, entropy = _LinearPPOFused.apply(hidden, weight, bias, safe, ignored, *flat, p.opts, impl)
    return loss, logp.view(B, T), entropy.view(B, T)


def _linear_ppo_skipping(hidden, weight, bias, labels, B, T, p, impl, shard=None):
    """``_linear_ppo`` on the labeled rows only (``skip_ignored=True``, rlhf_fast/_skip_rows.py): the ignored
    rows' log-prob and entropy are 0 and their token losses (constants, usually masked out) are added apart."""
    keep = labeled_rows(labels, p.opts.ignore_index)
    if keep is None:
        return _linear_ppo(hidden, weight, bias, labels, B, T, p, impl, shard)
    if shard is not None or not _gradient_in_forward(p.opts):
        return _ordinary(hidden, weight, bias, labels, B, T, p, impl, shard, keep)
    h, kept_labels = hidden.index_select(0, keep), labels.index_select(0, keep)
    flat = [None if t is None else t.reshape(-1) for t in (p.old_logp, p.advantages, p.m, p.weights, p.ref_logp, p.rollout_w)]
    kept = [None if t is None else t.index_select(0, keep) for t in flat]
    no_ignored = torch.zeros(keep.numel(), dtype=torch.bool, device=labels.device)
    loss, logp, entropy = _LinearPPOFused.apply(h, weight, bias, kept_labels, no_ignored, *kept, p.opts, impl)
    drop = ignored_rows(labels, p.opts.ignore_index)
    zeros = torch.zeros(drop.numel(), dtype=torch.float32, device=labels.device)
    rest = [None if t is None else t.index_select(0, drop) for t in flat]
    loss = loss + weighted_token_loss(zeros, zeros, *rest, p.opts)
    return loss, scatter_rows(logp, keep, B * T).view(B, T), scatter_rows(entropy, keep, B * T).view(B, T)


def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    options: PolicyLossOptions | None = None,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    skip_ignored: bool = False,
    impl: str = "auto",
    process_group: "torch.distributed.ProcessGroup | None" = None,
    top_k: "int | torch.Tensor | None" = None,
    top_p: "float | torch.Tensor | None" = None,
    min_p: "float | torch.Tensor | None" = None,
    sampler: str = "vllm",
    matmul_dtype: "torch.dtype | None" = None,
    **loss_options,
):
    """``rf.ppo_loss_from_logits(hidden @ weight.T + bias, labels, ...)`` without building the logits.

    ``hidden`` ``[B, T, H]`` (the last hidden states at the positions that predict ``labels`` ``[B, T]``),
    ``weight`` ``[V, H]`` (the lm_head), ``bias`` optional ``[V]``; every other argument (the policy-loss
    options: :class:`rlhf_fast.PolicyLossOptions`' fields as keywords, or ``options=``), the loss and the
    metrics are those of :func:`rlhf_fast.ppo_loss_from_logits`. Gradients flow to ``hidden``, ``weight``
    and ``bias`` (in their dtypes). Under autocast the matmul operands take the autocast dtype as
    ``F.linear``'s do; logits and statistics stay float32. See the module docstring for how each
    implementation computes it (the gradient in the forward for the token-level modes).

    ``skip_ignored=True``: rows whose label is ``ignore_index`` are dropped before any matmul (gathered out of
    ``hidden`` and the per-token inputs, rlhf_fast/_skip_rows.py); their log-prob and entropy are 0 (as in the
    metrics), which changes nothing where the mask is 0 on them (prompt and padding tokens) and otherwise
    scores them with log-prob 0 and entropy 0. Worth it when many rows are ignored.

    ``process_group`` (tensor parallelism; ``None``: none): ``weight``/``bias`` hold this rank's contiguous
    slice of the vocabulary's rows, slices in rank order; ``hidden``, ``labels`` (global ids) and the other
    inputs are the same on every rank. Under a group the op takes the composed route, exact in its
    gradients: ``rf.linear_logprobs``' vocabulary-parallel log-probs and entropy, then the ``[B, T]`` loss by
    autograd (the gradient is not formed in the forward); ``hidden``'s gradient is all-reduced over the
    group (rlhf_fast/_vocab_parallel.py).

    ``top_k``, ``top_p``, ``min_p``, ``sampler``: truncated sampling, as in :func:`rlhf_fast.ppo_loss_from_logits`
    (missed labels get weight 0 and are counted in ``truncation_miss_frac``). Both impls then take the
    composed route: ``rf.linear_logprobs`` with the same truncation (chunked logits, their thresholds and
    ``rf.logprobs``' truncated kernels or PyTorch twins: rlhf_fast/linear_logprobs_op.py), then the ``[B, T]``
    loss by autograd; the gradient is not formed in the forward. With ``process_group``: the truncation of the
    whole vocabulary (rlhf_fast/_truncation_parallel.py).

    ``matmul_dtype``: ``None`` (follow autocast) or ``torch.float32`` (the lm_head matmul in float32 under
    any autocast), as in :func:`rlhf_fast.linear_logprobs`.
    """
    _checks.check_float_tensor(hidden, "hidden", min_dim=1)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    hidden, weight, bias = check_linear_operands(hidden, weight, bias, matmul_dtype=matmul_dtype)
    B, T, H = hidden.shape
    V = weight.shape[0]
    p = prepare_policy_step("linear_ppo_loss", "hidden", hidden, V, labels, old_logp, advantages, mask, options=options,
                            loss_options=loss_options, ref_logp=ref_logp, rollout_logp=rollout_logp,
                            temperature=temperature, ignore_index=ignore_index, impl=impl,
                            process_group=process_group, truncation=(top_k, top_p, min_p, sampler))  # fmt: skip
    skip = check_skip_ignored(skip_ignored)
    trunc = check_policy_truncation(p, top_k, top_p, min_p, sampler, V, hidden.device)
    if trunc is not None:
        flat_labels = p.labels.reshape(-1)
        keep = labeled_rows(flat_labels, p.opts.ignore_index) if skip else None
        with _amp.no_autocast():
            logp, entropy = _logprobs_bt(hidden.reshape(B * T, H), weight, bias, flat_labels, B, T, p, p.impl, p.shard,
                                         keep=keep, trunc=trunc)  # fmt: skip
            return truncated_result(p, logp, entropy, ref_logp, hidden.device)
    run = _linear_ppo_skipping if skip else _linear_ppo
    with _amp.no_autocast():
        loss, logp, entropy = run(hidden.reshape(B * T, H), weight, bias, p.labels.reshape(-1), B, T, p, p.impl, p.shard)
    return loss, policy_step_metrics(p, logp, entropy, ref_logp, hidden.device)
