"""``rf.ppo_loss_from_logits``: the fused PPO policy step.

    loss = agg(L_clip + kl_coef * kl_penalty(logp, ref_logp) - entropy_coef * entropy)
    logp, entropy = logprobs(logits, labels, temperature=..., return_entropy=True)

- ``triton``: one kernel pass over each logits row computes the log-prob, entropy, ratio, clipped
  surrogate, KL penalty, entropy bonus and ``d loss_t / d logp`` (kernels/ppo.py); backward is one more
  pass (``rf.logprobs``' backward kernel) writing ``dlogits``. The aggregation is a weighted sum whose
  per-token weights come from the mask once (per-row token counts, rlhf_fast/_agg.py).
- ``torch``: the same composition on ``rf.logprobs``' chunked PyTorch implementation, so no ``[N, V]``
  float32 intermediate is built; the per-token arithmetic is autograd over ``[B, T]`` tensors.
"""

from dataclasses import dataclass

import torch

from . import _agg, _amp, _checks
from ._dispatch import dispatch, register
from ._rowsoftmax import as_btv
from .logprobs import LogprobsOptions, _Logprobs
from .ppo import KL_ESTIMATORS, kl_penalty, masked_mean, ppo_policy_loss

@dataclass(frozen=True)
class PPOOptions:
    temperature: float = 1.0
    ignore_index: int = -100
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0


def _token_losses(logp, entropy, old_logp, advantages, ref_logp, opts: PPOOptions):
    """Per-token ``L_clip + kl_coef * k - entropy_coef * H`` on ``[B, T]`` tensors (autograd-friendly).

    The caller zeroes every input at tokens of weight 0, so that nothing there is inf or NaN: a finite
    loss from garbage and a zero upstream gradient would still give ``0 * inf = NaN`` gradients.
    """
    ratio = torch.exp(logp - old_logp)
    clipped = -advantages * ratio.clamp(1.0 - opts.clip_low, 1.0 + opts.clip_high)
    loss = torch.maximum(-advantages * ratio, clipped)
    if opts.dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * opts.dual_clip), loss)
    if ref_logp is not None:
        loss = loss + opts.kl_coef * kl_penalty(logp, ref_logp, estimator=opts.kl_estimator)
    return loss - opts.entropy_coef * entropy


# ---------------------------------------------------------------------------------------------- triton


class _PPOTriton(torch.autograd.Function):
    @staticmethod
    @_amp.float32_op
    def forward(ctx, logits, labels, old_logp, advantages, weights, ref_logp, opts: PPOOptions):
        from .kernels.ppo import ppo_forward

        x = as_btv(logits)
        flat = [None if t is None else t.reshape(-1).float().contiguous() for t in (old_logp, advantages, weights, ref_logp)]
        labels = labels.reshape(-1).contiguous()
        logp, entropy, row_max, log_norm, token_loss, dloss_dlogp = ppo_forward(
            x, labels, *flat, temperature=opts.temperature, ignore_index=opts.ignore_index,
            clip_low=opts.clip_low, clip_high=opts.clip_high, dual_clip=opts.dual_clip, kl_coef=opts.kl_coef,
            kl_estimator=opts.kl_estimator, entropy_coef=opts.entropy_coef,
        )  # fmt: skip
        loss = (flat[2] * token_loss).sum()
        ctx.save_for_backward(x, labels, row_max, log_norm, entropy, flat[2], dloss_dlogp)
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
        grad = logprobs_backward(x, labels, row_max, log_norm, entropy, g * dloss_dlogp, g * -opts.entropy_coef,
                                 opts.temperature, opts.ignore_index)  # fmt: skip
        return grad.reshape(ctx.logits_shape), None, None, None, None, None, None


@register("ppo_loss_from_logits", "triton")
def _ppo_triton(logits, labels, old_logp, advantages, weights, ref_logp, opts):
    loss, logp, entropy = _PPOTriton.apply(logits, labels, old_logp, advantages, weights, ref_logp, opts)
    return loss, logp, entropy


@register("ppo_loss_from_logits", "torch")
def _ppo_torch(logits, labels, old_logp, advantages, weights, ref_logp, opts):
    logprobs_opts = LogprobsOptions(temperature=opts.temperature, ignore_index=opts.ignore_index)
    logp, entropy = _Logprobs.apply(logits, labels, logprobs_opts, "torch")
    # Masked-out tokens contribute exactly nothing, gradients included, whatever they hold (NaN or inf
    # advantages, -inf old or reference log-probs): every input is 0 there before any arithmetic, so
    # their token loss is a finite constant and where()'s backward gives their log-prob and entropy 0.
    on = weights.view(logp.shape) != 0
    inputs = [None if t is None else torch.where(on, t, 0.0) for t in (logp, entropy, old_logp, advantages, ref_logp)]
    token_loss = _token_losses(*inputs, opts)
    loss = (weights.view(logp.shape) * token_loss).sum()
    return loss, logp.detach(), entropy.detach()


# ---------------------------------------------------------------------------------------------- public


@_amp.float32_op
def ppo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    ignore_index: int = -100,
    impl: str = "auto",
):
    """The PPO policy loss straight from ``[B, T, V]`` logits, and the metrics a trainer logs.

    ``loss = agg(L_clip + kl_coef * kl_penalty(logp, ref_logp, kl_estimator) - entropy_coef * entropy)``
    with ``logp, entropy = rf.logprobs(logits, labels, temperature=temperature, return_entropy=True)``,
    ``L_clip = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``, ``r = exp(logp - old_logp)`` and, with
    ``dual_clip=c``, ``L_clip = min(L_clip, -A c)`` where ``A < 0``. ``advantages`` is ``[B, T]`` or ``[B]``.

    ``mask`` (``[B, T]`` tensor or ``None``) holds non-negative token weights, as in every op: ``0`` = not a
    token, ``"token-mean"`` is ``sum(m * L) / sum(m)``; negative entries raise ``ValueError``. Tokens of
    weight 0 contribute exactly nothing, gradients included, whatever their advantages, log-probs or
    reference log-probs hold (NaN, ``±inf``). The loss is float32 and computed in float32 under autocast.

    Returns ``(loss, metrics)``: ``loss`` a float32 scalar differentiable in ``logits``; ``metrics`` a dict
    of detached float32 scalars: ``clipfrac``, ``approx_kl``, ``ratio_mean``, ``ratio_max`` (as
    ``rf.ppo_policy_loss``), ``entropy`` and ``kl`` (masked means; ``kl`` is 0 without ``ref_logp``).
    """
    _checks.check_float_tensor(logits, "logits", min_dim=3)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    B, T, V = logits.shape
    if V == 0:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    labels = _checks.as_labels(labels)
    _checks.check_shape("labels", labels, (B, T), "[B, T] like logits")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None or name == "old_logp":
            _checks.check_float_tensor(t, name)
            _checks.check_shape(name, t, (B, T), "[B, T] like logits")
    _checks.check_float_tensor(advantages, "advantages")
    if tuple(advantages.shape) not in ((B, T), (B,)):
        raise ValueError(f"advantages must have shape {(B, T)} or {(B,)}, got {tuple(advantages.shape)}")
    if mask is not None:
        _checks.check_mask(mask, labels, "labels ([B, T] like logits)")
    for name, t in (("labels", labels), ("old_logp", old_logp), ("advantages", advantages), ("mask", mask),
                    ("ref_logp", ref_logp)):  # fmt: skip
        if t is not None:
            _checks.check_same_device(name, t, "logits", logits)
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    for name, value in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"{name} must be a number, got {value!r}")
    if kl_coef != 0 and ref_logp is None:
        raise ValueError("ref_logp is required when kl_coef != 0")
    clip_low = _checks.check_positive("clip_low", clip_low)
    clip_high = clip_low if clip_high is None else _checks.check_positive("clip_high", clip_high)
    if dual_clip is not None and not (_checks.check_positive("dual_clip", dual_clip) > 1.0):
        raise ValueError(f"dual_clip must be > 1, got {dual_clip!r}")
    _agg.check_agg(agg)
    if B * T == 0:
        raise ValueError(f"logits has no tokens (shape {tuple(logits.shape)}): the loss and its metrics are "
                         "means over the batch's tokens")  # fmt: skip
    opts = PPOOptions(
        temperature=_checks.check_positive("temperature", temperature),
        ignore_index=_checks.check_int("ignore_index", ignore_index),
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=None if dual_clip is None else float(dual_clip),
        kl_coef=float(kl_coef),
        kl_estimator=kl_estimator,
        entropy_coef=float(entropy_coef),
    )
    fn = dispatch("ppo_loss_from_logits", impl, logits.device)
    _checks.check_labels_in_range(labels, V, opts.ignore_index)
    adv = advantages.float() if advantages.dim() == 2 else advantages.float().unsqueeze(-1).expand(B, T)
    m = torch.ones(B, T, device=logits.device) if mask is None else mask.to(torch.float32)
    weights = _agg.row_weights(m, agg)
    ref = None if ref_logp is None or opts.kl_coef == 0 else ref_logp.detach().float()
    loss, logp, entropy = fn(logits, labels, old_logp.detach().float(), adv.detach(), weights, ref, opts)

    # The metrics of rf.ppo_policy_loss on the detached log-probs (cheap [B, T] work), plus two more.
    _, metrics = ppo_policy_loss(logp, old_logp, adv, m, clip_low=clip_low, clip_high=clip_high,
                                 dual_clip=opts.dual_clip)  # fmt: skip
    with torch.no_grad():
        metrics["entropy"] = masked_mean(entropy, m)
        if ref_logp is not None:
            metrics["kl"] = masked_mean(kl_penalty(logp, ref_logp, estimator=kl_estimator), m)
        else:
            metrics["kl"] = torch.zeros((), device=logits.device)
    return loss, metrics
