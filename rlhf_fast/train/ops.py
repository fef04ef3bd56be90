"""The ``ops="fused" | "reference"`` switch of the trainers: the same loop on our fused ops or on plain PyTorch.

Every trainer computes its losses through one of these two objects, so a run with ``ops="reference"`` is the
identical loop (same data, same sampling, same optimiser steps) with the hot spots done the way TRL / verl /
OpenRLHF do them: the model's full ``[B, L, V]`` logits, ``log_softmax`` upcast to float32, ``gather``,
entropy from the softmax, the PPO formulas as separate ops, GAE as a Python loop over T. Comparing the two
runs' tokens/s and peak memory measures what the fused ops buy, one to one.

- ``FusedOps``: ``rf.linear_logprobs`` from the final hidden states and the lm_head weight (the logits are
  never built; ``skip_ignored=True`` except in ``sft_nll``: prompt and padding rows cost no lm_head work)
  for the rollout's log-probs; the policy loss by ``rf.linear_ppo_loss`` from the hidden states (the
  gradient computed in its forward for the token-level loss modes), with the exact KL in the loss by
  ``rf.linear_full_kl`` (neither model's logits built); ``rf.gae``, ``rf.value_loss``,
  ``rf.pairwise_sigmoid_loss``, ``rf.linear_dpo_loss`` (also ``skip_ignored=True``).
- ``ReferenceOps``: ``rlhf_fast.reference`` and plain PyTorch (the loss modes other than ``vanilla`` and
  ``delta`` by the ``[B, T]`` float32 arithmetic of ``rlhf_fast/_policy.py``).

The aggregation presets of TRL's ``GRPOTrainer`` (``loss_type``, TRL 1.16's ``_compute_loss``) over the
trainer's minibatch of ``S`` sequences (one optimizer step) cut into ``n`` micro-batches (``grad_accum``
times the number of processes) of ``s = S / n`` sequences: :func:`micro_aggregation` gives each
micro-batch's ``(agg, agg_norm, weight)`` so that the sum of ``weight * loss_micro`` over the micro-batches
(what the trainer backpropagates) is

- ``"grpo"``: ``sum over the S rows of [sum_t(m L) / max(sum_t(m), 1)] / S`` (``agg="seq-mean-token-mean"``,
  ``agg_norm=S``: TRL's mean over each micro-batch's rows, empty rows counted, divided by the accumulation
  steps and averaged over processes);
- ``"bnpo"``: ``(1 / n) * sum over micro-batches of [sum(m L) / max(sum(m), 1)]`` (``agg="token-mean"`` with the
  micro-batch's own token count times ``n``: TRL's local token mean);
- ``"dr_grpo"``: ``sum(m L) / (S * max_new_tokens)`` (``agg="seq-mean-token-sum-norm"``,
  ``agg_norm=max_new_tokens``: TRL's ``max_completion_length``, weight ``s / S``);
- ``"dapo"``: ``sum(m L) / max(sum(m), 1)`` over the whole minibatch on every process (``agg="token-mean"``,
  ``agg_norm`` = the minibatch's global token count: TRL's ``num_items_in_batch`` of one accumulation window,
  which TRL's rescaling gives exactly when ``steps_per_generation == gradient_accumulation_steps``, its
  default).

``loss_type=None`` keeps ``agg`` with the weights of :func:`micro_weight`.

Position convention: ``input_ids [B, L]`` holds ``P`` prompt tokens (left-padded) then ``R`` response tokens;
response token ``t`` (column ``P + t``) is predicted at column ``P + t - 1``, so the response's predicting
positions are columns ``P - 1 .. L - 2``.
"""

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

import rlhf_fast as rf

from .. import _agg, _policy, reference
from ..rl_losses import masked_mean
from .config import LOSS_TYPES
from .models import lm_hidden_states

OPS = ("fused", "reference")


@dataclass(frozen=True)
class PolicyLossConfig:
    """The PPO policy loss of both op sets: the trainer's own settings, and ``options`` (``rf.PolicyLossOptions``,
    checked on construction) for everything the loss ops take. ``kl_coef`` is the trainer's adaptive
    coefficient (the reward KL's and the loss's): ``options.kl_coef`` stays 0 and the k3 term gets this one.
    See ``rlhf_fast.train.ppo.Config``."""

    temperature: float = 1.0
    kl_mode: str = "reward"  # "reward": the KL is in the rewards; "k3_loss" / "full_kl_loss": in the loss
    kl_coef: float = 0.0
    options: rf.PolicyLossOptions = field(default_factory=rf.PolicyLossOptions)
    truncation: dict = field(default_factory=dict)  # the rollout's top_k / top_p / min_p (config.sampling_truncation)
    lm_head_fp32: bool = False  # the lm_head matmul in float32 under autocast (lm_head_precision="fp32")

    def loss_options(self) -> rf.PolicyLossOptions:
        """The loss ops' options: ``options`` with the trainer's ``kl_coef`` for ``kl_mode="k3_loss"``."""
        return replace(self.options, kl_coef=self.kl_coef) if self.kl_mode == "k3_loss" else self.options


def micro_weight(micro_mask: torch.Tensor, minibatch_mask: torch.Tensor, agg: str) -> float:
    """The weight of a micro-batch's ``agg`` loss in its minibatch's: ``sum_micro weight * loss_micro`` is
    the minibatch's ``agg`` loss however the minibatch is cut (over micro-batches and processes)."""
    if agg == "token-mean":
        return float(micro_mask.sum() / minibatch_mask.sum().clamp(min=1))
    if agg == "seq-mean-token-sum-norm":  # sum / (B * T): every micro-batch has the minibatch's T
        return micro_mask.shape[0] / minibatch_mask.shape[0]
    rows = lambda m: (m.sum(1) > 0).sum().clamp(min=1)  # noqa: E731 -- rows with a token, as rf.aggregate
    return float(rows(micro_mask) / rows(minibatch_mask))


def micro_aggregation(loss_type: str | None, agg: str, micro_mask: torch.Tensor, minibatch_mask: torch.Tensor,
                      max_new_tokens: int) -> tuple[str, float | None, float]:  # fmt: skip
    """``(agg, agg_norm, weight)`` of a micro-batch's policy loss for TRL's ``loss_type`` (module docstring):
    ``sum_micro weight * loss_micro(agg, agg_norm)`` is the minibatch's loss. ``minibatch_mask`` is the whole
    minibatch's (every process's rows); ``loss_type=None``: ``(agg, None, micro_weight(...))``."""
    if loss_type is None:
        return agg, None, micro_weight(micro_mask, minibatch_mask, agg)
    S, s = minibatch_mask.shape[0], micro_mask.shape[0]
    if loss_type == "grpo":
        return "seq-mean-token-mean", float(S), 1.0
    if loss_type == "bnpo":
        return "token-mean", max(float(micro_mask.sum()), 1.0) * (S // s), 1.0
    if loss_type == "dr_grpo":
        return "seq-mean-token-sum-norm", float(max_new_tokens), s / S
    if loss_type == "dapo":
        return "token-mean", max(float(minibatch_mask.sum()), 1.0), 1.0
    raise ValueError(f"loss_type must be None or one of {LOSS_TYPES}, got {loss_type!r}")


def get_ops(name: str):
    """``FusedOps()`` or ``ReferenceOps()`` by name."""
    if name == "fused":
        return FusedOps()
    if name == "reference":
        return ReferenceOps()
    raise ValueError(f"ops must be one of {OPS}, got {name!r}")


def _response_labels(response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return response_ids.masked_fill(response_mask == 0, -100)


def _linear_kwargs(truncation: dict | None, lm_head_fp32: bool) -> dict:
    """The truncation and lm_head-precision keywords of the linear log-prob ops (only those that are on)."""
    return {**(truncation or {}), **({"matmul_dtype": torch.float32} if lm_head_fp32 else {})}


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A metric: ``rf.masked_mean`` of the detached float32 ``x``."""
    return masked_mean(x.detach().float(), mask.to(torch.float32))


class FusedOps:
    name = "fused"

    # ---------------------------------------------------------------------------------- log-probs

    def response_logprobs(self, model, input_ids, attention_mask, response_mask, *, temperature=1.0,
                          return_entropy=False, truncation=None, lm_head_fp32=False):  # fmt: skip
        """``(logp [B, R], entropy [B, R] or None)`` of the response tokens, without building logits; of the
        distribution truncated by ``truncation`` (``top_k`` / ``top_p`` / ``min_p``: ``-inf`` for a token
        outside the kept set), with the lm_head in float32 if ``lm_head_fp32``."""
        R = response_mask.shape[1]
        hidden, weight, bias = lm_hidden_states(model, input_ids, attention_mask)
        labels = _response_labels(input_ids[:, -R:], response_mask)
        out = rf.linear_logprobs(hidden[:, -R - 1 : -1], weight, labels, bias=bias, temperature=temperature,
                                 return_entropy=return_entropy, skip_ignored=True,
                                 **_linear_kwargs(truncation, lm_head_fp32))  # fmt: skip
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
        """PPO policy loss of a minibatch and its metrics (``clipfrac``, ``approx_kl``, ``entropy``, ...), by
        ``rf.linear_ppo_loss`` from the final hidden states (no logits built), and with
        ``kl_mode="full_kl_loss"`` ``kl_coef * agg(rf.linear_full_kl(...))`` against ``ref_model``'s hidden states.

        ``batch``: ``input_ids``, ``attention_mask``, ``response_mask [B, R]``, ``old_logp``, ``advantages``,
        and ``ref_logp`` (for ``kl_mode="k3_loss"``).
        """
        mask = batch["response_mask"]
        R = mask.shape[1]
        hidden, weight, bias = lm_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        hidden = hidden[:, -R - 1 : -1]
        labels = _response_labels(batch["input_ids"][:, -R:], mask)
        k3 = cfg.kl_mode == "k3_loss"
        loss, metrics = rf.linear_ppo_loss(hidden, weight, labels, batch["old_logp"], batch["advantages"], mask,
                                           bias=bias, ref_logp=batch["ref_logp"] if k3 else None,
                                           temperature=cfg.temperature, options=cfg.loss_options(),
                                           **_linear_kwargs(cfg.truncation, cfg.lm_head_fp32))  # fmt: skip
        if cfg.kl_mode == "full_kl_loss":
            with torch.no_grad():
                ref_hidden, ref_weight, ref_bias = lm_hidden_states(ref_model, batch["input_ids"],
                                                                    batch["attention_mask"])  # fmt: skip
            kl = rf.linear_full_kl(hidden, weight, ref_hidden[:, -R - 1 : -1], ref_weight, bias=bias, ref_bias=ref_bias,
                                   temperature=cfg.temperature)  # fmt: skip
            loss = loss + cfg.kl_coef * _agg.aggregate(kl, mask, cfg.options.agg, cfg.options.agg_norm)
            metrics["kl"] = _masked_mean(kl, mask)
        elif not k3:
            del metrics["kl"]  # the KL is in the rewards: the trainer logs it from there
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

    def _head_logits(self, model, input_ids, attention_mask, R: int, fp32: bool) -> torch.Tensor:
        """The response's logits, with ``fp32`` by the lm_head in float32 outside autocast."""
        if not fp32:
            return self.response_logits(model, input_ids, attention_mask, R)
        hidden, weight, bias = lm_hidden_states(model, input_ids, attention_mask)
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden[:, -R - 1 : -1].float(), weight.float(), None if bias is None else bias.float())

    def response_logprobs(self, model, input_ids, attention_mask, response_mask, *, temperature=1.0,
                          return_entropy=False, truncation=None, lm_head_fp32=False):  # fmt: skip
        R = response_mask.shape[1]
        logits = self._head_logits(model, input_ids, attention_mask, R, lm_head_fp32)
        labels = _response_labels(input_ids[:, -R:], response_mask)
        logp, entropy = _reference_logprobs(logits, labels, temperature, truncation)
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
        logits = self._head_logits(model, batch["input_ids"], batch["attention_mask"], R, cfg.lm_head_fp32)
        labels = _response_labels(batch["input_ids"][:, -R:], mask)
        logp, entropy = _reference_logprobs(logits, labels, cfg.temperature, cfg.truncation)
        missed_metric = {}
        if cfg.truncation:  # a token outside the truncated distribution's kept set: weight 0, counted
            missed = (mask > 0) & torch.isinf(logp)
            missed_metric["truncation_miss_frac"] = _masked_mean(missed.float(), mask)
            logp, mask = torch.where(missed, 0.0, logp), torch.where(missed, 0.0, mask)
        m, opts = mask.to(torch.float32), cfg.options
        surrogate, clip_metrics = _reference_surrogate(logp, batch["old_logp"], batch["advantages"], m, opts)
        ratio = surrogate.ratio
        token = surrogate.loss - opts.entropy_coef * entropy
        metrics = {}
        if cfg.kl_mode == "k3_loss":
            kl = reference.kl_penalty_reference(logp, batch["ref_logp"], "k3")
            token = token + cfg.kl_coef * (kl * ratio if opts.kl_bias_correction else kl)
            metrics["kl"] = _masked_mean(kl, mask)
        elif cfg.kl_mode == "full_kl_loss":
            with torch.no_grad():
                ref_logits = self.response_logits(ref_model, batch["input_ids"], batch["attention_mask"], R)
            kl = reference.full_kl_reference(logits, ref_logits, temperature=cfg.temperature, mask_zero_probs=False)
            token = token + cfg.kl_coef * kl
            metrics["kl"] = _masked_mean(kl, mask)
        if opts.agg_norm is None:
            loss = reference.aggregate_reference(token, m, opts.agg)
        else:
            loss = _agg.aggregate(token, m, opts.agg, opts.agg_norm)
        ratio = torch.exp(logp - batch["old_logp"])  # the token ratio (GSPO's s_t has the row's value)
        with torch.no_grad():
            metrics.update(
                **clip_metrics,
                **missed_metric,
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


def _reference_logprobs(logits, labels, temperature: float, truncation: dict | None):
    """``(logp, entropy)`` float32 by ``log_softmax`` and ``gather`` (``rlhf_fast.reference``); with
    ``truncation``, of the logits outside vLLM's kept set (``reference.truncation_keep_reference``, float64
    sorts) set to ``-inf`` first: a label there gets ``-inf``."""
    if not truncation:
        return reference.logprobs_reference(logits, labels, temperature=temperature, mask_zero_probs=False)
    V, rows = logits.shape[-1], logits.shape[:-1].numel()
    z = logits.detach().reshape(rows, V).double() / temperature
    per_row = {key: torch.full((rows,), float(truncation.get(key, off)), dtype=torch.float64)
               for key, off in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0))}  # fmt: skip
    per_row["top_k"] = per_row["top_k"].long()
    keep = reference.truncation_keep_reference(z.cpu(), per_row["top_k"], per_row["top_p"], per_row["min_p"])
    logits = logits.float().masked_fill(~keep.to(logits.device).reshape(logits.shape), -float("inf"))
    return reference.logprobs_reference(logits, labels, temperature=temperature, mask_zero_probs=True)


def _reference_surrogate(logp, old_logp, advantages, m, opts: rf.PolicyLossOptions):
    """``(Surrogate, clip metrics)`` of the reference op set: the textbook clipped surrogate for ``vanilla``
    without ``delta`` (``rlhf_fast.reference``), else ``rlhf_fast/_policy.py``'s per-token loss of
    ``opts.loss_mode`` on the ``[B, T]`` float32 tensors (the log-probs are 0 off the mask). The metrics are
    ``rf.ppo_policy_loss``'s: ``clipfrac``, and ``dual_clipfrac`` with ``dual_clip`` (the tokens with ``A < 0``
    whose clipped loss exceeded the cap ``-A * dual_clip``)."""
    if opts.loss_mode == "vanilla" and opts.delta is None:
        s = reference.clipped_surrogate_reference(logp, old_logp, advantages, clip_low=opts.clip_low,
                                                  clip_high=opts.clip_high, dual_clip=opts.dual_clip)  # fmt: skip
        metrics = {"clipfrac": _masked_mean((s.clipped > -s.advantages * s.ratio).float(), m)}
        if opts.dual_clip is not None:
            capped = torch.maximum(-s.advantages * s.ratio, s.clipped) > -s.advantages * opts.dual_clip
            metrics["dual_clipfrac"] = _masked_mean(((s.advantages < 0) & capped).float(), m)
        return s, metrics
    on = m != 0
    adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1).expand_as(logp)
    lp, old, adv0 = (torch.where(on, t.float(), 0.0) for t in (logp, old_logp, adv))
    tl = _policy.token_loss(lp, old, adv0, m, opts)
    surrogate = reference.Surrogate(tl.loss, tl.ratio, adv, None)
    metrics = {"clipfrac": _masked_mean(tl.clipped.float(), m)}
    if tl.dual_clipped is not None:
        metrics["dual_clipfrac"] = _masked_mean(tl.dual_clipped.float(), m)
    return surrogate, metrics
