"""Plain PyTorch reference implementations: the eager composition trainers write today.

Tests call them on float64 inputs as the ground truth; benchmarks call them in the input dtype as the
"PyTorch eager" baseline (and ``torch.compile`` them for the compiled baseline). They build every
``[N, V]`` intermediate on purpose: that is what the fused ops are measured against.
"""

from typing import NamedTuple

import torch


def logprobs_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    mask_zero_probs: bool = True,
):
    """``(logp, entropy)`` by ``log_softmax(logits.float() / T).gather`` and entropy via the softmax.

    Float64 input is kept in float64 (the test reference); lower precisions are upcast to float32 as
    trainers do. ``mask_zero_probs`` sets the ``0 * -inf`` terms of masked vocabulary entries to 0;
    without it (the usual trainer code, used as the benchmark baseline) such rows give NaN entropy.
    """
    x = logits if logits.dtype == torch.float64 else logits.float()
    logp_all = torch.log_softmax(x / temperature, dim=-1)
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    if mask_zero_probs:
        # where() before the product, so that autograd never forms 0 * -inf either
        logp_all = torch.where(logp_all == -float("inf"), 0.0, logp_all)
        plogp = torch.softmax(x / temperature, dim=-1) * logp_all
    else:
        plogp = logp_all.exp() * logp_all
    return logp, -plogp.sum(-1)


def full_kl_reference(logits, ref_logits, *, temperature: float = 1.0, mask_zero_probs: bool = True,
                      dtype: torch.dtype | None = None):  # fmt: skip
    """Per row ``KL(softmax(logits / T) || softmax(ref_logits / T))`` over the last dimension, by
    ``log_softmax`` of both: in ``dtype`` (default: float64 input stays float64, anything else float32, as
    trainers do). ``mask_zero_probs`` gives the terms of zero-probability entries 0 (``p * log p`` with
    ``p = 0``) before the product, so neither the value nor autograd meets ``0 * inf``; without it, the
    plain ``(exp(log_p) * (log_p - log_q)).sum(-1)`` trainers write (the benchmark baseline)."""
    dtype = dtype or (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    x, y = logits.to(dtype), ref_logits.to(dtype)
    if temperature != 1.0:
        x, y = x / temperature, y / temperature
    log_p, log_q = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    if mask_zero_probs:
        return (torch.softmax(x, -1) * torch.where(log_p == -float("inf"), 0.0, log_p - log_q)).sum(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_penalty_reference(logp, ref_logp, estimator: str):
    """k1 / k2 / k3 / abs of ``lr = logp - ref_logp``, straight from their definitions."""
    lr = logp - ref_logp
    return {"k1": lr, "k2": 0.5 * lr**2, "k3": torch.exp(-lr) - 1 + lr, "abs": lr.abs()}[estimator]


def aggregate_reference(values, mask, agg: str):
    """The four aggregation modes, written out as docs/API.md states them."""
    m = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    masked = torch.where(m > 0, values, 0.0)
    B, T = values.shape
    row_tokens = m.sum(1)
    rows = row_tokens > 0
    if agg == "token-mean":
        return masked.sum() / m.sum()
    if agg == "seq-mean-token-mean":
        return (masked.sum(1)[rows] / row_tokens[rows]).mean()
    if agg == "seq-mean-token-sum":
        return masked.sum(1)[rows].mean()
    if agg == "seq-mean-token-sum-norm":
        return masked.sum() / (B * T)
    raise ValueError(f"unknown agg {agg!r}")


class Surrogate(NamedTuple):
    loss: torch.Tensor  # [B, T] per-token clipped surrogate (dual clip applied)
    ratio: torch.Tensor  # exp(logp - old_logp)
    advantages: torch.Tensor  # [B, T] (a [B] advantage broadcast over T)
    clipped: torch.Tensor  # -A * clamp(ratio, 1 - clip_low, 1 + clip_high): clipfrac counts where it wins


def clipped_surrogate_reference(logp, old_logp, advantages, *, clip_low=0.2, clip_high=None, dual_clip=None):
    """PPO's per-token ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``, with the dual clip ``min(., -A c)``
    where ``A < 0``; ``advantages`` ``[B, T]`` or ``[B]`` (one per sequence)."""
    adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1).expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    high = clip_low if clip_high is None else clip_high
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + high)
    token = torch.maximum(-adv * ratio, clipped)
    if dual_clip is not None:
        token = torch.where(adv < 0, torch.minimum(token, -adv * dual_clip), token)
    return Surrogate(token, ratio, adv, clipped)


def ppo_loss_reference(
    logits,
    labels,
    old_logp,
    advantages,
    mask=None,
    *,
    ref_logp=None,
    kl_coef=0.0,
    kl_estimator="k3",
    entropy_coef=0.0,
    temperature=1.0,
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    agg="token-mean",
    ignore_index=-100,
    mask_zero_probs=True,
):
    """The PPO policy loss as trainers compose it (TRL / verl / OpenRLHF style), every step a PyTorch op.

    log_softmax of the upcast logits -> gathered log-probs and entropy -> ratio -> clipped surrogate
    (dual clip) -> KL penalty against ``ref_logp`` -> entropy bonus -> aggregation. Returns the loss.
    """
    logp, entropy = logprobs_reference(
        logits, labels, temperature=temperature, ignore_index=ignore_index, mask_zero_probs=mask_zero_probs
    )
    token = clipped_surrogate_reference(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high,
                                        dual_clip=dual_clip).loss  # fmt: skip
    if ref_logp is not None:
        token = token + kl_coef * kl_penalty_reference(logp, ref_logp, kl_estimator)
    token = token - entropy_coef * entropy
    return aggregate_reference(token, mask, agg)


# ------------------------------------------------------------------------------------ preference losses


def _reduce_reference(losses, reduction: str):
    return {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}[reduction]()


def pairwise_sigmoid_loss_reference(chosen, rejected, *, margin=None, beta=1.0, reduction="mean"):
    """TRL's reward-model loss ``-logsigmoid(rewards_chosen - rewards_rejected - margin)``, with ``beta``.

    In the input dtype, as TRL computes it on the reward model's output (the "plain PyTorch in the same
    dtype" bar for bf16/fp16; float64 input gives the ground truth). A per-pair ``margin`` tensor of
    shape ``[B]`` is laid out like ``chosen`` (``[B, 1]`` scores minus a ``[B]`` margin would broadcast
    to ``[B, B]``).
    """
    x = beta * (chosen - rejected)
    if margin is not None:
        x = x - (margin.reshape(chosen.shape) if isinstance(margin, torch.Tensor) else margin)
    return _reduce_reference(-torch.nn.functional.logsigmoid(x), reduction)


def dpo_loss_reference(
    policy_chosen_logp,
    policy_rejected_logp,
    ref_chosen_logp,
    ref_rejected_logp,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    reduction="mean",
):
    """``(loss, metrics)`` as TRL's ``DPOTrainer.dpo_loss`` writes them (TRL 1.x: the chosen log-ratio minus
    the rejected one), in the input dtype."""
    chosen_logratios = policy_chosen_logp - ref_chosen_logp.detach()
    rejected_logratios = policy_rejected_logp - ref_rejected_logp.detach()
    logits = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        z = beta * logits
        losses = -torch.nn.functional.logsigmoid(z) * (1 - label_smoothing) - torch.nn.functional.logsigmoid(-z) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    chosen_rewards = beta * (policy_chosen_logp - ref_chosen_logp).detach()
    rejected_rewards = beta * (policy_rejected_logp - ref_rejected_logp).detach()
    metrics = {
        "chosen_rewards": chosen_rewards.mean(),
        "rejected_rewards": rejected_rewards.mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
    }
    return _reduce_reference(losses, reduction), metrics


def sequence_logprobs_reference(logits, labels, *, temperature=1.0, ignore_index=-100, average=False):
    """TRL's ``get_batch_logps``: ``log_softmax`` of the upcast logits, gathered, masked, summed over T.

    With ``average=True`` the sum is divided by the number of valid tokens, clamped to 1 so that a row
    without any gives 0 as ``rf.sequence_logprobs`` defines (TRL's 0 / 0 would be NaN).
    """
    x = logits if logits.dtype == torch.float64 else logits.float()
    valid = labels != ignore_index
    logp_all = torch.log_softmax(x / temperature, dim=-1)
    token = logp_all.gather(-1, labels.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1)
    total = torch.where(valid, token, 0.0).sum(-1)  # not token * valid: a -inf at an ignored slot is NaN
    return total / valid.sum(-1).clamp(min=1) if average else total


def linear_dpo_loss_reference(
    hidden,
    weight,
    labels,
    ref_chosen_logp,
    ref_rejected_logp,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    ignore_index=-100,
    average_log_prob=False,
    bias=None,
    reduction="mean",
):
    """The model's lm_head builds the ``[2B, T, V]`` logits, then TRL's sequence log-probs and DPO loss."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    seq = sequence_logprobs_reference(logits, labels, ignore_index=ignore_index, average=average_log_prob)
    B = hidden.shape[0] // 2
    return dpo_loss_reference(
        seq[:B], seq[B:], ref_chosen_logp, ref_rejected_logp,
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, reduction=reduction,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- GAE


def gae_reference(rewards, values, mask=None, *, gamma: float, lam: float, skip_holes: bool = True):
    """``(advantages, returns)`` by the reverse loop over T on ``[B]`` columns that trainers write.

    Float64 input is kept in float64 (the test reference); lower precisions are upcast to float32.

    - ``skip_holes=True`` (``rf.gae``'s semantics, verl's loop): ``V`` and ``A`` of the next *response* token
      are carried across masked positions, so a masked span inside a response (a tool output) joins the
      tokens on either side; both outputs are 0 where ``mask == 0``. Nothing at a masked position (not even
      NaN) reaches the result: the carry is a ``where``, not a product with the mask.
    - ``skip_holes=False``: TRL's / OpenRLHF's loop, rewards and values multiplied by the mask first, then
      every position is a step (a hole is a zero-reward, zero-value step); the outputs are returned as that
      loop returns them, not zeroed (right padding gives 0 there anyway, left padding does not).
    """
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    rewards, values = rewards.to(dtype), values.to(dtype)
    B, T = rewards.shape
    if not skip_holes:
        if mask is not None:
            values, rewards = values * mask, rewards * mask
        last = torch.zeros_like(rewards[:, 0])
        out = []
        for t in reversed(range(T)):
            next_v = values[:, t + 1] if t < T - 1 else 0.0
            last = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * last
            out.append(last)
        adv = torch.stack(out[::-1], dim=1) if T else torch.zeros_like(rewards)
        return adv, adv + values
    on = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask != 0
    next_v, next_adv = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for t in reversed(range(T)):
        a = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * next_adv
        adv[:, t] = torch.where(on[:, t], a, 0.0)
        ret[:, t] = torch.where(on[:, t], a + values[:, t], 0.0)
        next_v = torch.where(on[:, t], values[:, t], next_v)
        next_adv = torch.where(on[:, t], a, next_adv)
    return adv, ret


# ------------------------------------------------------------------------------------ truncated sampling


def _per_row_reference(value, row_shape, off, dtype):
    """A truncation argument (number, ``None``, or a tensor of a leading part of ``row_shape``) as ``[N]``."""
    n = 1
    for s in row_shape:
        n *= s
    if value is None:
        return torch.full((n,), off, dtype=dtype)
    if not isinstance(value, torch.Tensor):
        return torch.full((n,), value, dtype=dtype)
    v = value.detach().cpu().to(dtype)
    if v.dim() == 1 and v.numel() == n:
        return v
    return v.reshape(tuple(v.shape) + (1,) * (len(row_shape) - v.dim())).expand(tuple(row_shape)).reshape(n)


def truncation_keep_reference(z, top_k, top_p, min_p, sampler: str = "vllm") -> torch.Tensor:
    """Bool ``[N, V]`` mask of the tokens each sampler keeps, for float64 ``z = logits / T`` and per-row
    ``[N]`` ``top_k`` (0 or >= V: off), ``top_p`` (1: off), ``min_p`` (0: off), by the sorters' own steps:

    - min-p: ``softmax`` over what is still kept, drop ``p_v < min_p * max p`` (vLLM v1's min-p logits
      processor; transformers' ``MinPLogitsWarper``);
    - top-k: sort what is still kept, drop values below the k-th largest (ties at the k-th value kept);
    - top-p: ascending sort of what is still kept, softmax, cumulative sum, drop ``cum <= 1 - p`` but never
      the largest; then every token tied in value with a kept one is kept too (a sort splits tied tokens
      in an arbitrary order: this reference, like the ops, keeps the whole tie).

    ``sampler="vllm"``: min-p, top-k, top-p. ``"hf"``: top-k, top-p, min-p.
    """
    N, V = z.shape
    z = z.detach().to(torch.float64)
    neg = torch.tensor(-float("inf"), dtype=torch.float64)
    keep = torch.ones(N, V, dtype=torch.bool)

    def min_p_step(keep):
        probs = torch.softmax(torch.where(keep, z, neg), -1)
        cut = probs < min_p.unsqueeze(-1) * probs.amax(-1, keepdim=True)
        return keep & ~(cut & (min_p > 0).unsqueeze(-1))

    def top_k_step(keep):
        zk = torch.where(keep, z, neg)
        on = (top_k > 0) & (top_k < V)
        kth = zk.sort(-1, descending=True).values.gather(-1, (top_k.clamp(1, V) - 1).unsqueeze(-1))
        return keep & ~((zk < kth) & on.unsqueeze(-1))

    def top_p_step(keep):
        zk = torch.where(keep, z, neg)
        sorted_z, order = zk.sort(dim=-1, stable=True)  # ascending
        cum = torch.softmax(sorted_z, -1).cumsum(-1)
        drop_sorted = cum <= (1 - top_p).unsqueeze(-1)
        drop_sorted[:, -1] = False
        kept_sorted = ~drop_sorted & (sorted_z > -float("inf"))
        lowest_kept = torch.where(kept_sorted, sorted_z, torch.tensor(float("inf"), dtype=torch.float64)).amin(-1)
        on = (top_p < 1).unsqueeze(-1)
        return keep & ~((zk < lowest_kept.unsqueeze(-1)) & on)

    steps = (min_p_step, top_k_step, top_p_step) if sampler == "vllm" else (top_k_step, top_p_step, min_p_step)
    for step in steps:
        keep = step(keep)
    return keep


def truncated_logprobs_reference(logits, labels, *, temperature=1.0, top_k=None, top_p=None, min_p=None,
                                 sampler="vllm", ignore_index=-100):  # fmt: skip
    """Float64 ``(logp, entropy)`` of the truncated, renormalised ``softmax(logits / T)`` (differentiable in
    ``logits``): ``log_softmax`` over the kept tokens (``truncation_keep_reference``), ``-inf`` (a constant,
    no gradient) for a label outside the kept set, 0 for ``ignore_index``; the entropy over the kept set."""
    row_shape = tuple(logits.shape[:-1])
    V = logits.shape[-1]
    z = (logits.to(torch.float64) / temperature).reshape(-1, V)
    keep = truncation_keep_reference(
        z.cpu(),
        _per_row_reference(top_k, row_shape, 0, torch.int64),
        _per_row_reference(top_p, row_shape, 1.0, torch.float64),
        _per_row_reference(min_p, row_shape, 0.0, torch.float64),
        sampler,
    ).to(z.device)
    logp_all = torch.log_softmax(z.masked_fill(~keep, -float("inf")), -1)
    flat = labels.reshape(-1)
    ignored = flat == ignore_index
    safe = flat.masked_fill(ignored, 0).unsqueeze(-1)
    logp = logp_all.gather(-1, safe).squeeze(-1)
    missed = ~keep.gather(-1, safe).squeeze(-1)
    logp = torch.where(missed, torch.full_like(logp, -float("inf")).detach(), logp)
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    plogp = torch.softmax(z.masked_fill(~keep, -float("inf")), -1) * torch.where(keep, logp_all, 0.0)
    return logp.reshape(row_shape), -plogp.sum(-1).reshape(row_shape)
