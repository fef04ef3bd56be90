"""Per-token RL losses and advantage helpers in PyTorch: ``kl_penalty``, ``ppo_policy_loss``,
``value_loss``, ``masked_whiten``, ``group_advantages``.

These ops read ``[B, T]`` tensors a few times and are cheap next to the logits, so they have no kernels
of their own (the fused ``ppo_loss_from_logits`` folds the same formulas into its pass over the logits).
Arithmetic is float32 whatever the input dtype (and whatever autocast says); gradients come back in the
inputs' dtypes. Masked-out positions (padding) never reach a result, gradients included: they are
replaced by 0 before any arithmetic whose gradient could turn garbage there (``inf`` or NaN log-probs or
advantages) into NaN.

Masks (every op of the package): a ``mask`` entry is the token's non-negative weight; ``0`` means not a
token, a bool or 0/1 mask selects tokens. Every masked mean is ``sum(m * L) / sum(m)`` (the ``agg``
modes, the metrics, ``masked_whiten``'s mean and variance), as TRL's and verl's ``masked_mean`` compute
with a float mask. Negative, NaN or infinite entries raise ``ValueError``.
"""

import math

import torch

from . import _amp, _checks, _policy
from ._agg import aggregate as _aggregate
from ._agg import check_agg
from ._policy import KL_ESTIMATORS, PolicyLossOptions

# |lr| below which k3 = exp(-lr) - 1 + lr is summed as a series: there expm1(-lr) + lr cancels to
# lr^2 / 2 and keeps only ~eps / |lr| relative precision (1e-3 at |lr| = 1e-4). At |lr| = 0.5 the first
# dropped term, lr^9 / 9!, is 4e-8 of lr^2 / 2: below float32 rounding.
_K3_SERIES_BOUND = 0.5


def _k3(lr: torch.Tensor) -> torch.Tensor:
    """``exp(-lr) - 1 + lr`` without cancellation at small ``|lr|`` (float32 ``lr``)."""
    # Series of e^-x - 1 + x = x^2 (1/2! - x/3! + x^2/4! - ... + x^6/8!), by Horner.
    # The series branch sees lr clamped to the bound, so its gradient stays finite where it is not used
    # (torch.where passes 0 to the other branch, and 0 * inf would be NaN).
    x = lr.clamp(-_K3_SERIES_BOUND, _K3_SERIES_BOUND)
    poly = torch.full_like(x, 1.0 / math.factorial(8))
    for n in range(7, 1, -1):
        poly = poly * -x + 1.0 / math.factorial(n)
    series = x * x * poly
    return torch.where(lr.abs() < _K3_SERIES_BOUND, series, torch.expm1(-lr) + lr)


@_amp.float32_op
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate from the sampled tokens' log-probs, float32, same shape as ``logp``.

    With ``lr = logp - ref_logp`` (policy minus reference, at tokens sampled from the policy):

    - ``"k1"``: ``lr`` (unbiased estimate of ``KL(pi || pi_ref)``, can be negative)
    - ``"k2"``: ``0.5 * lr**2``
    - ``"k3"``: ``exp(-lr) - 1 + lr`` (unbiased and >= 0; computed without cancellation at small ``lr``)
    - ``"abs"``: ``|lr|``

    Differentiable in ``logp``, and in ``ref_logp`` when it requires grad.

    Choosing a KL. The usual objective is ``E[r] - beta * KL(pi || pi_ref)``, whose optimum is
    ``pi*(y) = pi_ref(y) exp(r(y) / beta) / Z``. Two ways optimise exactly that:

    - ``k1`` in the reward: ``r - beta * kl_penalty(logp, ref_logp, estimator="k1")``, a constant (no
      gradient) per token, then advantages and the policy-gradient loss as usual;
    - ``rf.full_kl`` (the exact KL over the vocabulary) in the loss: ``loss + beta * full_kl``.

    ``k3`` in the *loss* (``loss + beta * mean(k3)``, as GRPO does) is a fine estimate of the KL's
    value but not of its gradient: on samples from the policy its gradient is
    ``E[(1 - pi_ref/pi) grad log pi] = grad KL(pi_ref || pi)``, the *forward* KL. It pulls towards a
    different policy (``pi(y) = beta * pi_ref(y) / (c - r(y))`` in a bandit) than ``pi*``;
    tests/test_kl_bandit.py shows both on a bandit. For completeness: ``k1`` in the loss has zero
    expected gradient (``E[grad log pi] = 0``), so it regularises nothing; ``k2`` in the loss has, on
    samples from the current policy, the reverse KL's gradient ``E[lr grad log pi]`` (PPO's later epochs
    reuse samples of the old policy, which biases it slightly).
    """
    _checks.check_float_tensor(logp, "logp")
    _checks.check_float_tensor(ref_logp, "ref_logp")
    _checks.check_shape("ref_logp", ref_logp, logp.shape, "the shape of logp")
    _checks.check_same_device("ref_logp", ref_logp, "logp", logp)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    lr = logp.to(torch.float32) - ref_logp.to(torch.float32)
    if estimator == "k1":
        return lr
    if estimator == "k2":
        return 0.5 * lr * lr
    if estimator == "k3":
        return _k3(lr)
    return lr.abs()


# --------------------------------------------------------------------------------------------- helpers


def _check_per_token(x, name: str, ref: torch.Tensor, ref_name: str) -> None:
    _checks.check_float_tensor(x, name)
    _checks.check_shape(name, x, ref.shape, f"the shape of {ref_name}")
    _checks.check_same_device(name, x, ref_name, ref)


def _check_bt(x, name: str) -> None:
    """A float ``[B, T]`` tensor with at least one entry (the losses are means)."""
    _checks.check_float_tensor(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T], got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): the loss is a mean over its tokens")


def _check_clip(name: str, value, *, allow_none: bool = True):
    if value is None and allow_none:
        return None
    return _checks.check_positive(name, value)


def _token_weights(mask: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
    """Float32 ``[B, T]`` token weights: the mask's values (all ones for ``mask=None``)."""
    if mask is None:
        return torch.ones(ref.shape, dtype=torch.float32, device=ref.device)
    return mask.to(torch.float32)


def masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``sum(m * x) / sum(m)`` over float32 weights ``m`` (0 without any token); entries with weight 0 add
    nothing, whatever ``x`` holds there (inf, NaN)."""
    return torch.where(m != 0, m * x, 0.0).sum() / m.sum().clamp(min=torch.finfo(torch.float32).tiny)


# ------------------------------------------------------------------------------------------------- PPO


@_amp.float32_op
def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    options: PolicyLossOptions | None = None,
    is_weights: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    **loss_options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss over ``[B, T]`` tokens (clipped PPO by default): ``(loss, metrics)``.

    Per token, with ``r = exp(logp - old_logp)`` and advantage ``A``, the default ``loss_mode="vanilla"``::

        L = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))
        L = min(L, -A * dual_clip)        where A < 0 (only with dual_clip)
        L = L * is_weights                (only with is_weights)
        L = L * w_rollout                 (only with rollout_is)

    aggregated over ``mask`` by ``agg`` (``rlhf_fast._agg``: ``"token-mean"``, ``"seq-mean-token-mean"``,
    ``"seq-mean-token-sum"``, ``"seq-mean-token-sum-norm"``; ``agg_norm`` replaces the denominator, see
    ``rlhf_fast/_agg.py`` for the formula of each). A batch without any response token gives a loss of 0
    (and zero gradient). The other loss modes (verl's ``gspo``, ``cispo``, ``sapo``, ``geo_mean``),
    ``delta`` (TRL's two-sided clip: the unclipped ratio capped at ``delta``) and the rollout importance
    weights are defined in ``rlhf_fast/_policy.py``'s docstring.

    The options (``loss_mode``, ``clip_low=0.2``, ``clip_high=None``, ``dual_clip``, ``delta``, ``agg``,
    ``agg_norm``, ``sapo_tau_*``, ``rollout_is*``) are the fields of :class:`rlhf_fast.PolicyLossOptions`,
    where each is described: pass them as keywords (``**loss_options``) or as one ``options=`` object, not
    both. The KL and entropy fields must be 0 here (``ValueError`` otherwise): this op is the policy term
    only (``rf.ppo_loss_from_logits`` adds them, or add ``rf.aggregate`` of your own terms).

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (differentiable).
        old_logp: ``[B, T]`` log-probs under the policy that sampled them.
        advantages: ``[B, T]``, or ``[B]`` (one per sequence, broadcast over T).
        mask: ``[B, T]`` response mask: non-negative token weights (0 = not a token; bool or 0/1 to
            select tokens), or ``None`` (all tokens).
        is_weights: ``[B, T]`` per-token importance weights multiplying ``L`` (e.g. truncated
            rollout/trainer mismatch corrections); used as given, so detach them if they are constants.
        rollout_logp: ``[B, T]`` the rollout engine's log-probs of the sampled tokens: with ``rollout_is``
            the correction made with them; alone, for the mismatch metrics only (the loss is unchanged).
        options, **loss_options: the policy-loss options (:class:`rlhf_fast.PolicyLossOptions`).

    Returns:
        ``loss`` (float32 scalar) and ``metrics``, detached float32 scalars: means over the masked tokens
        weighted by the mask (0 when there is none):

        - ``clipfrac``: fraction of tokens where the clip is the active branch: for ``vanilla`` / ``gspo``
          ``-A * clip(r) > -A * r`` strictly (``r`` outside the trust region on the side where the clip
          removes its gradient; GSPO's sequence ratio in place of ``r``); for ``cispo`` the tokens whose
          weight ``clip(r)`` differs from ``r``; for ``geo_mean`` the tokens where ``A > 0, lr > clip_high``
          or ``A < 0, lr < -clip_low``; 0 for ``sapo``;
        - ``dual_clipfrac`` (only with ``dual_clip``): fraction of tokens where the dual clip is
          active (``A < 0`` and the loss was capped at ``-A * dual_clip``);
        - ``approx_kl``: mean of ``old_logp - logp`` (the k1 estimate of ``KL(pi_old || pi)``);
        - ``ratio_mean``, ``ratio_max``: mean and max of the token ratio ``r`` (the max over tokens of
          nonzero weight);
        - with ``rollout_is``: ``rollout_is_mean``, ``rollout_is_max`` and ``rollout_is_masked_frac`` (the
          fraction of tokens whose weight a ``*_mask`` / ``icepop`` mode set to 0);
        - with ``rollout_logp`` (with or without ``rollout_is``), the trainer / rollout mismatch of
          ``rf.ppo_loss_from_logits`` and ``rf.linear_ppo_loss``: ``rollout_kl_k3``, the mean of
          ``e^d - 1 - d`` with ``d = logp - rollout_logp`` (k3 estimate of ``KL(pi_rollout || pi_train)``,
          computed in float64), and ``rollout_ratio_outside_frac``, the fraction of tokens whose ``e^d`` is
          outside ``[0.9, 1.1]`` (``rlhf_fast/_policy.py`` ``rollout_mismatch_metrics``).

    Masked-out tokens (weight 0) contribute nothing, gradients included, whatever ``logp``, ``old_logp``,
    ``advantages``, ``is_weights`` or ``rollout_logp`` hold there (NaN, ``±inf``).
    """
    _check_bt(logp, "logp")
    _check_per_token(old_logp, "old_logp", logp, "logp")
    _checks.check_float_tensor(advantages, "advantages")
    B, T = logp.shape
    if tuple(advantages.shape) not in ((B, T), (B,)):
        raise ValueError(f"advantages must have shape {(B, T)} or {(B,)} (per token or per sequence), "
                         f"got {tuple(advantages.shape)}")  # fmt: skip
    _checks.check_same_device("advantages", advantages, "logp", logp)
    if mask is not None:
        _checks.check_mask(mask, logp, "logp")
    if is_weights is not None:
        _check_per_token(is_weights, "is_weights", logp, "logp")
    opts = _policy.call_options("ppo_policy_loss", options, loss_options)
    for name in ("kl_coef", "entropy_coef"):
        if getattr(opts, name) != 0:
            raise ValueError(f"{name} must be 0 for rf.ppo_policy_loss, got {getattr(opts, name)}: it computes the "
                             "policy term only (rf.ppo_loss_from_logits adds the KL and entropy terms)")  # fmt: skip
    _policy.check_rollout_logp(rollout_logp, opts, logp.shape, logp.device, "the shape of logp")

    m = _token_weights(mask, logp)
    on = m != 0
    # Padding may hold anything (0, inf, NaN): every input is 0 there before any arithmetic, so exp() and
    # every gradient stay finite.
    lp = torch.where(on, logp.to(torch.float32), 0.0)
    old = torch.where(on, old_logp.to(torch.float32), 0.0)
    adv = advantages.to(torch.float32)
    if adv.dim() == 1:
        adv = adv[:, None].expand(B, T)
    adv = torch.where(on, adv, 0.0)

    tl = _policy.token_loss(lp, old, adv, m, opts)
    per_token = tl.loss
    if is_weights is not None:
        per_token = per_token * torch.where(on, is_weights.to(torch.float32), 0.0)
    rollout_metrics = {}
    if opts.rollout_is is not None:
        w_rollout, rollout_metrics = _policy.rollout_weights(old, rollout_logp, m, opts)
        per_token = per_token * w_rollout
    loss = _aggregate(per_token, m, opts.agg, opts.agg_norm)

    with torch.no_grad():
        log_ratio = (lp - old).detach()
        ratio_d = torch.exp(log_ratio)
        metrics = {
            "clipfrac": masked_mean(tl.clipped.float(), m),
            "approx_kl": masked_mean(-log_ratio, m),
            "ratio_mean": masked_mean(ratio_d, m),
            "ratio_max": torch.where(on, ratio_d, 0.0).max(),  # ratios are > 0: 0 only without tokens
        }
        if tl.dual_clipped is not None:
            metrics["dual_clipfrac"] = masked_mean(tl.dual_clipped.float(), m)
        metrics.update(rollout_metrics)
        if rollout_logp is not None:
            metrics.update(_policy.rollout_mismatch_metrics(logp.detach(), rollout_logp, m))
    return loss, metrics


@_amp.float32_op
def aggregate(values: torch.Tensor, mask: torch.Tensor | None = None, *, agg: str = "token-mean") -> torch.Tensor:
    """Aggregate per-token values ``[B, T]`` over ``mask`` by ``agg``, as the PPO losses do (float32 scalar).

    The four modes of the API document (``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"``,
    ``"seq-mean-token-sum-norm"``); a batch without any token gives 0. For adding a term of your own (an
    entropy bonus, a KL in the loss) to ``rf.ppo_policy_loss`` with the same weighting. Differentiable.
    ``mask`` holds non-negative token weights (``"token-mean"`` is ``sum(m * L) / sum(m)``); tokens of
    weight 0 add nothing, gradients included, whatever ``values`` holds there.
    """
    _check_bt(values, "values")
    if mask is not None:
        _checks.check_mask(mask, values, "values")
    check_agg(agg)
    return _aggregate(values, _token_weights(mask, values), agg)


@_amp.float32_op
def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip: float | None = None,
    agg: str = "token-mean",
) -> torch.Tensor:
    """Value-function loss over ``[B, T]`` tokens, aggregated by ``agg`` (float32 scalar).

    Per token ``0.5 * (v - R)**2``, or with ``clip=c`` (PPO's value clipping)::

        0.5 * max((v - R)**2, (old_v + clip(v - old_v, -c, c) - R)**2)

    Args:
        values: ``[B, T]`` current value predictions (differentiable).
        old_values: ``[B, T]`` predictions of the rollout-time critic (only read with ``clip``; may be
            ``None`` without it).
        returns: ``[B, T]`` targets (e.g. the returns of :func:`rlhf_fast.gae`).
        mask: ``[B, T]`` non-negative token weights (0 = not a token) or ``None``.
        clip: positive clip range of ``v - old_v``, or ``None``.
        agg: aggregation mode (see :func:`ppo_policy_loss`).
    """
    _check_bt(values, "values")
    _check_per_token(returns, "returns", values, "values")
    clip = _check_clip("clip", clip)
    if old_values is not None:
        _check_per_token(old_values, "old_values", values, "values")
    elif clip is not None:
        raise ValueError("old_values is required with clip (the clipped prediction is old_values + clip(...))")
    if mask is not None:
        _checks.check_mask(mask, values, "values")
    check_agg(agg)

    m = _token_weights(mask, values)
    on = m != 0
    v = values.to(torch.float32)
    target = returns.to(torch.float32)
    err = torch.where(on, v - target, 0.0)  # padding stays out of the gradient (see the module docstring)
    per_token = err * err
    if clip is not None:
        old = old_values.to(torch.float32)
        v_clipped = old + torch.clamp(v - old, -clip, clip)
        err_clipped = torch.where(on, v_clipped - target, 0.0)
        per_token = torch.maximum(per_token, err_clipped * err_clipped)
    return _aggregate(0.5 * per_token, m, agg)


# ---------------------------------------------------------------------------------------- advantages


@_amp.float32_op
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the entries where ``mask != 0``; 0 elsewhere. float32.

    ``mean`` and ``var`` are taken over the selected entries only, weighted by the mask (its entries are
    token weights, as in every op: ``mean = sum(m x) / sum(m)``). The variance is the **unbiased**
    one (``sum(m (x - mean)**2) / (sum(m) - 1)``, Bessel's correction; with a 0/1 mask
    ``sum((x - mean)**2) / (n - 1)``), as in TRL's and verl's
    ``masked_whiten``: trainers built on those get the same numbers, and whitening advantages of a
    small batch is an estimate of a population's spread, which the unbiased form estimates better.
    (Over thousands of tokens the two differ by a factor ``n / (n - 1)`` of no consequence.) So at least
    two entries must be selected, with a total weight above 1; less raises ``ValueError`` (the mean or the
    variance is undefined).

    ``shift_mean=False`` keeps the mean: ``(x - mean) / sqrt(var + 1e-8) + mean`` (TRL's convention,
    used to whiten rewards without moving their average). Differentiable in ``x``.
    """
    _checks.check_float_tensor(x, "x")
    _checks.check_mask(mask, x, "x")
    m = mask.to(torch.float32)
    on = m != 0
    total = m.sum()
    if _checks.has_values(m):
        n = int(on.sum())
        if n < 2:
            raise ValueError(f"mask selects {n} entr{'y' if n == 1 else 'ies'} of x: masked_whiten needs at least 2 "
                             "(the unbiased variance of fewer is undefined)")  # fmt: skip
        if not total.item() > 1.0:
            raise ValueError(f"mask's weights sum to {total.item():g}: masked_whiten's unbiased variance divides by "
                             "sum(mask) - 1, so the weights must sum to more than 1")  # fmt: skip
    xf = torch.where(on, x.to(torch.float32), 0.0)
    mean = (m * xf).sum() / total
    centered = torch.where(on, xf - mean, 0.0)
    var = (m * centered * centered).sum() / (total - 1.0)
    out = centered * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(on, out, 0.0)


@_amp.float32_op
def group_advantages(
    scores: torch.Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6, baseline: str = "mean"
) -> torch.Tensor:
    """GRPO / RLOO advantages: each score relative to its group of ``group_size`` completions of one prompt.

    ``scores [N]`` holds ``N / group_size`` consecutive groups. For score ``s_i`` of group ``g`` with
    ``G = group_size`` members::

        mean_g = (1/G) * sum_{j in g} s_j
        std_g  = sqrt( sum_{j in g} (s_j - mean_g)**2 / (G - 1) )       (unbiased)
        b_i    = mean_g                                   baseline="mean" (GRPO)
        b_i    = (1/(G-1)) * sum_{j in g, j != i} s_j     baseline="loo"  (RLOO's leave-one-out;
                                                          s_i - b_i = G/(G-1) * (s_i - mean_g))
        A_i    = (s_i - b_i) / (std_g + eps)     or  s_i - b_i  with normalize_std=False

    (RLOO proper is ``baseline="loo", normalize_std=False``: verl's ``compute_rloo_outcome_advantage``.)

    Returns float32 ``[N]``. A group whose scores are all equal gets advantages 0 (``0 / eps``; NaN
    with ``eps=0``). Each group is computed divided by its largest ``|score|`` (the same function), so
    scores near float32's range (1e20, 1e-30) neither overflow nor underflow: float64's values.
    ``group_size=1`` with ``normalize_std=True`` raises ``ValueError``: the unbiased std of one sample is
    undefined (and a lone completion carries no relative signal); with ``normalize_std=False`` it gives
    zeros. ``baseline="loo"`` needs ``group_size >= 2`` (there is no other completion to average).
    Differentiable in ``scores``.
    """
    _checks.check_float_tensor(scores, "scores")
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape [N], got {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError("scores is empty: group advantages are relative to group means")
    group_size = _checks.check_int("group_size", group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    N = scores.numel()
    if N % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide the number of scores ({N})")
    if baseline not in ("mean", "loo"):
        raise ValueError(f"baseline must be 'mean' or 'loo', got {baseline!r}")
    if baseline == "loo" and group_size == 1:
        raise ValueError("group_size must be >= 2 with baseline='loo': a lone completion has no others to average")
    if normalize_std and group_size == 1:
        raise ValueError("group_size must be >= 2 with normalize_std=True: the unbiased std of one score is undefined")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")

    s = scores.to(torch.float32).view(N // group_size, group_size)
    # Each group is divided by its largest |score| k first, so no sum or square overflows (|s / k| <= 1;
    # 1e20 squared is inf in float32, which made every advantage 0) or underflows to 0 before the division:
    # (s - mean) / (std + eps) = k (s' - mean') / (k std' + eps) = (s' - mean') / (std' + eps / k), the same
    # function of s for every k > 0, so k is a constant for autograd (its derivative there is 0 exactly).
    # A group of zeros (or with inf / NaN scores, which stay NaN) keeps k = 1.
    k = s.detach().abs().amax(dim=1, keepdim=True)
    k = torch.where((k > 0) & torch.isfinite(k), k, 1.0)
    scaled = s / k
    centered = scaled - scaled.mean(dim=1, keepdim=True)
    out = centered * (group_size / (group_size - 1)) if baseline == "loo" else centered
    if not normalize_std:
        return (out * k).reshape(N)
    std = centered.pow(2).sum(dim=1, keepdim=True).div(group_size - 1).sqrt()
    # full_like: a Python number over a tensor is computed as number * (1 / k), and 1 / k overflows for a
    # subnormal k (k = 1e-40, eps = 1e-6: eps / k = 1e34, but 1 / k is inf)
    return (out / (std + torch.full_like(k, eps) / k)).reshape(N)
