"""TRL on rlhf_fast: ``GRPOTrainer``, ``DPOTrainer`` and ``RewardTrainer`` with our ops inside.

Use (one line changes)::

    from rlhf_fast.integrations.trl import GRPOTrainer   # was: from trl import GRPOTrainer
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

Each class subclasses TRL's and takes the same arguments; what changes:

- **Log-probs and entropy** (GRPO, DPO): TRL 1.16 scores completions through the fused LM head that
  ``trl.trainer.utils.add_fused_lm_head`` puts on the model *instance* (``model(..., labels=...,
  fused_lm_head=True)``), not through ``selective_log_softmax``. After TRL's constructor has done so, these
  trainers put their own fused head on the same instances (``rlhf_fast/integrations/_trl_head.py``; policy
  and reference, the model class untouched): the backbone's last hidden states go through
  ``rf.linear_logprobs`` with the temperature (``logit_scale`` folded into it), the logits never built and
  kept float32 under bf16 autocast (TRL's chunked path rounds them to bf16: the bf16 results differ by
  that rounding, ~1e-3). DPO puts its head on each model inside TRL's constructor, right after TRL's own
  ``add_fused_lm_head`` call on it (``after_trl_heads``: while our constructor runs, that TRL function is
  followed by ours; outside, it runs alone), so that what TRL does next uses ours: the reference log-probs
  it precomputes (``precompute_ref_log_probs``, cached under a key of their own, never stock TRL's cache
  file) and the mixed-precision autocast accelerate wraps the reference model's forward in. The reference
  is then scored as stock TRL scores it: at the first step (policy = reference) the rewards, margins and
  accuracies are exactly stock's 0, in float32 and bf16.
- **GRPO loss**: ``rf.ppo_policy_loss`` and ``rf.kl_penalty(estimator="k3")`` (times TRL's importance
  ratio for ``use_bias_correction_kl``), aggregated with TRL's normalisation per ``loss_type``
  (``_GRPO_AGG`` below). Each TRL option onto the op's arguments (``_rf_policy_options``):

  - ``grpo`` / ``bnpo`` / ``dr_grpo`` / ``dapo`` / ``luspo``: ``loss_mode="vanilla"``, ``epsilon`` /
    ``epsilon_high`` as ``clip_low`` / ``clip_high``, ``delta`` (the two-sided clip) as ``delta``;
  - ``cispo``: ``loss_mode="cispo"``; TRL's weight ``sg(min(r, epsilon_high))`` is the op's
    ``clip(r, 1 - clip_low, 1 + clip_high)`` with ``clip_low=1``, ``clip_high=epsilon_high - 1``;
  - ``sapo``: ``loss_mode="sapo"``, ``sapo_temperature_pos`` / ``_neg`` as ``sapo_tau_pos`` / ``_neg``;
  - ``importance_sampling_level="sequence"`` (GSPO): ``loss_mode="gspo"`` for the clipped losses, whose
    token ratio ``s_t = exp(sg(S) + logp_t - sg(logp_t))`` has the value of TRL's row ratio ``S`` and, summed
    over the row, its gradient; for ``cispo`` and ``sapo`` (no sequence mode in the op) ``S`` enters through
    ``old_logp`` (the same ``s_t``). Per-token weights then enter as their row mean (see ``_compute_loss``).

  The entropy mask (``top_entropy_quantile``), the off-policy sequence mask and vLLM's importance-sampling
  correction (all four modes: TRL computes the truncated / masked ratio while scoring, it reaches the loss
  as a constant per-token weight) enter as ``is_weights``. A static ``entropy_coef`` bonus is supported.
- **Truncated sampling** (GRPO, opt-in: ``GRPOTrainer(..., truncated_logprobs=True)``; default ``False`` is
  stock TRL, the full softmax). TRL samples with ``top_k`` / ``top_p`` / ``min_p`` (``generation_kwargs``
  overriding them: ``generation_truncation``) but scores over the full softmax, which biases the ratio by the
  kept mass. With the option, the policy's head scores the truncated, renormalised distribution
  (``rf.linear_logprobs``' truncation; ``sampler="vllm"`` with ``use_vllm``, whose ``processed_logprobs``
  TRL asks for, ``"hf"`` for ``generate``'s warpers): the loss's log-probs and entropy, and the old
  log-probs of TRL's importance sampling and vLLM correction. The reference keeps the full softmax. A token
  outside the kept set (``-inf``: trainer and sampler logits differ, or the kept set moved) gets weight 0,
  never NaN, logged as ``truncation_miss_frac``. A PEFT policy without a reference model scores its
  reference through its own head with the adapter off: that pass is the full softmax too. ``ValueError``
  where rlhf_fast's loss or head does not serve the config, or with a generation setting that changes the
  sampled distribution in a way the truncated log-probs do not reproduce (``repetition_penalty != 1``,
  ``typical_p``, vLLM's presence / frequency penalties, greedy or beam search, ...: ``generation_unmatched``).
- **DPO loss**: ``rf.dpo_loss`` on the sequence sums of the ``rf.linear_logprobs`` log-probs
  (``loss_type`` ``sigmoid`` or ``hinge``).
- **Reward loss**: ``rf.pairwise_sigmoid_loss`` (with TRL's ``margin`` column and
  ``center_rewards_coefficient``).

Each trainer logs TRL's metrics under TRL's names with TRL's values. DPO's ``mean_token_accuracy`` needs
the argmax over the vocabulary, which ``rf.linear_logprobs`` does not compute: our head adds a matmul
through the lm_head without gradient for it (``_trl_head.py``); ``logits/chosen`` / ``logits/rejected`` are
``hidden . mean_v(W_v)``, one matrix-vector product.

What is not supported keeps stock TRL, never a silently different loss: for a config outside the lists
above (GRPO: ``loss_type="vespo"``; ``cispo`` with ``epsilon_high <= 1`` (TRL's default 0.2: set the
recommended 5.0); non-positive clips, ``delta`` or SAPO temperatures; sequence-level ratios with
per-token advantages (the batch's stock loss); the adaptive entropy bonus; the MoE aux loss; DPO: the
other loss types, ``ld_alpha``, ``use_weighting``, f-divergences, several loss types; models with logit
soft-capping or router logits; DeepSpeed ZeRO-3, whose sharded lm_head our backward cannot gather), the
trainer warns once, naming what it keeps stock, and runs TRL's own code for that part.

The GRPO and DPO trainers replace TRL internals (the fused-head calling convention, ``_compute_loss``),
so they check the TRL version: tested with ``trl`` 1.16; another minor version raises ``RuntimeError``.
"""

import torch
import trl
from packaging.version import Version
from trl.trainer import dpo_trainer as trl_dpo_trainer
from trl.trainer import grpo_trainer as trl_grpo_trainer

import rlhf_fast as rf

from ._trl_generation import generation_truncation, generation_unmatched
from ._trl_head import (HEAD_OUTPUTS, after_trl_heads, heads_unsupported, install_fused_head, install_heads,
                        score_reference_untruncated, warn_once)

__all__ = ["GRPOTrainer", "DPOTrainer", "RewardTrainer", "install_fused_head", "check_trl_version"]

TESTED_TRL = ("1.16",)

# TRL's loss_type -> (rf agg mode, factor that turns the rf aggregate into TRL's normalisation).
# With per-token loss L, mask m [B, T], TRL 1.16 (trl/trainer/grpo_trainer.py, _compute_loss):
#   grpo, sapo: mean over all B rows of sum_t(m L) / max(sum_t m, 1)
#               = rf "seq-mean-token-mean" (mean over the rows with a token) * rows_with_a_token / B
#   luspo:      mean over all B rows of sum_t(m L)          = rf "seq-mean-token-sum" * rows_with_a_token / B
#   bnpo:       sum(m L) / max(sum m, 1)                    = rf "token-mean"
#   dr_grpo:    sum(m L) / (B * max_completion_length)      = rf "seq-mean-token-sum-norm" * T / max_completion_length
#   dapo, cispo: sum(m L) / normalizer (the generation batch's token count, per accumulation window)
#                                                           = rf "seq-mean-token-sum-norm" * B * T / normalizer
_GRPO_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
             "dapo": "seq-mean-token-sum-norm", "luspo": "seq-mean-token-sum", "cispo": "seq-mean-token-sum-norm",
             "sapo": "seq-mean-token-mean"}  # fmt: skip
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # TRL's clipped surrogate (and its delta)


class _VersionChecked:
    """Mixed in before a TRL trainer class: checks the TRL version before TRL's constructor runs."""

    def __init__(self, *args, **kwargs):
        check_trl_version(type(self).__name__)
        super().__init__(*args, **kwargs)


def check_trl_version(what: str) -> None:
    """Raise ``RuntimeError`` unless the installed TRL is a minor version these drop-ins were tested with."""
    v = Version(trl.__version__)
    if f"{v.major}.{v.minor}" not in TESTED_TRL:
        raise RuntimeError(
            f"rlhf_fast.integrations.trl.{what} replaces TRL internals (the fused LM head, _compute_loss) and is "
            f"tested with trl {', '.join(t + '.x' for t in TESTED_TRL)}; found trl {trl.__version__}. Use trl's "
            f"own {what} with this version, or install a tested one (pip install 'trl>=1.16,<1.17')."
        )


# ------------------------------------------------------------------------------------------------ GRPO


def _first_reason(trainer, *checks: tuple[bool, str]) -> str | None:
    """The reason of the first check that holds, then the MoE aux loss, which no rf loss adds (``None`` when none)."""
    checks += ((trainer.aux_loss_enabled, "the MoE aux loss"),)
    return next((why for hit, why in checks if hit), None)


def grpo_unsupported(trainer) -> str | None:
    """Why ``rf.ppo_policy_loss`` cannot compute this GRPO config's loss (``None`` when it can)."""
    args, lt = trainer.args, trainer.loss_type
    taus = (args.sapo_temperature_pos, args.sapo_temperature_neg)
    return _first_reason(
        trainer,
        (lt not in _GRPO_AGG, f"loss_type={lt!r} (supported: {', '.join(_GRPO_AGG)})"),
        (trainer.importance_sampling_level not in ("token", "sequence"),  # TRL's loss raises ValueError for it
         f"importance_sampling_level={trainer.importance_sampling_level!r}"),
        (lt == "cispo" and trainer.epsilon_high <= 1, f"loss_type='cispo' with epsilon_high={trainer.epsilon_high} "
         "<= 1 (rf's cispo weight clip(r, 1 - clip_low, 1 + clip_high) can only cap the ratio above 1)"),
        (lt == "sapo" and min(taus) <= 0, f"loss_type='sapo' with sapo_temperature_pos / _neg = {taus} (not > 0)"),
        (lt in _CLIPPED and min(trainer.epsilon_low, trainer.epsilon_high) <= 0, "epsilon or epsilon_high <= 0"),
        (lt in _CLIPPED and args.delta is not None and args.delta <= 0, f"delta={args.delta} (not > 0)"),
        (trainer.use_adaptive_entropy, "use_adaptive_entropy (the adaptive entropy bonus)"),
    )  # fmt: skip


class GRPOTrainer(_VersionChecked, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with log-probs, entropy and the loss on rlhf_fast (module docstring); takes TRL's
    arguments and ``truncated_logprobs`` (the loss over the distribution generation samples from)."""

    def __init__(self, *args, truncated_logprobs: bool = False, **kwargs):
        if not isinstance(truncated_logprobs, bool):
            raise ValueError(f"truncated_logprobs must be a bool, got {truncated_logprobs!r}")
        super().__init__(*args, **kwargs)
        self._rf_truncation = generation_truncation(self.args) if truncated_logprobs else None
        self._rf_loss_unsupported = grpo_unsupported(self)
        if self._rf_truncation is not None:
            why = self._rf_loss_unsupported
            unmatched = generation_unmatched(self.args)
            if why is None and unmatched is not None:
                why = (f"{unmatched} in the generation settings (it changes the distribution generation samples "
                       "from, which the truncated log-probs would not be)")
            if why is not None:
                raise ValueError(f"truncated_logprobs=True is not supported with {why}")
            score_reference_untruncated(trl_grpo_trainer)  # a PEFT policy's reference pass: the full softmax
        if not install_heads(self, "GRPOTrainer", ("log_probs", "entropy"), self.temperature,
                             self.args.cast_lm_head_to_fp32, self._rf_truncation) and self._rf_truncation:  # fmt: skip
            raise ValueError("truncated_logprobs=True needs rlhf_fast's fused head, which this model cannot take")
        if self._rf_loss_unsupported is not None:
            warn_once(f"rlhf_fast.integrations.trl.GRPOTrainer: {self._rf_loss_unsupported} is not supported by "
                      "rlhf_fast's policy loss; this trainer computes stock TRL's loss for this config.")  # fmt: skip

    def _compute_loss(self, model, inputs):
        if self._rf_loss_unsupported is not None:
            return super()._compute_loss(model, inputs)
        advantages = inputs["advantages"]
        if advantages.dim() == 2 and advantages.shape[1] == 1:
            advantages = advantages[:, 0]
        sequence = self.importance_sampling_level == "sequence"
        if sequence and advantages.dim() == 2 and self.loss_type != "cispo":
            if self._rf_truncation is not None:  # stock TRL's loss would turn the -inf log-probs into NaN
                raise ValueError("truncated_logprobs=True is not supported with importance_sampling_level="
                                 "'sequence' and per-token advantages")  # fmt: skip
            warn_once("rlhf_fast.integrations.trl.GRPOTrainer: importance_sampling_level='sequence' with per-token "
                      "advantages is not supported by rlhf_fast's policy loss; stock TRL's loss for these "
                      "batches.")  # fmt: skip
            return super()._compute_loss(model, inputs)
        completion_ids = inputs["completion_ids"]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        logp, entropy, _ = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            **{k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                          "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                          "mm_token_type_ids", "image_position_ids")},
        )  # fmt: skip
        B, T = logp.shape
        old_logp = inputs.get("old_per_token_logps")
        old_logp = logp.detach() if old_logp is None else old_logp
        missed = None
        if self._rf_truncation is not None:
            # A token outside the kept set, now or when old_logp was computed (log-prob -inf), gets weight 0 as
            # in rf's loss ops; its log-probs become a finite 0 through where(), whose gradient there is exactly 0
            missed = (mask != 0) & (torch.isneginf(logp.detach()) | torch.isneginf(old_logp))
            logp, old_logp = torch.where(missed, 0.0, logp), torch.where(missed, 0.0, old_logp)
            missed_frac = torch.stack([(missed * mask).sum(), mask.sum()]).float()
            mask = mask.masked_fill(missed, 0)
        m = mask.to(torch.float32)
        # TRL's importance ratio, differentiable: per token [B, T], or GSPO's row geometric mean [B, 1]
        log_ratio = torch.where(m != 0, logp - old_logp, 0.0)
        if sequence:
            log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        coef = torch.exp(log_ratio)

        # Per-token weights on the policy term only (TRL applies them before adding the KL term)
        weights = []
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropy, mask, 1 - self.top_entropy_quantile)
            weights.append(entropy_mask)
        if self.off_policy_mask_threshold is not None:
            adv2 = advantages if advantages.dim() == 2 else advantages[:, None]
            weights.append(self.get_off_policy_mask(adv2, logp, inputs.get("sampling_per_token_logps", old_logp),
                                                    mask, self.off_policy_mask_threshold))  # fmt: skip
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"])  # truncated / masked by TRL, a constant
        is_weights = None
        for w in weights:
            w = w.to(torch.float32).expand(B, T)
            is_weights = w if is_weights is None else is_weights * w

        loss_old_logp, options = old_logp, self._rf_policy_options()
        if sequence and self.loss_type in ("cispo", "sapo"):
            # rf has no sequence-level cispo / sapo mode: the row's ratio S enters through old_logp, which makes
            # the token ratio GSPO's s_t = exp(sg(S) + logp_t - sg(logp_t)) (the value S, the gradient of a token
            # through its own log-prob)
            loss_old_logp = logp.detach() - log_ratio.detach()
        if sequence and self.loss_type != "cispo" and is_weights is not None:
            # With a per-token loss L(s_t) of value L(S) on every token of a row, TRL's sum_t m_t w_t L(S) (the
            # gradient of S spread as m_t / n over the row) has the value and gradient of rf's sum_t m_t u L(s_t)
            # with u the row's mean weight sum_t(m_t w_t) / n.
            is_weights = ((is_weights * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)).expand(B, T)

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        agg = _GRPO_AGG[self.loss_type]
        if self.loss_type in ("grpo", "sapo", "luspo"):
            factor = (m.sum(1) > 0).sum().item() / B
        elif self.loss_type == "bnpo":
            factor = 1.0
        elif self.loss_type == "dr_grpo":
            factor = T / self.max_completion_length
        else:  # dapo, cispo: TRL's normalizer (it already spans the accumulation window)
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            factor = B * T / normalizer
        policy_loss, _ = rf.ppo_policy_loss(logp, loss_old_logp, advantages, mask, agg=agg, is_weights=is_weights,
                                            **options)  # fmt: skip
        loss = policy_loss * factor
        kl = None
        if self.beta != 0.0:
            kl = rf.kl_penalty(logp, inputs["ref_per_token_logps"], estimator="k3")
            if self.args.use_bias_correction_kl:  # TRL: the KL estimate times the (differentiable) ratio
                kl = kl * coef
            loss = loss + self.beta * rf.aggregate(kl, mask, agg=agg) * factor
        policy_metric = loss.detach()  # TRL's policy_loss: before the division by the accumulation steps
        if self.loss_type not in ("dapo", "cispo"):
            loss = loss / accumulation
        if self._entropy_bonus_enabled:
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_metric).nanmean().item())
            effective = m if entropy_mask is None else m * entropy_mask
            loss = loss - self.entropy_coef * rf.aggregate(entropy, effective, agg="token-mean") / accumulation
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        kl = None if kl is None else kl.detach()
        self._log_grpo_metrics(mode, coef.detach(), advantages, m, entropy.detach(), kl)
        if missed is not None:  # over the tokens of the mask before the misses were dropped
            totals = self.accelerator.reduce(missed_frac, reduction="sum")
            self._metrics[mode]["truncation_miss_frac"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return loss

    def _rf_policy_options(self) -> dict:
        """TRL's ``loss_type`` and its parameters as ``rf.ppo_policy_loss`` arguments."""
        if self.loss_type == "cispo":  # TRL: -sg(min(r, epsilon_high)) A logp; rf: clip(r, 1 - 1, 1 + (epsilon_high - 1))
            return dict(loss_mode="cispo", clip_low=1.0, clip_high=self.epsilon_high - 1.0)
        if self.loss_type == "sapo":  # TRL: -A (4 / tau) sigmoid(tau (r - 1)), tau by the sign of A
            return dict(loss_mode="sapo", sapo_tau_pos=self.args.sapo_temperature_pos,
                        sapo_tau_neg=self.args.sapo_temperature_neg)  # fmt: skip
        # the clipped surrogate, with delta (TRL's two-sided clip) on the unclipped ratio
        return dict(loss_mode="gspo" if self.importance_sampling_level == "sequence" else "vanilla",
                    clip_low=self.epsilon_low, clip_high=self.epsilon_high, delta=self.args.delta)  # fmt: skip

    @torch.no_grad()
    def _log_grpo_metrics(self, mode, coef, advantages, m, entropy, kl):
        """TRL's GRPO metric names and values: means over all processes, of the tokens, or of the rows for a
        sequence-level ``[B, 1]`` ratio (as TRL takes them)."""
        from trl.trainer.utils import nanmax, nanmin

        def global_mean(x):
            if x.shape[1] == 1:
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * m).sum(), m.sum()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        if kl is not None:
            metrics["kl"].append(global_mean(kl))
        metrics["entropy"].append(global_mean(entropy))
        adv = advantages if advantages.dim() == 2 else advantages[:, None]
        if self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_mean(((coef > self.epsilon_high) & (adv > 0)).float()))
        if self.loss_type not in _CLIPPED:
            return
        if self.args.delta is not None:  # TRL counts the clips on the ratio capped at delta
            coef = coef.clamp(max=self.args.delta)
        low = ((coef < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((coef > 1 + self.epsilon_high) & (adv > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_mean(low))
        metrics["clip_ratio/high_mean"].append(global_mean(high))
        metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))

        def per_seq(x):  # NaN for empty rows: nanmin / nanmax skip them
            return x[:, 0] if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(per_seq(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(per_seq(high))).item())


# ------------------------------------------------------------------------------------------------- DPO


def dpo_unsupported(trainer) -> str | None:
    """Why ``rf.dpo_loss`` cannot compute this DPO config's loss (``None`` when it can)."""
    lts = trainer.loss_types
    return _first_reason(
        trainer,
        (len(lts) != 1 or lts[0] not in ("sigmoid", "hinge"),
         f"loss_type={lts!r} (supported: one of 'sigmoid', 'hinge')"),
        (trainer.loss_weights[0] != 1.0, "loss_weights"),
        (trainer.f_divergence_type != "reverse_kl", f"f_divergence_type={trainer.f_divergence_type!r}"),
        (trainer.ld_alpha is not None, "ld_alpha"),
        (trainer.use_weighting, "use_weighting (WPO)"),
    )  # fmt: skip


class DPOTrainer(_VersionChecked, trl.DPOTrainer):
    """``trl.DPOTrainer`` with log-probs on ``rf.linear_logprobs`` and the loss on ``rf.dpo_loss`` (module docstring)."""

    def __init__(self, *args, **kwargs):
        # Our head goes on each model where TRL's constructor puts its own, so that what the constructor does next
        # applies to ours: accelerate's mixed-precision autocast around the reference model's forward, and the
        # precomputed reference log-probs (precompute_ref_log_probs)
        with after_trl_heads(trl_dpo_trainer, self._rf_head_on):
            super().__init__(*args, **kwargs)
        if not hasattr(self, "_rf_unsupported"):  # TRL's constructor added no fused head: nothing of ours runs
            self._rf_unsupported = "a DPOTrainer whose constructor adds no fused LM head"
            warn_once(f"rlhf_fast.integrations.trl.DPOTrainer: trl {trl.__version__}'s DPOTrainer added no fused LM "
                      "head; this trainer runs stock TRL.")  # fmt: skip

    def _rf_head_on(self, model):
        """Called right after TRL's ``add_fused_lm_head(model)``: the policy first (the reference model, if any, is
        set by then), then the reference model."""
        if not hasattr(self, "_rf_unsupported"):
            self._rf_unsupported = dpo_unsupported(self)
            if self._rf_unsupported is not None:
                warn_once(f"rlhf_fast.integrations.trl.DPOTrainer: {self._rf_unsupported} is not supported by "
                          "rf.dpo_loss; this trainer runs stock TRL (log-probs and loss) for this config.")  # fmt: skip
            elif heads_unsupported(self, "DPOTrainer") is not None:
                self._rf_unsupported = "the model"
        if self._rf_unsupported is None:
            policy = model is not self.ref_model
            install_fused_head(model, outputs=HEAD_OUTPUTS if policy else ("log_probs",))

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self._rf_unsupported is not None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        # TRL caches the precomputed log-probs under the hash of the dataset and the weights: ours come from another
        # head, so they get their own cache file (stock TRL's never read as ours, nor ours as stock's)
        stock_hash = self._precompute_model_hash
        self._precompute_model_hash = f"{stock_hash}+rlhf_fast.linear_logprobs"
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_model_hash = stock_hash

    def _compute_loss(self, model, inputs, return_outputs):
        if self._rf_unsupported is not None:
            return super()._compute_loss(model, inputs, return_outputs)
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter
        from accelerate.utils import is_peft_model
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}  # fmt: skip
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        T = shift_mask.size(1)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        chosen_logps, rejected_logps = outputs.log_probs[:, -T:].sum(1).chunk(2)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:  # the reference model as TRL 1.16 picks it (a PEFT model without one: the adapter off / "ref")
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                if is_peft_model(self.model) and self.ref_model is None:
                    unwrapped = self.accelerator.unwrap_model(self.model)
                    with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                        ref = self.model(**model_kwargs, labels=labels, fused_lm_head=True)
                else:
                    ref = self.ref_model(**model_kwargs, labels=labels, fused_lm_head=True)
            ref_chosen, ref_rejected = ref.log_probs[:, -T:].sum(1).chunk(2)
        loss, metrics = rf.dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta=self.beta,
                                    loss_type=self.loss_types[0])  # fmt: skip
        self._log_dpo_metrics(mode, inputs, outputs, shift_mask, chosen_logps, rejected_logps, ref_chosen, ref_rejected)
        if return_outputs:
            with torch.no_grad():  # as TRL: the logits for compute_metrics need one more forward
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    @torch.no_grad()
    def _log_dpo_metrics(self, mode, inputs, outputs, shift_mask, chosen, rejected, ref_chosen, ref_rejected):
        """TRL's DPO metric names and values, reduced over all processes."""
        acc = self.accelerator
        T = shift_mask.size(1)
        m = shift_mask.float()
        metrics = self._metrics[mode]

        def global_ratio(num, den):  # sum over processes of num / of den (0 without any token)
            s = acc.gather_for_metrics(torch.stack([num.float(), den.float()]).reshape(1, 2)).sum(0)
            return (s[0] / s[1]).item() if s[1] > 0 else 0.0

        metrics["entropy"].append(global_ratio((outputs.entropy[:, -T:] * m).sum(), m.sum()))
        if mode == "train":
            tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        for name, part, mask in zip(("chosen", "rejected"), outputs.mean_logits[:, -T:].chunk(2), m.chunk(2)):
            metrics[f"logits/{name}"].append(global_ratio((part * mask).sum(), mask.sum()))
        chosen_mask = m.chunk(2)[0]  # token accuracy: the chosen completions' labels that are the argmax
        hits = outputs.is_top1[:, -T:].chunk(2)[0] & chosen_mask.bool()
        metrics["mean_token_accuracy"].append(global_ratio(hits.sum(), chosen_mask.sum()))
        chosen_rewards = self.beta * (chosen - ref_chosen)
        rejected_rewards = self.beta * (rejected - ref_rejected)
        metrics["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(acc.gather(chosen).mean().item())
        metrics["logps/rejected"].append(acc.gather(rejected).mean().item())


# ---------------------------------------------------------------------------------------------- Reward


class RewardTrainer(_VersionChecked, trl.RewardTrainer):
    """``trl.RewardTrainer`` with the Bradley-Terry loss on ``rf.pairwise_sigmoid_loss`` (module docstring;
    version-checked: its ``compute_loss`` keeps TRL 1.16's metrics bookkeeping)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs)
        chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        loss = rf.pairwise_sigmoid_loss(chosen, rejected, margin=inputs.get("margin"))
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        acc = self.accelerator
        if mode == "train":
            self._total_train_tokens += acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            rewards = acc.gather(outputs.logits)
            self._metrics[mode]["min_reward"].append(rewards.min().item())
            self._metrics[mode]["mean_reward"].append(rewards.mean().item())
            self._metrics[mode]["max_reward"].append(rewards.max().item())
            accuracy = acc.gather_for_metrics((chosen > rejected).float().mean()).mean()
            self._metrics[mode]["accuracy"].append(accuracy.item())
            self._metrics[mode]["margin"].append(acc.gather_for_metrics((chosen - rejected).mean()).mean().item())
        return (loss, outputs) if return_outputs else loss
