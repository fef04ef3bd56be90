"""Preference losses on per-pair scores: ``rf.pairwise_sigmoid_loss`` (reward models) and ``rf.dpo_loss``.

``pairwise_sigmoid_loss``, per pair ``-log sigmoid(beta * (chosen - rejected) - margin)``:

- ``triton``: one launch computes the per-pair losses, ``d loss / d x`` for backward (both gradients
  follow from it) and the batch statistics (kernels/preference.py).
- ``torch``: the same numbers from a few elementwise ops on ``[B]``.

Backward scales the saved float32 derivative by ``grad_output`` (a handful of ``[B]`` operations).

``dpo_loss`` is ``[B]`` work with no kernel of its own. Both use the overflow-free log-sigmoid
``min(x, 0) - log1p(e^(-|x|))`` (``torch.nn.functional.logsigmoid`` computes exactly that in PyTorch),
so pairs hundreds of logits apart give finite losses and gradients. Both compute in float32 whatever
autocast says (rlhf_fast/_amp.py).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _amp, _checks
from ._dispatch import resolve

REDUCTIONS = ("mean", "sum", "none")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


# --------------------------------------------------------------------------------------------- helpers


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_not_empty_for_mean(name: str, x: torch.Tensor, reduction: str) -> None:
    if reduction == "mean" and x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): reduction='mean' has no pairs to average")


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    return values.sum() if reduction == "sum" else values


def ranking_accuracy(diff: torch.Tensor) -> torch.Tensor:
    """Fraction of ``diff > 0`` (ties count as wrong); NaN if any ``diff`` is NaN, not a silent miss."""
    return torch.where(diff.isnan(), diff, (diff > 0).to(diff.dtype)).mean()


def _check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------ pairwise sigmoid


@dataclass(frozen=True)
class PairwiseOptions:
    beta: float = 1.0
    margin: float = 0.0
    reduction: str = "mean"


def _torch_forward(chosen, rejected, margin_t, beta: float, margin: float, total_scale: float):
    """``(loss [N], dloss_dx [N], total [], metrics [2])``: the twin of ``pairwise_sigmoid_forward``."""
    diff = chosen.float() - rejected.float()
    x = beta * diff - margin
    if margin_t is not None:
        x = x - margin_t.float()
    loss = -F.logsigmoid(x)
    dloss_dx = -torch.sigmoid(-x)
    metrics = torch.stack([ranking_accuracy(diff), diff.mean()])
    return loss, dloss_dx, loss.sum() * total_scale, metrics


def _backend(impl: str):
    if impl == "triton":
        from .kernels.preference import pairwise_sigmoid_forward

        return pairwise_sigmoid_forward
    return _torch_forward


class _PairwiseSigmoid(torch.autograd.Function):
    @staticmethod
    @_amp.float32_op
    def forward(ctx, chosen, rejected, margin_t, opts: PairwiseOptions, impl: str):
        scale = 1.0 / chosen.shape[0] if opts.reduction == "mean" else 1.0
        loss, dloss_dx, total, metrics = _backend(impl)(chosen, rejected, margin_t, opts.beta, opts.margin, scale)
        ctx.save_for_backward(dloss_dx)
        ctx.scale, ctx.beta = scale, opts.beta
        ctx.dtypes = (chosen.dtype, rejected.dtype, None if margin_t is None else margin_t.dtype)
        ctx.mark_non_differentiable(metrics)
        return (loss if opts.reduction == "none" else total), metrics

    @staticmethod
    @_amp.float32_op
    def backward(ctx, grad_loss, _grad_metrics):
        # x = beta * (chosen - rejected) - margin: d/dchosen = beta, d/drejected = -beta, d/dmargin = -1
        (dloss_dx,) = ctx.saved_tensors
        g = grad_loss.to(torch.float32) * dloss_dx * ctx.scale
        need_c, need_r, need_m = ctx.needs_input_grad[:3]
        c_dtype, r_dtype, m_dtype = ctx.dtypes
        d_chosen = (g * ctx.beta).to(c_dtype) if need_c else None
        d_rejected = (g * -ctx.beta).to(r_dtype) if need_r else None
        d_margin = g.neg().to(m_dtype) if need_m else None
        return d_chosen, d_rejected, d_margin, None, None


def _check_pair_scores(chosen, rejected) -> None:
    _checks.check_float_tensor(chosen, "chosen")
    if not (chosen.dim() == 1 or (chosen.dim() == 2 and chosen.shape[1] == 1)):
        raise ValueError(f"chosen must have shape [B] or [B, 1] (one score per pair), got {tuple(chosen.shape)}")
    _checks.check_float_tensor(rejected, "rejected")
    _checks.check_shape("rejected", rejected, chosen.shape, "the shape of chosen")
    _checks.check_same_device("rejected", rejected, "chosen", chosen)


def _check_margin(margin, chosen: torch.Tensor):
    """``(float margin, per-pair margin tensor or None)``."""
    if margin is None:
        return 0.0, None
    if not isinstance(margin, torch.Tensor):
        return _check_finite("margin", margin), None
    _checks.check_float_tensor(margin, "margin")
    B = chosen.shape[0]
    if tuple(margin.shape) not in ((B,), tuple(chosen.shape)):
        raise ValueError(f"margin must be a number or a tensor of shape [B] = ({B},) or {tuple(chosen.shape)}, "
                         f"got {tuple(margin.shape)}")  # fmt: skip
    _checks.check_same_device("margin", margin, "chosen", chosen)
    return 0.0, margin.reshape(-1)


@_amp.float32_op
def pairwise_sigmoid_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: float | torch.Tensor | None = None,
    beta: float = 1.0,
    reduction: str = "mean",
    impl: str = "auto",
    return_metrics: bool = False,
):
    """Bradley-Terry loss of a reward model: ``-log sigmoid(beta * (chosen - rejected) - margin)`` per pair.

    Args:
        chosen: ``[B]`` scores of the preferred responses, or ``[B, 1]`` (a reward model's output);
            float32, bfloat16 or float16, any strides.
        rejected: scores of the other responses, same shape (any of the three dtypes).
        margin: ``None`` (0), a finite number, or a per-pair tensor of shape ``[B]`` or ``chosen``'s shape
            (e.g. Llama 2's preference-strength margins). A margin tensor that requires grad gets one.
        beta: finite scale of the score difference.
        reduction: ``"mean"`` (needs at least one pair), ``"sum"`` or ``"none"`` (per-pair losses in
            ``chosen``'s shape: ``[B]`` or ``[B, 1]``).
        impl: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``.
        return_metrics: also return the batch statistics the same launch computes (below).

    Returns:
        The float32 loss, differentiable in ``chosen`` and ``rejected`` (gradients in their dtypes); with
        ``return_metrics=True``, ``(loss, metrics)`` where ``metrics`` holds detached float32 scalars,
        named as TRL's reward trainer logs them: ``accuracy``, the fraction of pairs with
        ``chosen > rejected`` (ties count as wrong), and ``margin``, the mean of ``chosen - rejected``
        (the scores' gap: neither ``beta`` nor the ``margin`` argument enters either metric). For an
        empty batch both are NaN. NaN in any pair makes the loss and both metrics NaN.

    Numerically safe: computed as ``max(-x, 0) + log1p(e^(-|x|))``, so pairs 400 apart give a finite
    loss (400 or 0) and gradient.
    """
    _check_pair_scores(chosen, rejected)
    margin_value, margin_t = _check_margin(margin, chosen)
    opts = PairwiseOptions(beta=_check_finite("beta", beta), margin=margin_value, reduction=check_reduction(reduction))
    check_not_empty_for_mean("chosen", chosen, opts.reduction)
    impl = resolve(impl, chosen.device)
    loss, metrics = _PairwiseSigmoid.apply(chosen.reshape(-1), rejected.reshape(-1), margin_t, opts, impl)
    if opts.reduction == "none":
        loss = loss.view(chosen.shape)
    if not return_metrics:
        return loss
    return loss, {"accuracy": metrics[0], "margin": metrics[1]}


# ------------------------------------------------------------------------------------------------- DPO


def _check_sequence_logps(tensors: dict) -> torch.Tensor:
    """The four ``[B]`` log-prob tensors of ``dpo_loss``: float, one shape, one device."""
    (first_name, first), *rest = tensors.items()
    _checks.check_float_tensor(first, first_name)
    if first.dim() != 1:
        raise ValueError(f"{first_name} must have shape [B] (one log-prob per sequence), got {tuple(first.shape)}")
    for name, x in rest:
        _checks.check_float_tensor(x, name)
        _checks.check_shape(name, x, first.shape, f"the shape of {first_name}")
        _checks.check_same_device(name, x, first_name, first)
    return first


def check_dpo_options(beta, loss_type, label_smoothing, reduction) -> tuple[float, str, float, str]:
    beta = _checks.check_positive("beta", beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    eps = _check_finite("label_smoothing", label_smoothing)
    # eps is the assumed probability that a preference label is flipped (conservative DPO): beyond 0.5
    # the data would be more often wrong than right.
    if not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing!r}")
    if eps and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, got it with {loss_type!r}")
    return beta, loss_type, eps, check_reduction(reduction)


@_amp.float32_op
def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss on sequence log-probs: ``(loss, metrics)``.

    With ``delta = (pc - rc) - (pr - rr)`` (policy minus reference log-ratios of chosen and rejected) and
    ``z = beta * delta``, per pair:

    - ``"sigmoid"``: ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`` (``eps = label_smoothing``,
      conservative DPO; ``eps`` in ``[0, 0.5]``)
    - ``"ipo"``: ``(delta - 1 / (2 beta))**2``
    - ``"hinge"``: ``relu(1 - z)``

    Args:
        policy_chosen_logp, policy_rejected_logp: ``[B]`` sequence log-probs under the policy
            (differentiable; gradients in their dtypes).
        ref_chosen_logp, ref_rejected_logp: ``[B]`` the same under the reference model: constants, no
            gradient flows to them.
        beta: positive inverse temperature of the implicit reward.
        loss_type: ``"sigmoid"``, ``"ipo"`` or ``"hinge"``; ``label_smoothing`` must be 0 for the last two.
        reduction: ``"mean"`` (needs at least one pair), ``"sum"`` or ``"none"`` (``[B]``).

    Returns:
        The float32 loss and ``metrics``, detached float32 scalars (means over the pairs, NaN for an
        empty batch): ``chosen_rewards`` (``beta * (pc - rc)``), ``rejected_rewards``
        (``beta * (pr - rr)``), ``reward_accuracy`` (fraction of pairs whose chosen reward is the larger;
        ties count as wrong) and ``reward_margin`` (chosen minus rejected reward).
    """
    first = _check_sequence_logps({
        "policy_chosen_logp": policy_chosen_logp, "policy_rejected_logp": policy_rejected_logp,
        "ref_chosen_logp": ref_chosen_logp, "ref_rejected_logp": ref_rejected_logp,
    })  # fmt: skip
    beta, loss_type, eps, reduction = check_dpo_options(beta, loss_type, label_smoothing, reduction)
    check_not_empty_for_mean("policy_chosen_logp", first, reduction)
    chosen_lr = policy_chosen_logp.float() - ref_chosen_logp.detach().float()
    rejected_lr = policy_rejected_logp.float() - ref_rejected_logp.detach().float()
    delta = chosen_lr - rejected_lr
    if loss_type == "sigmoid":
        z = beta * delta
        losses = -F.logsigmoid(z)
        if eps:  # skipped at eps = 0: 0 * (-inf) at z = +inf would be NaN
            losses = (1.0 - eps) * losses - eps * F.logsigmoid(-z)
    elif loss_type == "ipo":
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = F.relu(1.0 - beta * delta)
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen_lr, beta * rejected_lr
        margins = chosen_rewards - rejected_rewards
        metrics = {
            "chosen_rewards": chosen_rewards.mean(),
            "rejected_rewards": rejected_rewards.mean(),
            "reward_accuracy": ranking_accuracy(margins),
            "reward_margin": margins.mean(),
        }
    return reduce(losses, reduction), metrics
