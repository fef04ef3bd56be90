"""OpenRLHF on rlhf_fast: drop-ins for ``PolicyLoss``, ``log_probs_from_logits`` and ``compute_approx_kl``.

Tested against OpenRLHF 0.11.2 (``pip install --no-deps openrlhf``: ``openrlhf.models`` imports peft and
DeepSpeed, so the tests run the classes and functions of the installed files, not ``import openrlhf``).

- ``PolicyLoss``: ``openrlhf.models.loss.PolicyLoss``'s constructor (and its checks) and ``forward`` (returns
  ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``) on ``rf.ppo_policy_loss``, for every option of
  OpenRLHF 0.11.2: ``policy_loss_type`` ``"ppo"`` (clipped at ``clip_eps_low`` / ``clip_eps_high``, with the
  ``dual_clip``) or ``"gspo"`` (``loss_mode="gspo"``: the sequence's geometric-mean ratio, aggregated per
  sequence, against the rollout policy's log-probs when a correction level is set, as OpenRLHF);
  token- or sequence-level aggregation with the global figures (``dp_size``, ``batch_num_tokens``,
  ``global_batch_size``) as OpenRLHF's ``aggregate_loss``; and with PPO, the vLLM-mismatch correction as a
  constant per-token weight, at ``is_correction_level`` ``"token"`` or ``"seq"`` (the gate reads each
  row's mean statistic), gated on the ratio (``clip``: TIS; ``mask``: IcePop, or the sequence mask) or on
  the ``binary_kl`` / ``tv`` divergence of the sampled token's probabilities (``mask``). One condition:
  OpenRLHF's GSPO differentiates each row's ratio as a whole, ours each token's own term, which agree when
  every token of a row has the same advantage (GRPO's case) and ``action_mask`` is 0/1; other inputs raise a
  ``ValueError`` naming ``advantages`` / ``action_mask`` (use OpenRLHF's own class for per-token
  advantages). OpenRLHF clamps the PPO log-ratio to [-20, 20] before ``exp``; we do not (a ratio beyond
  e^20 is clipped by the trust region either way; only its unclipped side differs).
- ``log_probs_from_logits(logits, labels, temperature=1.0, *, return_entropy=False)``: ``rf.logprobs``,
  entropy from the same pass (OpenRLHF computes it separately under ``torch.compile``), float32 out,
  and the caller's logits are not divided in place; ``top_k`` / ``top_p`` / ``min_p`` give the truncated
  distribution's (the one OpenRLHF's vLLM rollouts sample from), off by default.
- ``compute_approx_kl``: OpenRLHF's estimators k1 / k2 / k3 (clamped to [-10, 10]) and its
  ``unbiased_gradient`` straight-through, on ``rf.kl_penalty``.

Where they plug in (OpenRLHF binds them by name at import): ``openrlhf/models/actor.py``
(``log_probs_from_logits``, ``compute_entropy`` in ``Actor.forward``), ``openrlhf/trainer/ray/ppo_actor.py``
(``PolicyLoss``, ``compute_approx_kl``), ``openrlhf/trainer/ppo_utils/experience_maker.py``
(``compute_approx_kl``): an ``Actor`` / PPO-actor subclass that calls these instead, or the imports in
those files pointed here.
"""

import torch

import rlhf_fast as rf
from rlhf_fast.rl_losses import masked_mean

KL_IS_WEIGHT_CLIP = 10.0  # openrlhf/models/utils.py (0.11.2): the cap of the IS weight of the unbiased KL gradient


def _aggregate_scale(mask: torch.Tensor, token_level_loss: bool, dp_size, batch_num_tokens, global_batch_size):
    """``(agg, factor)``: OpenRLHF's ``aggregate_loss`` = ``factor * rf.aggregate(L, mask, agg=agg)``.

    token level: ``sum(m L) / batch_num_tokens * dp`` (``sum m`` and no ``dp`` when not given);
    sequence level: the rows' token means (rows with a token) summed ``/ global_batch_size * dp``
    (their mean when not given)."""
    m = mask.to(torch.float32)
    if token_level_loss:
        if batch_num_tokens is None:
            return "token-mean", 1.0
        return "token-mean", m.sum() * dp_size / batch_num_tokens
    if global_batch_size is None:
        return "seq-mean-token-mean", 1.0
    return "seq-mean-token-mean", (m.sum(-1) > 0).sum() * dp_size / global_batch_size


class PolicyLoss(torch.nn.Module):
    """Drop-in for ``openrlhf.models.loss.PolicyLoss`` on ``rf.ppo_policy_loss`` (module docstring)."""

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold: list = (0.5, 5.0)) -> None:  # fmt: skip
        super().__init__()
        # OpenRLHF's own checks (its constructor; an unknown policy_loss_type fails there in forward)
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"policy_loss_type must be 'ppo' or 'gspo', got {policy_loss_type!r}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if is_correction_level not in ("off", "token", "seq"):
            raise ValueError(f"is_correction_level must be 'off', 'token' or 'seq', got {is_correction_level!r}")
        if is_correction_mode not in ("mask", "clip"):
            raise ValueError(f"is_correction_mode must be 'mask' or 'clip', got {is_correction_mode!r}")
        if is_correction_gating not in ("ratio", "binary_kl", "tv"):
            raise ValueError(f"is_correction_gating must be 'ratio', 'binary_kl' or 'tv', got {is_correction_gating!r}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode='clip' needs is_correction_level='token' and is_correction_gating="
                             "'ratio' (only the token ratio is a weight to clamp; the others gate)")  # fmt: skip
        low, high = is_correction_threshold
        if is_correction_gating != "ratio" and is_correction_level != "off" and low > 0:
            raise ValueError(f"is_correction_threshold: is_correction_gating={is_correction_gating!r} takes an upper "
                             f"bound only (a lower bound <= 0), got {tuple(is_correction_threshold)}")  # fmt: skip
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"  # GSPO: per-sequence mean
        self.is_correction_level, self.is_correction_mode = is_correction_level, is_correction_mode
        self.is_correction_gating, self.is_correction_threshold = is_correction_gating, (low, high)

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size: int = 1,
                batch_num_tokens=None, global_batch_size=None):  # fmt: skip
        if action_mask is None:
            action_mask = torch.ones_like(log_probs)
        m = action_mask.to(torch.float32)
        if self.is_correction_level != "off" and rollout_log_probs is None:
            raise ValueError(f"rollout_log_probs is required with is_correction_level={self.is_correction_level!r}")
        agg, factor = _aggregate_scale(action_mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        options = {"clip_low": self.clip_eps_low, "clip_high": self.clip_eps_high, "dual_clip": self.dual_clip,
                   "agg": agg}  # fmt: skip
        if self.policy_loss_type == "gspo":
            # OpenRLHF's GSPO ratio is exp(the row's mean log-ratio), against the rollout policy when a correction
            # level is set (then no IS weight); rf's loss_mode="gspo" has its value, and its gradient where every
            # token of a row has the same advantage
            _check_gspo_inputs(advantages, m)
            base = old_log_probs if self.is_correction_level == "off" else rollout_log_probs
            loss, metrics = rf.ppo_policy_loss(log_probs, base, advantages, action_mask, loss_mode="gspo", **options)
            ppo_kl = masked_mean((old_log_probs.float() - log_probs.float()).detach(), m)
            return loss * factor, metrics["clipfrac"], ppo_kl, None, None
        is_weights = vllm_kl = is_filter_ratio = None
        if self.is_correction_level != "off":
            is_weights, is_filter_ratio = self._correction_weights(old_log_probs, rollout_log_probs, m)
            vllm_kl = masked_mean(rollout_log_probs.float() - old_log_probs.float(), m)
        loss, metrics = rf.ppo_policy_loss(log_probs, old_log_probs, advantages, action_mask, is_weights=is_weights,
                                           **options)  # fmt: skip
        return loss * factor, metrics["clipfrac"], metrics["approx_kl"], vllm_kl, is_filter_ratio

    @torch.no_grad()
    def _correction_weights(self, old_log_probs, rollout_log_probs, m):
        """OpenRLHF's train/rollout mismatch correction as constant per-token weights (``openrlhf/models/loss.py``,
        0.11.2, ``PolicyLoss.forward``): a statistic per token, or its mean over each row (``seq``), of the
        ratio ``pi_train / pi_rollout`` (``gating="ratio"``; the row's geometric mean at ``seq`` level) or
        of a divergence between the two sampled-token probabilities ``p`` (rollout) and ``q`` (train), both
        clamped to ``[1e-6, 1 - 1e-6]`` (``binary_kl``: ``p log(p/q) + (1-p) log((1-p)/(1-q))``; ``tv``:
        ``|p - q|``); ``clip``: the weight is the token ratio clamped to the band; ``mask``: the token ratio
        where the statistic lies in the band, 0 elsewhere. ``(weights, filtered fraction)``: the fraction is
        over tokens, or over rows (all of them) at ``seq`` level."""
        low, high = self.is_correction_threshold
        on = m != 0
        old = torch.where(on, old_log_probs.float(), 0.0)
        rollout = torch.where(on, rollout_log_probs.float(), 0.0)
        token_is = torch.exp(old - rollout)
        if self.is_correction_gating == "ratio":
            stat = old - rollout
        else:
            p, q = rollout.exp().clamp(1e-6, 1 - 1e-6), old.exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "tv":
                stat = (p - q).abs()
            else:
                stat = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
        seq_level = self.is_correction_level == "seq"
        if seq_level:
            count = m.sum(-1, keepdim=True)
            stat = (m * stat).sum(-1, keepdim=True) / count.clamp(min=torch.finfo(torch.float32).tiny)
        if self.is_correction_gating == "ratio":
            stat = stat.exp()
        if self.is_correction_mode == "clip":  # token level, ratio gating: truncated IS
            return stat.clamp(low, high), masked_mean(((stat < low) | (stat > high)).float(), m)
        keep = (stat >= low) & (stat <= high)
        if seq_level:
            keep = keep & (count > 0)  # OpenRLHF: an empty row's mean is NaN, outside any band
            return torch.where(keep, token_is, 0.0), (~keep).float().mean()
        return torch.where(keep, token_is, 0.0), masked_mean((~keep).float(), m)


def _check_gspo_inputs(advantages: torch.Tensor, m: torch.Tensor) -> None:
    """``ValueError`` unless ``advantages`` are constant along each row's tokens and ``action_mask`` is 0/1:
    OpenRLHF's GSPO differentiates the row's ratio as a whole (each token's gradient is the row's mean
    advantage term) and multiplies the ratio by the mask, while rf's ``gspo`` gives each token its own
    advantage's term: the two agree exactly in value, and in gradient under those two conditions."""
    on = m != 0
    adv = advantages.to(torch.float32)
    if adv.dim() == 1:
        return
    hi = torch.where(on, adv, -torch.inf).amax(-1)
    lo = torch.where(on, adv, torch.inf).amin(-1)
    bad_adv, bad_mask = torch.stack([(on.any(-1) & (hi != lo)).any(), (on & (m != 1)).any()]).tolist()
    if bad_adv:
        raise ValueError("advantages: policy_loss_type='gspo' on rlhf_fast needs one advantage per sequence (constant "
                         "over each row's action_mask; OpenRLHF's GSPO gradient differs otherwise); use "
                         "openrlhf.models.loss.PolicyLoss for per-token advantages")  # fmt: skip
    if bad_mask:
        raise ValueError("action_mask: policy_loss_type='gspo' on rlhf_fast needs a 0/1 action_mask "
                         "(OpenRLHF multiplies the sequence ratio by it)")  # fmt: skip


def log_probs_from_logits(logits, labels, temperature: float = 1.0, *, return_entropy: bool = False,
                          top_k=None, top_p=None, min_p=None, sampler: str = "vllm"):  # fmt: skip
    """OpenRLHF's ``log_probs_from_logits`` on ``rf.logprobs``; with ``return_entropy=True``, ``(log_probs,
    entropy)`` of ``softmax(logits / temperature)`` from the same pass (float32). ``top_k`` / ``top_p`` /
    ``min_p`` (OpenRLHF's ``--top_k`` / ``--top_p`` of its vLLM rollouts; ``sampler="vllm"``): those of the
    truncated distribution the rollout sampled from (``-inf`` for a token outside the kept set: mask it out
    of ``action_mask`` before the loss). Off by default, as OpenRLHF."""
    return rf.logprobs(logits, labels, temperature=temperature, return_entropy=return_entropy, top_k=top_k,
                       top_p=top_p, min_p=min_p, sampler=sampler)  # fmt: skip


def compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator: str = "k1",
                      unbiased_gradient: bool = False):  # fmt: skip
    """OpenRLHF's ``compute_approx_kl`` on ``rf.kl_penalty``: k1 / k2 / k3 of ``log_probs - log_probs_base``
    clamped to [-10, 10] (k3's log-ratio first bounded below at -10, as OpenRLHF does)."""
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {kl_estimator!r}")
    lr = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k3":
        lr = lr.clamp(min=-10.0)
    value = rf.kl_penalty(lr, torch.zeros_like(lr), estimator=kl_estimator).clamp(-10.0, 10.0)
    if not unbiased_gradient:
        return value
    # straight-through: the estimator's value, the gradient of w * k2 (w the clamped, detached IS weight)
    w = 1.0
    if log_probs_old is not None:
        w = torch.exp(log_probs.float() - log_probs_old.float()).clamp(max=KL_IS_WEIGHT_CLIP).detach()
    surrogate = w * rf.kl_penalty(log_probs, log_probs_base, estimator="k2")
    return value.detach() + surrogate - surrogate.detach()
