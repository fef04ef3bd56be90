"""The ``ops="fused" | "reference"`` switch of the trainers: the same loop on our fused ops or on plain PyTorch.

Every trainer computes its losses through one of these two objects, so a run with ``ops="reference"`` is the
identical loop (same data, same sampling, same optimiser steps) with the hot spots done the way TRL / verl /
OpenRLHF do them: the model's full ``[B, L, V]`` logits, ``log_softmax`` upcast to float32, ``gather``,
entropy from the softmax, the PPO formulas as separate ops, GAE as a Python loop over T. Comparing the two
runs' tokens/s and peak memory measures what the fused ops buy, one to one.

- ``FusedOps``: ``rf.linear_logprobs`` from the final hidden states and the lm_head weight (the logits are
  never built; ``skip_ignored=True`` except in ``sft_nll``: prompt and padding rows cost no lm_head work),
  ``rf.ppo_policy_loss`` / ``rf.kl_penalty`` on the result, or with the exact KL in the loss,
  ``rf.ppo_loss_from_logits`` + ``rf.full_kl`` on the response positions' logits; ``rf.gae``,
  ``rf.value_loss``, ``rf.pairwise_sigmoid_loss``, ``rf.linear_dpo_loss`` (also ``skip_ignored=True``).
- ``ReferenceOps``: ``rlhf_fast.reference`` and plain PyTorch.

Position convention: ``input_ids [B, L]`` holds ``P`` prompt tokens (left-padded) then ``R`` response tokens;
response token ``t`` (column ``P + t``) is predicted at column ``P + t - 1``, so the response's predicting
positions are columns ``P - 1 .. L - 2``.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import rlhf_fast as rf

from .. import reference
from .models import lm_hidden_states

OPS = ("fused", "reference")
KL_MODES = ("reward", "k3_loss", "full_kl_loss")


@dataclass(frozen=True)
class PolicyLossConfig:
    """The PPO policy-loss options both op sets take (see ``rlhf_fast.train.ppo.Config``)."""

    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    agg: str = "token-mean"
    entropy_coef: float = 0.0
    kl_mode: str = "reward"  # "reward": the KL is in the rewards; "k3_loss" / "full_kl_loss": in the loss
    kl_coef: float = 0.0


def get_ops(name: str):
    """``FusedOps()`` or ``ReferenceOps()`` by name."""
    if name == "fused":
        return FusedOps()
    if name == "reference":
        return ReferenceOps()
    raise ValueError(f"ops must be one of {OPS}, got {name!r}")


def _response_labels(response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return response_ids.masked_fill(response_mask == 0, -100)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float32)
    return (x.detach().float() * m).sum() / m.sum().clamp(min=1.0)


class FusedOps:
    name = "fused"

    # ---------------------------------------------------------------------------------- log-probs

    def response_logprobs(self, model, input_ids, attention_mask, response_mask, *, temperature=1.0,
                          return_entropy=False):  # fmt: skip
        """``(logp [B, R], entropy [B, R] or None)`` of the response tokens, without building logits."""
        R = response_mask.shape[1]
        hidden, weight, bias = lm_hidden_states(model, input_ids, attention_mask)
        labels = _response_labels(input_ids[:, -R:], response_mask)
        out = rf.linear_logprobs(hidden[:, -R - 1 : -1], weight, labels, bias=bias, temperature=temperature,
                                 return_entropy=return_entropy, skip_ignored=True)  # fmt: skip
        return out if return_entropy else (out, None)

    def response_logits(self, model, input_ids, attention_mask, R: int) -> torch.Tensor:
        """``[B, R, V]`` logits at the response's predicting positions only (not the prompt's)."""
        hidden, weight, bias = lm_hidden_states(model, input_ids, attention_mask)
        return F.linear(hidden[:, -R - 1 : -1], weight, bias)

    def sequence_logprobs(self, model, input_ids, attention_mask, labels, *, average=False):
        """``[B]`` sum (or mean) of the log-probs of the tokens of ``labels`` (``-100`` = not scored)."""
        hidden, weight, bias = lm_hidden_states(model, input_ids, attention_mask)
        logp = rf.linear_logprobs(hidden[:, :-1], weight, labels[:, 1:], bias=bias, skip_ignored=True)
        return _sum_tokens(logp, labels[:, 1:] != -100, average)

    # --------------------------------------------------------------------------------------- losses

    def sft_nll(self, model, input_ids, attention_mask, labels):
        """``(sum of -log p, number of tokens)`` over the ``labels`` tokens (``-100``: none), next-token shifted."""
        hidden, weight, bias = lm_hidden_states(model, input_ids, attention_mask)
        # Not skip_ignored: the same forward values, but the gradients' last bits change (the weight gradient sums
        # over other rows), and 60 SFT steps then 300 reward-model steps from that model took the held-out
        # accuracy of test_reward_model_learns_preferences from above its 0.62 bar to 0.594.
        logp = rf.linear_logprobs(hidden[:, :-1], weight, labels[:, 1:], bias=bias)
        return -logp.sum(), (labels[:, 1:] != -100).sum()

    def policy_loss(self, model, batch: dict, cfg: PolicyLossConfig, ref_model=None):
        """PPO policy loss of a minibatch and its metrics (``clipfrac``, ``approx_kl``, ``entropy``, ...).

        ``batch``: ``input_ids``, ``attention_mask``, ``response_mask [B, R]``, ``old_logp``, ``advantages``,
        and ``ref_logp`` (for ``kl_mode="k3_loss"``).
        """
        mask = batch["response_mask"]
        R = mask.shape[1]
        if cfg.kl_mode == "full_kl_loss":
            # The exact KL needs both rows' logits: build them at the response positions only.
            logits = self.response_logits(model, batch["input_ids"], batch["attention_mask"], R)
            with torch.no_grad():
                ref_logits = self.response_logits(ref_model, batch["input_ids"], batch["attention_mask"], R)
            labels = _response_labels(batch["input_ids"][:, -R:], mask)
            loss, metrics = rf.ppo_loss_from_logits(
                logits, labels, batch["old_logp"], batch["advantages"], mask,
                entropy_coef=cfg.entropy_coef, temperature=cfg.temperature, clip_low=cfg.clip_low,
                clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, agg=cfg.agg,
            )  # fmt: skip
            kl = rf.full_kl(logits, ref_logits, temperature=cfg.temperature)
            loss = loss + cfg.kl_coef * rf.aggregate(kl, mask, agg=cfg.agg)
            metrics["kl"] = _masked_mean(kl, mask)
            return loss, metrics
        logp, entropy = self.response_logprobs(model, batch["input_ids"], batch["attention_mask"], mask,
                                               temperature=cfg.temperature, return_entropy=True)  # fmt: skip
        loss, metrics = rf.ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask,
                                           clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                           dual_clip=cfg.dual_clip, agg=cfg.agg)  # fmt: skip
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * rf.aggregate(entropy, mask, agg=cfg.agg)
        if cfg.kl_mode == "k3_loss":
            kl = rf.kl_penalty(logp, batch["ref_logp"], estimator="k3")
            loss = loss + cfg.kl_coef * rf.aggregate(kl, mask, agg=cfg.agg)
            metrics["kl"] = _masked_mean(kl, mask)
        metrics["entropy"] = _masked_mean(entropy, mask)
        return loss, metrics

    def value_loss(self, values, old_values, returns, mask, *, clip=None, agg="token-mean"):
        return rf.value_loss(values, old_values, returns, mask, clip=clip, agg=agg)

    def gae(self, rewards, values, mask, *, gamma, lam):
        return rf.gae(rewards, values, mask, gamma=gamma, lam=lam)

    def pairwise_loss(self, chosen, rejected):
        """Bradley-Terry loss ``mean(-log sigmoid(chosen - rejected))``."""
        return rf.pairwise_sigmoid_loss(chosen, rejected)

    def dpo_loss(self, model, input_ids, attention_mask, labels, ref_chosen, ref_rejected, *, beta, loss_type,
                 label_smoothing=0.0, average_log_prob=False):  # fmt: skip
        """DPO loss of a ``[2B, L]`` batch (chosen rows, then rejected rows) from the hidden states."""
        hidden, weight, bias = lm_hidden_states(model, input_ids, attention_mask)
        return rf.linear_dpo_loss(hidden[:, :-1], weight, labels[:, 1:], ref_chosen, ref_rejected, beta=beta,
                                  loss_type=loss_type, label_smoothing=label_smoothing,
                                  average_log_prob=average_log_prob, bias=bias, skip_ignored=True)  # fmt: skip


def _sum_tokens(logp: torch.Tensor, on: torch.Tensor, average: bool) -> torch.Tensor:
    total = torch.where(on, logp, 0.0).sum(-1)
    return total / on.sum(-1).clamp(min=1) if average else total


class ReferenceOps:
    """Plain PyTorch, the way trainers write it: full logits from the model, then eager ops on them."""

    name = "reference"

    def _logits(self, model, input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    def response_logprobs(self, model, input_ids, attention_mask, response_mask, *, temperature=1.0,
                          return_entropy=False):  # fmt: skip
        R = response_mask.shape[1]
        logits = self._logits(model, input_ids, attention_mask)[:, -R - 1 : -1]
        labels = _response_labels(input_ids[:, -R:], response_mask)
        logp, entropy = reference.logprobs_reference(logits, labels, temperature=temperature,
                                                     mask_zero_probs=False)  # fmt: skip
        return logp, (entropy if return_entropy else None)

    def response_logits(self, model, input_ids, attention_mask, R: int) -> torch.Tensor:
        return self._logits(model, input_ids, attention_mask)[:, -R - 1 : -1]

    def sequence_logprobs(self, model, input_ids, attention_mask, labels, *, average=False):
        logits = self._logits(model, input_ids, attention_mask)[:, :-1]
        logp, _ = reference.logprobs_reference(logits, labels[:, 1:], mask_zero_probs=False)
        return _sum_tokens(logp, labels[:, 1:] != -100, average)

    def sft_nll(self, model, input_ids, attention_mask, labels):
        logits = self._logits(model, input_ids, attention_mask)[:, :-1]
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                              reduction="sum")  # fmt: skip
        return nll, (labels[:, 1:] != -100).sum()

    def policy_loss(self, model, batch: dict, cfg: PolicyLossConfig, ref_model=None):
        mask = batch["response_mask"]
        R = mask.shape[1]
        logits = self.response_logits(model, batch["input_ids"], batch["attention_mask"], R)
        labels = _response_labels(batch["input_ids"][:, -R:], mask)
        logp, entropy = reference.logprobs_reference(logits, labels, temperature=cfg.temperature,
                                                     mask_zero_probs=False)  # fmt: skip
        m = mask.to(torch.float32)
        surrogate = reference.clipped_surrogate_reference(logp, batch["old_logp"], batch["advantages"],
                                                          clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                                          dual_clip=cfg.dual_clip)  # fmt: skip
        adv, ratio, clipped = surrogate.advantages, surrogate.ratio, surrogate.clipped
        token = surrogate.loss - cfg.entropy_coef * entropy
        metrics = {}
        if cfg.kl_mode == "k3_loss":
            kl = reference.kl_penalty_reference(logp, batch["ref_logp"], "k3")
            token = token + cfg.kl_coef * kl
            metrics["kl"] = _masked_mean(kl, mask)
        elif cfg.kl_mode == "full_kl_loss":
            with torch.no_grad():
                ref_logits = self.response_logits(ref_model, batch["input_ids"], batch["attention_mask"], R)
            kl = reference.full_kl_reference(logits, ref_logits, temperature=cfg.temperature, mask_zero_probs=False)
            token = token + cfg.kl_coef * kl
            metrics["kl"] = _masked_mean(kl, mask)
        loss = reference.aggregate_reference(token, m, cfg.agg)
        with torch.no_grad():
            metrics.update(
                clipfrac=_masked_mean((clipped > -adv * ratio).float(), mask),
                approx_kl=_masked_mean(batch["old_logp"] - logp, mask),
                ratio_mean=_masked_mean(ratio, mask),
                ratio_max=torch.where(mask > 0, ratio, 0.0).max(),
                entropy=_masked_mean(entropy, mask),
            )
        return loss, metrics

    def value_loss(self, values, old_values, returns, mask, *, clip=None, agg="token-mean"):
        loss = (values - returns) ** 2
        if clip is not None:
            clipped = old_values + torch.clamp(values - old_values, -clip, clip)
            loss = torch.maximum(loss, (clipped - returns) ** 2)
        return reference.aggregate_reference(0.5 * loss, mask, agg)

    def gae(self, rewards, values, mask, *, gamma, lam):
        """TRL's / OpenRLHF's loop: padding zeroed, a reverse loop over T on ``[B]`` columns."""
        m = mask.to(torch.float32)
        adv, ret = reference.gae_reference(rewards, values, m, gamma=gamma, lam=lam, skip_holes=False)
        return adv * m, ret * m

    def pairwise_loss(self, chosen, rejected):
        return -F.logsigmoid(chosen.float() - rejected.float()).mean()

    def dpo_loss(self, model, input_ids, attention_mask, labels, ref_chosen, ref_rejected, *, beta, loss_type,
                 label_smoothing=0.0, average_log_prob=False):  # fmt: skip
        logp = self.sequence_logprobs(model, input_ids, attention_mask, labels, average=average_log_prob)
        B = logp.shape[0] // 2
        return reference.dpo_loss_reference(logp[:B], logp[B:], ref_chosen, ref_rejected, beta=beta,
                                            loss_type=loss_type, label_smoothing=label_smoothing)  # fmt: skip
