"""``rf.ppo_loss_from_logits``: the fused PPO policy step.

    loss = agg(L_clip + kl_coef * kl_penalty(logp, ref_logp) - entropy_coef * entropy)
    logp, entropy = logprobs(logits, labels, temperature=..., return_entropy=True)

- ``triton``: one kernel pass over each logits row computes the log-prob, entropy, ratio, the token-level
  policy loss (``vanilla`` / ``cispo`` / ``sapo``, with ``delta``, dual clip and rollout weights), KL penalty
  (with the bias correction), entropy bonus and ``d loss_t / d logp`` (kernels/ppo.py); backward is one
  more pass (``rf.logprobs``' backward kernel) writing ``dlogits``. The sequence-level modes (``gspo``,
  ``geo_mean``) need every log-prob of a row before any token's loss: they run ``rf.logprobs``' kernels and
  the ``[B, T]`` loss by autograd (the same two passes). The aggregation is a weighted sum whose
  per-token weights come from the mask once (per-row token counts, rlhf_fast/_agg.py).
- ``torch``: the same composition on ``rf.logprobs``' chunked PyTorch implementation, so no ``[N, V]``
  float32 intermediate is built; the per-token arithmetic is autograd over ``[B, T]`` tensors.
"""

from dataclasses import dataclass, replace

import torch

from . import _agg, _amp, _checks, _policy, _vocab_parallel, truncation
from ._dispatch import resolve
from ._policy import PolicyLossOptions
from ._softmax_torch import as_btv
from .logprobs_op import LogprobsOptions, _Logprobs, vocab_parallel
from .rl_losses import kl_penalty, masked_mean, ppo_policy_loss


@dataclass(frozen=True)
class PPOOptions:
    """What the policy-step Functions take: the loss options and the call's log-prob options."""

    policy: PolicyLossOptions
    temperature: float = 1.0
    ignore_index: int = -100

    @property
    def fused_kernel(self) -> bool:
        """Whether the fused Triton kernel computes this loss: the token-level loss modes (``vanilla``,
        ``cispo``, ``sapo``) with every option; the sequence-level ones (``gspo``, ``geo_mean``) run the
        composition ``rf.logprobs`` (Triton) + the ``[B, T]`` loss."""
        return self.policy.loss_mode in _policy.TOKEN_LEVEL_MODES


def token_losses(logp, entropy, old_logp, advantages, m, ref_logp, rollout_w, opts: PPOOptions):
    """Per-token ``w_rollout * L_policy + kl_coef * k (* ratio) - entropy_coef * H`` on ``[B, T]`` float32
    tensors (autograd-friendly), ``L_policy`` of ``opts.policy.loss_mode`` (rlhf_fast/_policy.py).

    The caller zeroes every input at tokens of weight 0 (``m == 0``), so that nothing there is inf or NaN:
    a finite loss from garbage and a zero upstream gradient would still give ``0 * inf = NaN`` gradients.
    """
    pol = opts.policy
    tl = _policy.token_loss(logp, old_logp, advantages, m, pol)
    loss = tl.loss if rollout_w is None else tl.loss * rollout_w
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, estimator=pol.kl_estimator)
        if pol.kl_bias_correction:
            kl = kl * tl.ratio
        loss = loss + pol.kl_coef * kl
    return loss - pol.entropy_coef * entropy


# ---------------------------------------------------------------------------------------------- triton


class _PPOTriton(torch.autograd.Function):
    @staticmethod
    @_amp.float32_op
    def forward(ctx, logits, labels, old_logp, advantages, weights, ref_logp, rollout_w, opts: PPOOptions):
        from .kernels.ppo import ppo_forward

        x = as_btv(logits)
        old_logp_f, advantages_f, weights_f, ref_logp_f, rollout_w_f = (
            None if t is None else t.reshape(-1).float().contiguous() for t in (old_logp, advantages, weights, ref_logp, rollout_w)
        )  # fmt: skip
        labels = labels.reshape(-1).contiguous()
        pol = opts.policy
        logp, entropy, row_max, log_norm, token_loss, dloss_dlogp = ppo_forward(
            x, labels, old_logp_f, advantages_f, weights_f, ref_logp_f, temperature=opts.temperature, ignore_index=opts.ignore_index,
            clip_low=pol.clip_low, clip_high=pol.clip_high_bound, dual_clip=pol.dual_clip, kl_coef=pol.kl_coef,
            kl_estimator=pol.kl_estimator, entropy_coef=pol.entropy_coef, rollout_w=rollout_w_f,
            loss_mode=pol.loss_mode, delta=pol.delta, tau_pos=pol.sapo_tau_pos, tau_neg=pol.sapo_tau_neg,
            kl_bias=pol.kl_bias_correction,
        )  # fmt: skip
        loss = (weights_f * token_loss).sum()
        ctx.save_for_backward(x, labels, row_max, log_norm, entropy, weights_f, dloss_dlogp)
        ctx.opts, ctx.logits_shape = opts, logits.shape
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp.view(old_logp.shape), entropy.view(old_logp.shape)

    @staticmethod
    @_amp.float32_op
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        from .kernels.logprobs import logprobs_backward

        x, labels, row_max, log_norm, entropy, weights, dloss_dlogp = ctx.saved_tensors
        opts = ctx.opts
        g = grad_loss.float() * weights
        grad = logprobs_backward(x, labels, row_max, log_norm, entropy, g * dloss_dlogp, g * -opts.policy.entropy_coef,
                                 opts.temperature, opts.ignore_index)  # fmt: skip
        return grad.reshape(ctx.logits_shape), None, None, None, None, None, None, None


def weighted_token_loss(logp, entropy, old_logp, advantages, m, weights, ref_logp, rollout_w, opts):
    """``sum(weights * token_losses)`` from differentiable ``logp`` and ``entropy`` (any shape the per-token
    tensors share; ``[B, T]`` for the sequence-level modes)."""
    # Masked-out tokens contribute exactly nothing, gradients included, whatever they hold (NaN or inf
    # advantages, -inf old or reference log-probs): every input is 0 there before any arithmetic, so
    # their token loss is a finite constant and where()'s backward gives their log-prob and entropy 0.
    on = m != 0
    inputs = [None if t is None else torch.where(on, t, 0.0) for t in (logp, entropy, old_logp, advantages)]
    ref = None if ref_logp is None else torch.where(on, ref_logp, 0.0)
    return (weights * token_losses(*inputs, m, ref, rollout_w, opts)).sum()


def _composed(logits, labels, old_logp, advantages, m, weights, ref_logp, rollout_w, opts, impl, shard=None):
    """``rf.logprobs`` (``impl``; vocabulary-parallel on a ``shard``) then the ``[B, T]`` per-token loss by
    autograd: two passes over the logits (the log-probs' forward and backward), like the fused kernel."""
    logprobs_opts = LogprobsOptions(temperature=opts.temperature, ignore_index=opts.ignore_index)
    if shard is None:
        logp, entropy = _Logprobs.apply(logits, labels, logprobs_opts, impl)
    else:
        logp, entropy = vocab_parallel(logits, labels, logprobs_opts, impl, shard)
    loss = weighted_token_loss(logp, entropy, old_logp, advantages, m, weights, ref_logp, rollout_w, opts)
    return loss, logp.detach(), entropy.detach()


def truncated_loss(p: "PreparedLoss", logp, entropy):
    """``(loss, p_kept, miss_frac)`` of truncated sampling from the differentiable ``[B, T]`` log-probs and
    entropy of the truncated distribution: a token whose label is outside the kept set (log-prob ``-inf``)
    gets weight 0, as if masked out (the aggregation's denominators, the rollout weights and the metrics
    leave it out: ``p_kept`` is ``p`` with that mask), so it contributes nothing, gradients included;
    ``miss_frac`` is the masked fraction of such tokens, ``sum(m * missed) / sum(m)``."""
    missed = torch.isneginf(logp.detach()) & (p.m != 0)
    m = p.m.masked_fill(missed, 0.0)
    pol = p.opts.policy
    rollout_w = None if pol.rollout_is is None else _policy.rollout_weights(p.old_logp, p.rollout_logp, m, pol)[0]
    kept = replace(p, m=m, weights=_agg.row_weights(m, pol.agg, pol.agg_norm), rollout_w=rollout_w)
    loss = weighted_token_loss(logp, entropy, kept.old_logp, kept.advantages, m, kept.weights, kept.ref_logp,
                               rollout_w, kept.opts)  # fmt: skip
    return loss, kept, masked_mean(missed.float(), p.m)


def _policy_step(logits, labels, old_logp, advantages, m, weights, ref_logp, rollout_w, opts, impl: str, shard=None):
    """``(loss, logp, entropy)``: the fused Triton kernel for the token-level modes, else the composition
    (always on a vocabulary shard)."""
    if impl == "triton" and opts.fused_kernel and shard is None:
        return _PPOTriton.apply(logits, labels, old_logp, advantages, weights.reshape(-1), ref_logp, rollout_w, opts)
    return _composed(logits, labels, old_logp, advantages, m, weights, ref_logp, rollout_w, opts, impl, shard)


# ---------------------------------------------------------------------------------------------- public


@dataclass
class PreparedLoss:
    """A checked call of ``ppo_loss_from_logits`` / ``linear_ppo_loss``: its options, impl, vocabulary shard,
    int64 labels and the ``[B, T]`` float32 tensors every policy-step impl takes."""

    opts: PPOOptions
    impl: str
    shard: "_vocab_parallel.Shard | None"
    labels: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    m: torch.Tensor  # token weights (the mask)
    weights: torch.Tensor  # aggregation weights: loss = sum(weights * token_loss)
    ref_logp: torch.Tensor | None
    rollout_w: torch.Tensor | None
    rollout_logp: torch.Tensor | None


def prepare_policy_step(op: str, name: str, x, V: int, labels, old_logp, advantages, mask, *, options, loss_options,
                        ref_logp, rollout_logp, temperature, ignore_index, impl, process_group,
                        truncation: tuple = (None, None, None, "vllm")) -> PreparedLoss:  # fmt: skip
    """Check a call of the op ``op`` (``x``: its ``[B, T, ...]`` logits or hidden states, argument ``name``;
    ``V`` the vocabulary of this rank) and build what the policy step takes (``ValueError`` naming the
    argument; the policy-loss options are ``options=`` or ``loss_options``, the keywords)."""
    B, T = x.shape[:2]
    labels = _checks.as_labels(labels)
    _checks.check_shape("labels", labels, (B, T), f"[B, T] like {name}")
    loss = _policy.call_options(op, options, loss_options)
    what = "[B, T] like labels"
    for arg, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None or arg == "old_logp":
            _checks.check_float_tensor(t, arg)
            _checks.check_shape(arg, t, (B, T), what)
    _checks.check_float_tensor(advantages, "advantages")
    if tuple(advantages.shape) not in ((B, T), (B,)):
        raise ValueError(f"advantages must have shape {(B, T)} or {(B,)}, got {tuple(advantages.shape)}")
    if mask is not None:
        _checks.check_mask(mask, labels, "labels")
    _policy.check_rollout_logp(rollout_logp, loss, (B, T), x.device, what)
    for arg, t in (("labels", labels), ("old_logp", old_logp), ("advantages", advantages), ("mask", mask),
                   ("ref_logp", ref_logp)):  # fmt: skip
        if t is not None:
            _checks.check_same_device(arg, t, "the inputs", x)
    if loss.kl_coef != 0 and ref_logp is None:
        raise ValueError("ref_logp is required when kl_coef != 0")
    opts = PPOOptions(loss, _checks.check_positive("temperature", temperature), _checks.check_int("ignore_index", ignore_index))
    if B * T == 0:
        raise ValueError(f"{name} has no tokens (shape {tuple(x.shape)}): the loss and its metrics are means over "
                         "the batch's tokens")  # fmt: skip
    impl = resolve(impl, x.device)
    shard = _vocab_parallel.shard_of(process_group, V, x.device, _vocab_parallel.row_arguments(
        labels, opts.temperature, opts.ignore_index, *truncation) | _vocab_parallel.loss_arguments(
        loss, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp, rollout_logp=rollout_logp))
    _checks.check_labels_in_range(labels, V if shard is None else shard.vocab, opts.ignore_index)
    adv = advantages.float() if advantages.dim() == 2 else advantages.float().unsqueeze(-1).expand(B, T)
    m = torch.ones(B, T, device=x.device) if mask is None else mask.to(torch.float32)
    old = old_logp.detach().float()
    rollout_w = None
    if loss.rollout_is is not None:
        rollout_w, _ = _policy.rollout_weights(old, rollout_logp, m, loss)
    return PreparedLoss(
        opts=opts, impl=impl, shard=shard, labels=labels, old_logp=old, advantages=adv.detach(), m=m,
        weights=_agg.row_weights(m, loss.agg, loss.agg_norm), rollout_w=rollout_w, rollout_logp=rollout_logp,
        ref_logp=None if ref_logp is None or loss.kl_coef == 0 else ref_logp.detach().float(),
    )  # fmt: skip


def policy_step_metrics(p: PreparedLoss, logp, entropy, ref_logp, device) -> dict[str, torch.Tensor]:
    """The metrics of ``rf.ppo_policy_loss`` on the detached log-probs (cheap ``[B, T]`` work), plus
    ``entropy`` and ``kl``."""
    pol = p.opts.policy
    policy_term = replace(pol, kl_coef=0.0, entropy_coef=0.0)  # rf.ppo_policy_loss has no KL or entropy term
    # with rollout_logp (alone or with rollout_is), its metrics include the rollout mismatch
    _, metrics = ppo_policy_loss(logp, p.old_logp, p.advantages, p.m, rollout_logp=p.rollout_logp, options=policy_term)
    with torch.no_grad():
        metrics["entropy"] = masked_mean(entropy, p.m)
        if ref_logp is not None:
            metrics["kl"] = masked_mean(kl_penalty(logp, ref_logp, estimator=pol.kl_estimator), p.m)
        else:
            metrics["kl"] = torch.zeros((), device=device)
    return metrics


@_amp.float32_op
def ppo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    options: PolicyLossOptions | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    impl: str = "auto",
    process_group: "torch.distributed.ProcessGroup | None" = None,
    top_k: "int | torch.Tensor | None" = None,
    top_p: "float | torch.Tensor | None" = None,
    min_p: "float | torch.Tensor | None" = None,
    sampler: str = "vllm",
    **loss_options,
):
    """The policy loss straight from ``[B, T, V]`` logits, and the metrics a trainer logs.

    ``loss = agg(w_rollout * L_policy + kl_coef * kl_penalty(logp, ref_logp, kl_estimator) - entropy_coef * entropy)``
    with ``logp, entropy = rf.logprobs(logits, labels, temperature=temperature, return_entropy=True)`` and
    ``L_policy`` the per-token loss of ``rf.ppo_policy_loss`` with the same options (by default
    ``L_clip = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``, ``r = exp(logp - old_logp)`` and, with
    ``dual_clip=c``, ``L_clip = min(L_clip, -A c)`` where ``A < 0``). ``advantages`` is ``[B, T]`` or ``[B]``.
    The options (``loss_mode``, the clips, ``delta``, ``sapo_tau_*``, ``kl_coef=0``, ``kl_estimator="k3"``,
    ``kl_bias_correction``, ``entropy_coef=0``, ``agg="token-mean"``, ``agg_norm``, ``rollout_is*``) are the
    fields of :class:`rlhf_fast.PolicyLossOptions`, where each is described: pass them as keywords
    (``**loss_options``) or as one ``options=`` object, not both (formulas in rlhf_fast/_policy.py and
    rlhf_fast/_agg.py). The rollout weight ``w_rollout`` (with ``rollout_logp [B, T]``) multiplies the
    policy term only. ``kl_bias_correction=True`` multiplies the KL term by the mode's (differentiable)
    importance ratio (TRL's ``use_bias_correction_kl``: ``r``, GSPO's ``s_t``).

    ``impl="triton"``: the token-level loss modes (``vanilla``, ``cispo``, ``sapo``, with every option:
    ``delta``, dual clip, rollout weights, the KL's bias correction) run the fused kernel (one pass over the
    logits forward, one backward); the sequence-level modes (``gspo``, ``geo_mean``) run ``rf.logprobs``'
    Triton kernels and the per-token loss on ``[B, T]`` tensors by autograd, which is the same two passes
    over the logits. ``impl="torch"`` is that composition on ``rf.logprobs``' chunked PyTorch
    implementation, for every mode.

    ``process_group`` (tensor parallelism; ``None``: none): ``logits`` is this rank's contiguous slice of the
    vocabulary, slices in rank order, ``labels`` global ids and every other input the same on every rank.
    Under a group the op takes the composed route, exact in its gradients: ``rf.logprobs``' vocabulary-
    parallel log-probs and entropy (rlhf_fast/_vocab_parallel.py) and the ``[B, T]`` loss by autograd; every
    rank returns the same loss and metrics and gets its slice's gradient.

    ``mask`` (``[B, T]`` tensor or ``None``) holds non-negative token weights, as in every op: ``0`` = not a
    token, ``"token-mean"`` is ``sum(m * L) / sum(m)``; negative entries raise ``ValueError``. Tokens of
    weight 0 contribute exactly nothing, gradients included, whatever their advantages, log-probs or
    reference log-probs hold (NaN, ``±inf``). The loss is float32 and computed in float32 under autocast.

    Returns ``(loss, metrics)``: ``loss`` a float32 scalar differentiable in ``logits``; ``metrics`` a dict
    of detached float32 scalars: those of ``rf.ppo_policy_loss`` with the same options (``clipfrac``,
    ``approx_kl``, ``ratio_mean``, ``ratio_max``, ``dual_clipfrac``, ``rollout_is_*``), ``entropy`` and
    ``kl`` (masked means; ``kl`` is the plain estimator, without the bias correction, and 0 without
    ``ref_logp``). With ``rollout_logp`` (which may come without ``rollout_is``, for these metrics alone):
    ``rollout_kl_k3``, the mean k3 estimate of ``KL(pi_rollout || pi_train)`` on the rollout's tokens
    (``e^d - 1 - d``, ``d = logp - rollout_logp``: NeMo-RL's ``gen_kl_error``), and
    ``rollout_ratio_outside_frac``, the fraction of tokens whose ``e^d`` is outside ``[0.9, 1.1]``
    (rlhf_fast/_policy.py ``rollout_mismatch_metrics``).

    ``top_k``, ``top_p``, ``min_p``, ``sampler`` (per-call sampling arguments like ``temperature``, not loss
    options; README "Truncated sampling"): ``logp`` and ``entropy`` are those of the truncated, renormalised
    distribution the rollout sampled from (``rf.logprobs`` with the same arguments; a number, or a ``[B]``
    or ``[B, T]`` tensor). A token whose label is outside the kept set (log-prob ``-inf``) gets weight 0,
    exactly as if the mask were 0 there: it adds nothing to the loss, the aggregation's denominators, the
    gradient (never NaN) or the other metrics, and is counted in ``truncation_miss_frac`` (its masked
    fraction, ``sum(m * missed) / sum(m)``: a metric present whenever truncation is on, absent when every
    row is off, so that off values leave the loss, gradient and metrics bitwise unchanged). Both impls take
    the composed route when truncation is on: ``rf.logprobs``' truncated kernels (Triton; chunks for
    PyTorch), then the ``[B, T]`` loss by autograd (two passes over the logits, as the fused kernel).
    With ``process_group``: the truncation of the whole vocabulary (rlhf_fast/_truncation_parallel.py).
    """
    _checks.check_float_tensor(logits, "logits", min_dim=3)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    B, T, V = logits.shape
    if V == 0:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    p = prepare_policy_step("ppo_loss_from_logits", "logits", logits, V, labels, old_logp, advantages, mask,
                            options=options, loss_options=loss_options, ref_logp=ref_logp, rollout_logp=rollout_logp,
                            temperature=temperature, ignore_index=ignore_index, impl=impl,
                            process_group=process_group, truncation=(top_k, top_p, min_p, sampler))  # fmt: skip
    trunc = check_policy_truncation(p, top_k, top_p, min_p, sampler, V, logits.device)
    if trunc is not None:  # the composed route with rf.logprobs' truncated kernels (Triton) or chunks (PyTorch)
        lp_opts = LogprobsOptions(temperature=p.opts.temperature, ignore_index=p.opts.ignore_index)
        if p.shard is None:
            logp, entropy = _Logprobs.apply(logits, p.labels, lp_opts, p.impl, trunc)
        else:  # the truncation of the whole vocabulary (rlhf_fast/_truncation_parallel.py)
            logp, entropy = vocab_parallel(logits, p.labels, lp_opts, p.impl, p.shard, trunc)
        return truncated_result(p, logp, entropy, ref_logp, logits.device)
    loss, logp, entropy = _policy_step(logits, p.labels, p.old_logp, p.advantages, p.m, p.weights, p.ref_logp,
                                       p.rollout_w, p.opts, p.impl, p.shard)  # fmt: skip
    return loss, policy_step_metrics(p, logp, entropy, ref_logp, logits.device)


def check_policy_truncation(p: PreparedLoss, top_k, top_p, min_p, sampler, V: int, device):
    """The checked truncation of a loss op's ``[B, T]`` rows (``None``: off), over the whole vocabulary (``V``:
    the shard's slice size on a vocabulary shard)."""
    V = V if p.shard is None else p.shard.vocab
    return truncation.check_truncation(top_k, top_p, min_p, sampler, tuple(p.labels.shape), V, device)


def truncated_result(p: PreparedLoss, logp, entropy, ref_logp, device):
    """``(loss, metrics)`` of a loss op under truncated sampling, from its differentiable ``[B, T]``
    truncated log-probs and entropy (:func:`truncated_loss`); the metrics over the kept tokens, plus
    ``truncation_miss_frac``."""
    logp, entropy = logp.view(p.m.shape), entropy.view(p.m.shape)
    loss, kept, miss_frac = truncated_loss(p, logp, entropy)
    metrics = policy_step_metrics(kept, logp.detach(), entropy.detach(), ref_logp, device)
    metrics["truncation_miss_frac"] = miss_frac
    return loss, metrics
