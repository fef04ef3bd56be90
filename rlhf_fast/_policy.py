"""The policy-loss family shared by ``rf.ppo_policy_loss``, ``rf.ppo_loss_from_logits`` (both impls) and the
linear ops: their options (``rf.PolicyLossOptions``, checked once), the per-token losses of each
``loss_mode`` over ``[B, T]`` tensors, and the rollout importance weights (trainer's old policy vs the
rollout engine). Everything here is float32 autograd arithmetic on ``[B, T]`` tensors; callers zero every
input at tokens of weight 0 before calling, so nothing there is inf or NaN (a finite loss and a zero
upstream gradient would still give ``0 * inf = NaN`` gradients).

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

from dataclasses import dataclass, fields

import torch

from . import _agg, _checks

LOSS_MODES = ("vanilla", "gspo", "cispo", "sapo", "geo_mean")
ROLLOUT_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
# Modes whose per-token loss depends on the token's own log-prob only (no row statistics of the current
# policy): their d loss_t / d logp_t is known from the token alone.
TOKEN_LEVEL_MODES = ("vanilla", "cispo", "sapo")


def _optional_positive(name: str, value):
    return None if value is None else _checks.check_positive(name, value)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PolicyLossOptions:
    """The policy-loss options of ``rf.ppo_policy_loss``, ``rf.ppo_loss_from_logits`` and
    ``rf.linear_ppo_loss``: each op takes ``options=PolicyLossOptions(...)`` or the same fields as keywords
    (not both). Frozen, hashable and compared by value; checked on construction (``ValueError`` naming the
    field), so an object that exists is valid. Numbers are stored as floats.

    - ``loss_mode``: ``"vanilla" | "gspo" | "cispo" | "sapo" | "geo_mean"`` (the module docstring above).
    - ``clip_low``, ``clip_high``: the trust region ``[1 - clip_low, 1 + clip_high]`` of the ratio, both
      positive; ``clip_high=None`` means ``clip_low`` (``clip_high > clip_low`` is DAPO's clip-higher).
    - ``dual_clip``: ``c > 1`` caps the loss of negative-advantage tokens at ``-A * c`` (dual-clip PPO);
      ``delta``: TRL's two-sided clip, the unclipped ratio capped at ``delta``. Both ``vanilla`` / ``gspo``.
    - ``sapo_tau_pos``, ``sapo_tau_neg``: SAPO's gate temperatures for ``A > 0`` and ``A <= 0``.
    - ``kl_coef``, ``kl_estimator`` (``"k1" | "k2" | "k3" | "abs"``, ``rf.kl_penalty``'s),
      ``kl_bias_correction`` (the KL term times the mode's ratio, TRL's ``use_bias_correction_kl``) and
      ``entropy_coef``: the KL penalty and entropy bonus of the two ops from logits / hidden states
      (``rf.ppo_policy_loss`` has neither: it refuses a nonzero ``kl_coef`` or ``entropy_coef``).
    - ``agg``: ``"token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" | "seq-mean-token-sum-norm"``;
      ``agg_norm``: its denominator when given (a positive number; rlhf_fast/_agg.py).
    - ``rollout_is``: ``None`` or the correction made with the call's ``rollout_logp`` (``"token_truncate" |
      "token_mask" | "sequence_truncate" | "sequence_mask" | "icepop"``), ``rollout_is_cap`` its upper bound,
      ``rollout_is_lower`` its optional lower bound (``icepop``: ``1 / rollout_is_cap`` when ``None``).

    Per-call arguments are not options: the tensors (``rollout_logp`` included), ``temperature``,
    ``ignore_index``, ``impl``, ``process_group``, ``skip_ignored``. ``dataclasses.replace`` gives a
    changed copy (checked again).
    """

    loss_mode: str = "vanilla"
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    delta: float | None = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_bias_correction: bool = False
    entropy_coef: float = 0.0
    agg: str = "token-mean"
    agg_norm: float | None = None
    rollout_is: str | None = None
    rollout_is_cap: float = 2.0
    rollout_is_lower: float | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {self.loss_mode!r}")
        for name in ("clip_low", "sapo_tau_pos", "sapo_tau_neg", "rollout_is_cap"):
            put(name, _checks.check_positive(name, getattr(self, name)))
        for name in ("clip_high", "dual_clip", "delta", "rollout_is_lower"):
            put(name, _optional_positive(name, getattr(self, name)))
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (a cap at -A * dual_clip above the clipped loss), got {self.dual_clip}")
        for name in ("dual_clip", "delta"):
            if getattr(self, name) is not None and self.loss_mode not in ("vanilla", "gspo"):
                raise ValueError(f"{name} applies to the clipped surrogate (loss_mode 'vanilla' or 'gspo'), "
                                 f"not loss_mode={self.loss_mode!r}")  # fmt: skip
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        put("kl_coef", _number("kl_coef", self.kl_coef))
        put("entropy_coef", _number("entropy_coef", self.entropy_coef))
        if not isinstance(self.kl_bias_correction, bool):
            raise ValueError(f"kl_bias_correction must be a bool, got {self.kl_bias_correction!r}")
        _agg.check_agg(self.agg)
        norm = self.agg_norm
        if norm is not None:
            if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not (0 < norm < float("inf")):
                raise ValueError(f"agg_norm must be None or a positive finite number (the aggregation's "
                                 f"denominator), got {norm!r}")  # fmt: skip
            put("agg_norm", float(norm))
        if self.rollout_is is not None and self.rollout_is not in ROLLOUT_IS_MODES:
            raise ValueError(f"rollout_is must be None or one of {ROLLOUT_IS_MODES}, got {self.rollout_is!r}")
        if self.rollout_is_lower is not None and self.rollout_is is None:
            raise ValueError("rollout_is_lower bounds the rollout importance weights: it needs rollout_is (and rollout_logp)")
        lower = self.rollout_is_lower_bound
        if lower is not None and not lower < self.rollout_is_cap:
            raise ValueError(f"rollout_is_lower ({lower}) must be < rollout_is_cap ({self.rollout_is_cap})")

    @property
    def clip_high_bound(self) -> float:
        """The upper clip the loss uses: ``clip_high``, or ``clip_low`` when it is ``None``."""
        return self.clip_low if self.clip_high is None else self.clip_high

    @property
    def rollout_is_lower_bound(self) -> float | None:
        """The lower bound of the rollout weights the loss uses: ``rollout_is_lower``, or ``1 / rollout_is_cap``
        for ``icepop`` when it is ``None``."""
        if self.rollout_is == "icepop" and self.rollout_is_lower is None:
            return 1.0 / self.rollout_is_cap
        return self.rollout_is_lower


OPTION_NAMES = frozenset(f.name for f in fields(PolicyLossOptions))


def call_options(op: str, options: PolicyLossOptions | None, keywords: dict) -> PolicyLossOptions:
    """The options of one call of the loss op ``op``: ``options=`` or the keywords, built once.

    ``TypeError`` for a keyword that is no option (as Python's for an unknown keyword); ``ValueError`` naming
    the field when ``options=`` and a keyword both give it (the object holds every field)."""
    for name in keywords:
        if name not in OPTION_NAMES:
            raise TypeError(f"{op}() got an unexpected keyword argument {name!r}")
    if options is None:
        return PolicyLossOptions(**keywords)
    if not isinstance(options, PolicyLossOptions):
        raise ValueError(f"options must be a rf.PolicyLossOptions or None, got {type(options).__name__}")
    if keywords:
        name = next(iter(keywords))
        raise ValueError(f"{name} is given both as a keyword and by options= (which holds every policy-loss "
                         f"option): pass one, e.g. options=dataclasses.replace(options, {name}=...)")  # fmt: skip
    return options


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


def token_loss(logp, old_logp, adv, m, opts: PolicyLossOptions) -> TokenLoss:
    """The per-token policy loss of ``opts.loss_mode`` (see the module docstring): float32 ``[B, T]``
    ``logp`` (differentiable), ``old_logp``, ``adv`` and weights ``m``, all zero where ``m == 0``."""
    lr = logp - old_logp
    mode, lo, hi = opts.loss_mode, opts.clip_low, opts.clip_high_bound
    if mode in ("vanilla", "gspo"):
        if mode == "gspo":
            seq = _row_mean(lr.detach(), m)
            ratio = ratio_exp(seq + logp - logp.detach())
        else:
            ratio = ratio_exp(lr)
        r1 = ratio if opts.delta is None else torch.clamp(ratio, max=opts.delta)
        unclipped = -adv * r1
        clipped = -adv * torch.clamp(ratio, 1.0 - lo, 1.0 + hi)
        loss = torch.maximum(unclipped, clipped)
        out = TokenLoss(loss, ratio, clipped > unclipped)
        if opts.dual_clip is not None:
            cap = -adv * opts.dual_clip
            out.dual_clipped = (adv < 0) & (loss > cap)
            out.loss = torch.where(adv < 0, torch.minimum(loss, cap), loss)
        return out
    ratio = ratio_exp(lr)
    if mode == "cispo":
        c = torch.clamp(ratio, 1.0 - lo, 1.0 + hi).detach()
        return TokenLoss(-c * adv * logp, ratio, c != ratio.detach())
    if mode == "sapo":
        tau = torch.where(adv > 0, opts.sapo_tau_pos, opts.sapo_tau_neg)
        gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
        return TokenLoss(-gate * adv, ratio, torch.zeros_like(adv, dtype=torch.bool))
    # geo_mean
    sgn = torch.sign(adv)
    lr_clamped = torch.clamp(lr, -lo, hi)
    lc = sgn * torch.minimum(sgn * lr, sgn * lr_clamped)
    seq_ratio = ratio_exp(_row_mean(lc, m))
    seq_adv = _row_mean(adv, m)
    loss = (-seq_adv * seq_ratio).expand_as(lr)
    clipped = ((adv > 0) & (lr > hi)) | ((adv < 0) & (lr < -lo))
    return TokenLoss(loss, ratio, clipped)


@torch.no_grad()
def rollout_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, m: torch.Tensor, opts: PolicyLossOptions):
    """``(w, metrics)``: the constant rollout importance weights ``[B, T]`` (0 where ``m == 0``) of
    ``opts.rollout_is`` and their metrics ``rollout_is_mean``, ``rollout_is_max``,
    ``rollout_is_masked_frac`` (masked means over the tokens; the max over tokens of nonzero weight)."""
    on = m != 0
    d = torch.where(on, old_logp.float() - rollout_logp.float(), 0.0)
    if opts.rollout_is.startswith("sequence"):
        d = (m * d).sum(1, keepdim=True).expand_as(d)
    k = torch.exp(d)
    lower, cap = opts.rollout_is_lower_bound, opts.rollout_is_cap
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


# The band of trainer / rollout ratios ``rollout_ratio_outside_frac`` counts tokens outside of (verl #6280's).
ROLLOUT_RATIO_BAND = (0.9, 1.1)


@torch.no_grad()
def rollout_mismatch_metrics(logp: torch.Tensor, rollout_logp: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
    """The trainer / rollout mismatch over the tokens of weight ``m != 0`` (masked means, 0 without tokens):

    - ``rollout_kl_k3``: mean of ``k3 = e^d - 1 - d`` with ``d = logp - rollout_logp``. The tokens were sampled
      by the rollout engine, so with ``r = pi_train / pi_rollout = e^d`` this is Schulman's k3 estimator
      ``(r - 1) - log r`` of ``KL(pi_rollout || pi_train)`` on the rollout's own samples (unbiased, each term
      >= 0): NeMo-RL's ``gen_kl_error`` ("kl(P_gen || P_train) where log_ratio = prev_logprobs -
      generation_logprobs", NVIDIA-NeMo/RL nemo_rl/algorithms/loss_functions.py at commit
      b816b57be28b177ace79c363c73ee79ddbc4b309). Computed in float64 (``expm1``): ``d`` is often ~1e-3,
      where float32's ``e^d - 1 - d`` cancels to a few digits;
    - ``rollout_ratio_outside_frac``: fraction of the tokens whose ratio ``e^d`` is outside
      ``[0.9, 1.1]`` (the band verl #6280 reports).
    """
    on = m != 0
    w = m.double()
    d = torch.where(on, logp.double() - rollout_logp.double(), 0.0)
    k3 = torch.expm1(d) - d
    ratio = torch.exp(d)
    lo, hi = ROLLOUT_RATIO_BAND
    outside = (ratio < lo) | (ratio > hi)
    total = w.sum().clamp(min=torch.finfo(torch.float64).tiny)
    return {
        "rollout_kl_k3": (torch.where(on, w * k3, 0.0).sum() / total).float(),
        "rollout_ratio_outside_frac": ((w * outside).sum() / total).float(),
    }


def check_rollout_pairing(rollout_logp, rollout_is) -> None:
    """``rollout_is`` needs ``rollout_logp``; ``rollout_logp`` may come alone (every loss op then reports the
    mismatch metrics of :func:`rollout_mismatch_metrics`, and the loss is unchanged)."""
    if rollout_is is not None and rollout_logp is None:
        raise ValueError("rollout_is needs rollout_logp (the rollout engine's log-probs): it names the correction "
                         "made with them")  # fmt: skip


def check_rollout_logp(rollout_logp, opts: PolicyLossOptions, shape, device, what: str) -> None:
    """``rollout_logp`` (``None`` or a float tensor of ``shape`` on ``device``) against ``opts.rollout_is``
    (:func:`check_rollout_pairing`)."""
    if rollout_logp is not None:
        _checks.check_float_tensor(rollout_logp, "rollout_logp")
        _checks.check_shape("rollout_logp", rollout_logp, shape, what)
        if rollout_logp.device != device:
            raise ValueError(f"rollout_logp is on {rollout_logp.device} but the log-probs are on {device}")
    check_rollout_pairing(rollout_logp, opts.rollout_is)
