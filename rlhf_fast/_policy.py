"""The policy-loss family shared by ``rf.ppo_policy_loss``, ``rf.ppo_loss_from_logits`` (both impls) and the
linear ops: per-token losses of each ``loss_mode`` over ``[B, T]`` tensors, and the rollout importance
weights (trainer's old policy vs the rollout engine). Everything here is float32 autograd arithmetic on
``[B, T]`` tensors; callers zero every input at tokens of weight 0 before calling, so nothing there is
inf or NaN (a finite loss and a zero upstream gradient would still give ``0 * inf = NaN`` gradients).

Notation per token: ``lr = logp - old_logp``, ``r = exp(lr)`` (saturating at the largest float32 rather than
overflowing to inf: ``ratio_exp`` below), ``A`` the advantage, ``m`` the token's
weight (the mask), ``lo = clip_low``, ``hi = clip_high``. The ``loss_mode``s follow verl's
``verl/trainer/ppo/core_algos.py`` (volcengine/verl @ b178a3cd56f58b2d502255daba591e92833930a7), the
``delta`` clip and the rollout importance-sampling modes TRL 1.16's ``GRPOTrainer``
(trl/trainer/grpo_trainer.py):

- ``"vanilla"``: ``L = max(-A * r', -A * clip(r, 1 - lo, 1 + hi))`` with ``r' = min(r, delta)`` when
  ``delta`` is given (TRL's two-sided clip; ``r`` otherwise); with ``dual_clip=c``, ``L = min(L, -A c)``
  where ``A < 0``.
- ``"gspo"``: the same with ``r`` replaced by GSPO's token-level sequence ratio
  ``s_t = exp(sg(S) + logp_t - sg(logp_t))``, ``S = sum_t(m lr) / sum_t(m)`` over the row (its value is
  the row's geometric-mean ratio, its gradient flows through each token's own log-prob; verl's
  ``compute_policy_loss_gspo``, without its ``log s <= 10`` clamp). verl always aggregates GSPO by
  ``"seq-mean-token-mean"``; here ``agg`` decides (pass ``agg="seq-mean-token-mean"`` for verl's).
- ``"cispo"``: ``L = -sg(clip(r, 1 - lo, 1 + hi)) * A * logp`` (the clipped importance weight is a
  constant; the gradient is ``-clip(r) A`` per token). TRL's ``cispo`` clips from above only, at
  ``epsilon_high``: ``clip_high = epsilon_high - 1`` and ``clip_low = 1`` give it.
- ``"sapo"``: ``L = -A * (4 / tau) * sigmoid(tau * (r - 1))``, ``tau = sapo_tau_pos`` where ``A > 0``,
  ``sapo_tau_neg`` elsewhere (SAPO's soft gate).
- ``"geo_mean"`` (GMPO): per row, ``lc_t = sign(A) * min(sign(A) lr_t, sign(A) clip(lr_t, -lo, hi))``,
  ``R = exp(sum_t(m lc) / sum_t(m))``, ``A_row = sum_t(m A) / sum_t(m)``; every token of the row carries
  ``L = -A_row * R``, so ``"seq-mean-token-mean"`` gives verl's mean over rows (verl averages over all B
  rows, empty ones included, and ignores ``loss_agg_mode``).

Rollout importance weights (``rollout_is``), constants multiplying each token's policy loss: with
``d_t = old_logp_t - rollout_logp_t``, the raw weight is ``k_t = exp(d_t)`` (``"token_*"``, ``"icepop"``)
or the row's ``k = exp(sum_t(m d_t))`` on every token (``"sequence_*"``); then
``*_truncate``: ``clip(k, lower, cap)`` (no lower bound when ``rollout_is_lower`` is None);
``*_mask``: ``k`` where ``lower <= k <= cap``, 0 elsewhere; ``"icepop"``: ``token_mask`` with the
two-sided band IcePop asks for, ``lower`` defaulting to ``1 / cap``. (TRL's ``vllm_importance_sampling_mode``
with ``clip_min = lower``, ``clip_max = cap``.)
"""

import math
from dataclasses import dataclass

import torch

from . import _checks

LOSS_MODES = ("vanilla", "gspo", "cispo", "sapo", "geo_mean")
ROLLOUT_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop")
# Modes whose per-token loss depends on the token's own log-prob only (no row statistics of the current
# policy): their d loss_t / d logp_t is known from the token alone.
TOKEN_LEVEL_MODES = ("vanilla", "cispo", "sapo")


@dataclass(frozen=True)
class PolicyOptions:
    loss_mode: str = "vanilla"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    delta: float | None = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    rollout_is: str | None = None
    rollout_is_cap: float = 2.0
    rollout_is_lower: float | None = None


def _optional_positive(name: str, value):
    return None if value is None else _checks.check_positive(name, value)


def check_policy_options(*, loss_mode, clip_low, clip_high, dual_clip, delta, sapo_tau_pos, sapo_tau_neg,
                         rollout_logp, rollout_is, rollout_is_cap, rollout_is_lower) -> PolicyOptions:  # fmt: skip
    """Validate the policy-loss arguments (``ValueError`` naming the argument); ``rollout_logp`` is only
    checked for presence here (its shape by the caller)."""
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {loss_mode!r}")
    clip_low = _checks.check_positive("clip_low", clip_low)
    clip_high = clip_low if clip_high is None else _checks.check_positive("clip_high", clip_high)
    dual_clip = _optional_positive("dual_clip", dual_clip)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (a cap at -A * dual_clip above the clipped loss), got {dual_clip}")
    delta = _optional_positive("delta", delta)
    for name, value in (("dual_clip", dual_clip), ("delta", delta)):
        if value is not None and loss_mode not in ("vanilla", "gspo"):
            raise ValueError(f"{name} applies to the clipped surrogate (loss_mode 'vanilla' or 'gspo'), "
                             f"not loss_mode={loss_mode!r}")  # fmt: skip
    sapo_tau_pos = _checks.check_positive("sapo_tau_pos", sapo_tau_pos)
    sapo_tau_neg = _checks.check_positive("sapo_tau_neg", sapo_tau_neg)
    if rollout_is is not None and rollout_is not in ROLLOUT_IS_MODES:
        raise ValueError(f"rollout_is must be None or one of {ROLLOUT_IS_MODES}, got {rollout_is!r}")
    if (rollout_is is None) != (rollout_logp is None):
        raise ValueError("rollout_logp and rollout_is go together: rollout_is names the correction made with "
                         "rollout_logp (the rollout engine's log-probs)")  # fmt: skip
    rollout_is_cap = _checks.check_positive("rollout_is_cap", rollout_is_cap)
    rollout_is_lower = _optional_positive("rollout_is_lower", rollout_is_lower)
    if rollout_is_lower is not None and rollout_is is None:
        raise ValueError("rollout_is_lower bounds the rollout importance weights: it needs rollout_is (and rollout_logp)")
    if rollout_is == "icepop" and rollout_is_lower is None:
        rollout_is_lower = 1.0 / rollout_is_cap
    if rollout_is_lower is not None and not rollout_is_lower < rollout_is_cap:
        raise ValueError(f"rollout_is_lower ({rollout_is_lower}) must be < rollout_is_cap ({rollout_is_cap})")
    return PolicyOptions(
        loss_mode=loss_mode, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, delta=delta,
        sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, rollout_is=rollout_is,
        rollout_is_cap=rollout_is_cap, rollout_is_lower=rollout_is_lower,
    )  # fmt: skip


# The largest float32: where exp(lr) overflows (lr > ~88.72), the ratio is this instead of inf.
RATIO_MAX = torch.finfo(torch.float32).max


class _SaturatingExp(torch.autograd.Function):
    """``exp(x)`` at most :data:`RATIO_MAX`, with the gradient ``g * exp(x)`` (at most ``g * RATIO_MAX``).

    Why: a ratio of ``exp(100)`` (float64: 2.7e43) is inf in float32, and every branch that does not use it
    then turns finite values into NaN: a clipped branch sends it a gradient of 0, and exp's backward makes
    ``0 * inf``; ``A = 0`` (a GRPO tie) gives ``-A * r = 0 * inf``; so do SAPO's saturated gate
    (``s (1 - s) r``) and the KL's bias correction with ``k = 0``. Saturated, each of those is 0 as in
    float64. Where the overflowed ratio is the active branch, float64's value is out of float32's range
    anyway: the loss and gradient come out as huge as float32 holds (or inf), never NaN. The gradient is
    not clamp()'s (0 past the cap), which would silently drop an active branch's gradient.
    """

    @staticmethod
    def forward(ctx, x):
        r = torch.exp(x).clamp_(max=RATIO_MAX)
        ctx.save_for_backward(r)
        return r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return g * r


def ratio_exp(lr: torch.Tensor) -> torch.Tensor:
    """The importance ratio ``exp(lr)`` of every loss mode, saturating (see :class:`_SaturatingExp`)."""
    return _SaturatingExp.apply(lr)


def _row_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``sum_t(m x) / sum_t(m)`` per row, ``[B, 1]`` (0 for a row without tokens)."""
    total = m.sum(1, keepdim=True)
    return (m * x).sum(1, keepdim=True) / torch.where(total > 0, total, 1.0)


@dataclass
class TokenLoss:
    """Per-token policy loss ``loss`` and what the metrics and the KL's bias correction need."""

    loss: torch.Tensor  # [B, T], differentiable in logp
    ratio: torch.Tensor  # [B, T] the mode's differentiable importance ratio (r, or GSPO's s_t)
    clipped: torch.Tensor  # [B, T] bool: the clip is the active branch
    dual_clipped: torch.Tensor | None = None


def token_loss(logp, old_logp, adv, m, opts: PolicyOptions) -> TokenLoss:
    """The per-token policy loss of ``opts.loss_mode`` (see the module docstring): float32 ``[B, T]``
    ``logp`` (differentiable), ``old_logp``, ``adv`` and weights ``m``, all zero where ``m == 0``."""
    lr = logp - old_logp
    mode = opts.loss_mode
    if mode in ("vanilla", "gspo"):
        if mode == "gspo":
            seq = _row_mean(lr.detach(), m)
            ratio = ratio_exp(seq + logp - logp.detach())
        else:
            ratio = ratio_exp(lr)
        r1 = ratio if opts.delta is None else torch.clamp(ratio, max=opts.delta)
        unclipped = -adv * r1
        clipped = -adv * torch.clamp(ratio, 1.0 - opts.clip_low, 1.0 + opts.clip_high)
        loss = torch.maximum(unclipped, clipped)
        out = TokenLoss(loss, ratio, clipped > unclipped)
        if opts.dual_clip is not None:
            cap = -adv * opts.dual_clip
            out.dual_clipped = (adv < 0) & (loss > cap)
            out.loss = torch.where(adv < 0, torch.minimum(loss, cap), loss)
        return out
    ratio = ratio_exp(lr)
    if mode == "cispo":
        c = torch.clamp(ratio, 1.0 - opts.clip_low, 1.0 + opts.clip_high).detach()
        return TokenLoss(-c * adv * logp, ratio, c != ratio.detach())
    if mode == "sapo":
        tau = torch.where(adv > 0, opts.sapo_tau_pos, opts.sapo_tau_neg)
        gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
        return TokenLoss(-gate * adv, ratio, torch.zeros_like(adv, dtype=torch.bool))
    # geo_mean
    sgn = torch.sign(adv)
    lr_clamped = torch.clamp(lr, -opts.clip_low, opts.clip_high)
    lc = sgn * torch.minimum(sgn * lr, sgn * lr_clamped)
    seq_ratio = ratio_exp(_row_mean(lc, m))
    seq_adv = _row_mean(adv, m)
    loss = (-seq_adv * seq_ratio).expand_as(lr)
    clipped = ((adv > 0) & (lr > opts.clip_high)) | ((adv < 0) & (lr < -opts.clip_low))
    return TokenLoss(loss, ratio, clipped)


@torch.no_grad()
def rollout_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, m: torch.Tensor, opts: PolicyOptions):
    """``(w, metrics)``: the constant rollout importance weights ``[B, T]`` (0 where ``m == 0``) of
    ``opts.rollout_is`` and their metrics ``rollout_is_mean``, ``rollout_is_max``,
    ``rollout_is_masked_frac`` (masked means over the tokens; the max over tokens of nonzero weight)."""
    on = m != 0
    d = torch.where(on, old_logp.float() - rollout_logp.float(), 0.0)
    if opts.rollout_is.startswith("sequence"):
        d = (m * d).sum(1, keepdim=True).expand_as(d)
    k = torch.exp(d)
    lower, cap = opts.rollout_is_lower, opts.rollout_is_cap
    if opts.rollout_is.endswith("truncate"):
        w = torch.clamp(k, min=lower, max=cap)
        rejected = torch.zeros_like(on)
    else:  # *_mask, icepop
        keep = k <= cap
        if lower is not None:
            keep = keep & (k >= lower)
        w = torch.where(keep, k, 0.0)
        rejected = on & ~keep
    w = torch.where(on, w, 0.0)
    total = m.sum().clamp(min=torch.finfo(torch.float32).tiny)
    metrics = {
        "rollout_is_mean": (m * w).sum() / total,
        "rollout_is_max": w.max(),
        "rollout_is_masked_frac": (m * rejected.float()).sum() / total,
    }
    return w, metrics


def check_rollout_logp(rollout_logp, shape, device, what: str) -> None:
    if rollout_logp is None:
        return
    _checks.check_float_tensor(rollout_logp, "rollout_logp")
    _checks.check_shape("rollout_logp", rollout_logp, shape, what)
    if rollout_logp.device != device:
        raise ValueError(f"rollout_logp is on {rollout_logp.device} but the log-probs are on {device}")


def check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)
