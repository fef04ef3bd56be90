"""OpenRLHF on rlhf_fast: drop-ins for ``PolicyLoss``, ``log_probs_from_logits`` and ``compute_approx_kl``.

Tested against OpenRLHF 0.11.2 (``pip install --no-deps openrlhf``: ``openrlhf.models`` imports peft and
DeepSpeed, so the tests run the classes and functions of the installed files, not ``import openrlhf``).

- ``PolicyLoss``: ``openrlhf.models.loss.PolicyLoss``'s constructor and ``forward`` (returns ``(loss,
  clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``) on ``rf.ppo_policy_loss``: PPO with
  ``clip_eps_low`` / ``clip_eps_high``, ``dual_clip``, token- or sequence-level aggregation with the
  global figures (``dp_size``, ``batch_num_tokens``, ``global_batch_size``) as OpenRLHF's
  ``aggregate_loss``, and the vLLM-mismatch correction at token level with ratio gating (``clip``: TIS,
  ``mask``: IcePop) as a constant per-token weight. GSPO, sequence-level correction and the divergence
  gates wait for the loss modes of issue 14: they raise ``ValueError`` naming the argument (use
  OpenRLHF's own class for them). OpenRLHF clamps the log-ratio to [-20, 20] before ``exp``; we do not
  (a ratio beyond e^20 is clipped by the trust region either way; only its unclipped side differs).
- ``log_probs_from_logits(logits, labels, temperature=1.0, *, return_entropy=False)``: ``rf.logprobs``,
  entropy from the same pass (OpenRLHF computes it separately under ``torch.compile``), float32 out,
  and the caller's logits are not divided in place.
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
        if policy_loss_type != "ppo":
            raise ValueError(f"policy_loss_type={policy_loss_type!r}: rlhf_fast's PolicyLoss has 'ppo' (GSPO waits "
                             "for issue 14); use openrlhf.models.loss.PolicyLoss")  # fmt: skip
        if is_correction_level not in ("off", "token"):
            raise ValueError(f"is_correction_level={is_correction_level!r}: rlhf_fast's PolicyLoss has 'off' and "
                             "'token'; use openrlhf.models.loss.PolicyLoss")  # fmt: skip
        if is_correction_gating != "ratio":
            raise ValueError(f"is_correction_gating={is_correction_gating!r}: rlhf_fast's PolicyLoss gates on "
                             "the ratio; use openrlhf.models.loss.PolicyLoss")  # fmt: skip
        if is_correction_mode not in ("mask", "clip"):
            raise ValueError(f"is_correction_mode must be 'mask' or 'clip', got {is_correction_mode!r}")
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.token_level_loss = token_level_loss
        self.is_correction_level, self.is_correction_mode = is_correction_level, is_correction_mode
        self.is_correction_threshold = tuple(is_correction_threshold)

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size: int = 1,
                batch_num_tokens=None, global_batch_size=None):  # fmt: skip
        if action_mask is None:
            action_mask = torch.ones_like(log_probs)
        m = action_mask.to(torch.float32)
        is_weights = vllm_kl = is_filter_ratio = None
        if self.is_correction_level == "token":
            if rollout_log_probs is None:
                raise ValueError("rollout_log_probs is required with is_correction_level='token'")
            low, high = self.is_correction_threshold
            token_is = torch.exp((old_log_probs.float() - rollout_log_probs.float()).detach())  # pi_train / pi_rollout
            if self.is_correction_mode == "clip":  # truncated IS
                is_weights, filtered = token_is.clamp(low, high), (token_is < low) | (token_is > high)
            else:  # IcePop: tokens outside the band dropped, the others keep their IS weight
                keep = (token_is >= low) & (token_is <= high)
                is_weights, filtered = torch.where(keep, token_is, 0.0), ~keep
            is_filter_ratio = (filtered.float() * m).sum() / m.sum()
            vllm_kl = ((rollout_log_probs.float() - old_log_probs.float()) * m).sum() / m.sum()
        agg, factor = _aggregate_scale(action_mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        loss, metrics = rf.ppo_policy_loss(log_probs, old_log_probs, advantages, action_mask, clip_low=self.clip_eps_low,
                                           clip_high=self.clip_eps_high, dual_clip=self.dual_clip, agg=agg,
                                           is_weights=is_weights)  # fmt: skip
        return loss * factor, metrics["clipfrac"], metrics["approx_kl"], vllm_kl, is_filter_ratio


def log_probs_from_logits(logits, labels, temperature: float = 1.0, *, return_entropy: bool = False):
    """OpenRLHF's ``log_probs_from_logits`` on ``rf.logprobs``; with ``return_entropy=True``, ``(log_probs,
    entropy)`` of ``softmax(logits / temperature)`` from the same pass (float32)."""
    return rf.logprobs(logits, labels, temperature=temperature, return_entropy=return_entropy)


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
