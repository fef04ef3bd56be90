"""TRL on rlhf_fast: ``GRPOTrainer``, ``DPOTrainer`` and ``RewardTrainer`` with our ops inside.

Use (one line changes)::

    from rlhf_fast.integrations.trl import GRPOTrainer   # was: from trl import GRPOTrainer
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

Each class subclasses TRL's and takes the same arguments; what changes:

- **Log-probs and entropy** (GRPO, DPO): TRL 1.16 scores completions through the fused LM head that
  ``trl.trainer.utils.add_fused_lm_head`` puts on the model *instance* (``model(..., labels=...,
  fused_lm_head=True)``), not through ``selective_log_softmax``. After TRL's constructor has done so, these
  trainers put their own fused head on the same instances (policy and reference; the model class is
  untouched): the backbone's last hidden states go through ``rf.linear_logprobs`` with the temperature
  (``logit_scale`` folded into it), the logits never built and kept float32 under bf16 autocast (TRL's
  chunked path rounds them to bf16: the bf16 results differ by that rounding, ~1e-3).
- **GRPO loss**: ``rf.ppo_policy_loss`` (``epsilon``/``epsilon_high`` as ``clip_low``/``clip_high``) and
  ``rf.kl_penalty(estimator="k3")`` (times the ratio for ``use_bias_correction_kl``), aggregated with
  TRL's normalisation per ``loss_type`` (``_GRPO_AGG`` below). The entropy mask (``top_entropy_quantile``),
  the off-policy sequence mask and vLLM's importance-sampling correction (all four modes: TRL computes
  the truncated / masked ratio while scoring, it reaches the loss as a constant per-token weight) enter as
  ``is_weights``. A static ``entropy_coef`` bonus is supported.
- **DPO loss**: ``rf.dpo_loss`` on the sequence sums of the ``rf.linear_logprobs`` log-probs
  (``loss_type`` ``sigmoid`` or ``hinge``).
- **Reward loss**: ``rf.pairwise_sigmoid_loss`` (with TRL's ``margin`` column and
  ``center_rewards_coefficient``).

What is not supported yet keeps stock TRL, never a silently different loss: for a config outside the
lists above (GRPO: ``loss_type`` cispo / sapo / luspo / vespo, ``importance_sampling_level="sequence"``,
``delta``, the adaptive entropy bonus, MoE aux loss — they wait for the loss modes of issue 14; DPO: the
other loss types, ``ld_alpha``, ``use_weighting``, f-divergences, several loss types; models with
logit soft-capping or router logits; DeepSpeed ZeRO-3, whose sharded lm_head our backward cannot
gather), the trainer warns once, saying what it keeps stock, and runs TRL's own code for that part.

The GRPO and DPO trainers replace TRL internals (the fused-head calling convention, ``_compute_loss``),
so they check the TRL version: tested with ``trl`` 1.16; another minor version raises ``RuntimeError``.
Two DPO metrics need the argmax over the vocabulary, which ``rf.linear_logprobs`` does not compute:
``mean_token_accuracy`` is not logged; ``logits/chosen`` / ``logits/rejected`` are exact (the mean logit
is ``hidden . mean_v(W_v)``, one matrix-vector product).
"""

import functools
import types
import warnings
from contextlib import nullcontext

import torch
import trl
from packaging.version import Version
from trl.trainer.utils import FusedCausalLMOutput

import rlhf_fast as rf

TESTED_TRL = ("1.16",)

# TRL's loss_type -> (rf agg mode, factor that turns the rf aggregate into TRL's normalisation).
# With per-token loss L, mask m [B, T], TRL 1.16 (trl/trainer/grpo_trainer.py, _compute_loss):
#   grpo:    mean over all B rows of sum_t(m L) / max(sum_t m, 1)
#            = rf "seq-mean-token-mean" (mean over the rows with a token) * rows_with_a_token / B
#   bnpo:    sum(m L) / max(sum m, 1)                      = rf "token-mean"
#   dr_grpo: sum(m L) / (B * max_completion_length)        = rf "seq-mean-token-sum-norm" * T / max_completion_length
#   dapo:    sum(m L) / normalizer (the generation batch's token count, per accumulation window)
#                                                          = rf "seq-mean-token-sum-norm" * B * T / normalizer
_GRPO_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
             "dapo": "seq-mean-token-sum-norm"}  # fmt: skip


def check_trl_version(what: str) -> None:
    """Raise ``RuntimeError`` unless the installed TRL is a minor version these drop-ins were tested with."""
    v = Version(trl.__version__)
    if f"{v.major}.{v.minor}" not in TESTED_TRL:
        raise RuntimeError(
            f"rlhf_fast.integrations.trl.{what} replaces TRL internals (the fused LM head, _compute_loss) and is "
            f"tested with trl {', '.join(t + '.x' for t in TESTED_TRL)}; found trl {trl.__version__}. Use trl's "
            f"own {what} with this version, or install a tested one (pip install 'trl>=1.16,<1.17')."
        )


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------------------------- the fused head


def _head_unsupported(model) -> str | None:
    """Why our fused head cannot serve ``model`` (``None`` when it can)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    cfg = model.config.get_text_config()
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        return "the model soft-caps its logits (final_logit_softcapping), which rf.linear_logprobs does not do"
    if getattr(cfg, "output_router_logits", False):
        return "the model returns router logits (MoE aux loss)"
    if is_deepspeed_zero3_enabled():
        return "DeepSpeed ZeRO-3 shards the lm_head, which rf.linear_logprobs' backward cannot gather"
    if _logit_scale(cfg) <= 0:
        return "the model's logit scale is not positive"
    return None


def _logit_scale(cfg) -> float:
    """The factor the model multiplies its logits by, read as TRL 1.16's ``add_fused_lm_head`` reads it."""
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
    return 1.0 if scale is None else float(scale)


def install_fused_head(model, *, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                       outputs: tuple[str, ...] = ("log_probs",)) -> None:  # fmt: skip
    """Give the model *instance* a fused LM head on ``rf.linear_logprobs`` with TRL 1.16's calling convention.

    ``model(..., labels=labels, fused_lm_head=True)`` returns a ``trl.trainer.utils.FusedCausalLMOutput``
    whose ``log_probs`` (and ``entropy``, ``mean_logits`` when in ``outputs``) score the next-token labels
    (``-100`` = not scored, 0 there) under ``softmax(logit_scale * logits / temperature)``; a call without
    ``fused_lm_head`` goes to the model's previous forward (generation is unchanged). The instance's
    ``forward`` attribute is replaced, as TRL's own ``add_fused_lm_head`` does; the class is not touched.
    """
    unknown = set(outputs) - {"log_probs", "entropy", "mean_logits"}
    if unknown:
        raise ValueError(f"outputs: rf.linear_logprobs computes log_probs, entropy and mean_logits, not {sorted(unknown)}")
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    # temperature / logit_scale: softmax(scale * z / T) = softmax(z / (T / scale))
    effective_temperature = temperature / _logit_scale(text_config)
    from transformers import __version__ as transformers_version

    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers_version) < Version("5.0.0"):
        backbone_attr = "model"

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous_forward(*args, **{k: v for k, v in extra.items() if v is not None}, **kwargs)
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone_attr)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        h, y = hidden[mask], labels[mask]  # only the scored positions go through the head
        ctx = nullcontext()
        if cast_lm_head_to_fp32:
            h, weight, bias = h.float(), weight.float(), None if bias is None else bias.float()
            ctx = torch.autocast(h.device.type, enabled=False)
        elif not torch.is_autocast_enabled(h.device.type) and weight.dtype != h.dtype:
            # as TRL's chunked head: the projection runs in the hidden states' dtype
            weight, bias = weight.to(h.dtype), None if bias is None else bias.to(h.dtype)
        with ctx:
            out = rf.linear_logprobs(h, weight, y, bias=bias, temperature=effective_temperature,
                                     return_entropy="entropy" in outputs)  # fmt: skip
        logp, entropy = out if "entropy" in outputs else (out, None)
        mean_logits = None
        if "mean_logits" in outputs:
            with torch.no_grad():  # mean_v(h . W_v + b_v) = h . mean_v(W_v) + mean(b): one matrix-vector product
                z = h.detach().float() @ weight.detach().float().mean(0)
                if bias is not None:
                    z = z + bias.detach().float().mean()
                mean_logits = z / effective_temperature

        def scatter(x):  # masked_scatter keeps an all-masked batch connected to the graph, as TRL does
            return None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)

        log_probs = scatter(logp)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=scatter(entropy),
                                   mean_logits=scatter(mean_logits), label_mask=mask)  # fmt: skip

    model.forward = types.MethodType(forward, model)


def _install_heads(trainer, name: str, policy_outputs: tuple[str, ...], temperature: float, cast_fp32: bool) -> bool:
    """Our fused head on the trainer's policy and reference models; ``False`` (with a warning) if one cannot take it."""
    from accelerate.utils import is_peft_model

    policy = trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model
    models = [(policy, policy_outputs)]
    if getattr(trainer, "ref_model", None) is not None:
        models.append((trainer.accelerator.unwrap_model(trainer.ref_model), ("log_probs",)))
    for model, _ in models:
        why = _head_unsupported(model)
        if why is not None:
            _warn_once(f"rlhf_fast.integrations.trl.{name}: {why}; the log-probs come from TRL's own fused head.")
            return False
    for model, outputs in models:
        install_fused_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_fp32, outputs=outputs)
    return True


# ------------------------------------------------------------------------------------------------ GRPO


def grpo_unsupported(trainer) -> str | None:
    """Why ``rf.ppo_policy_loss`` cannot compute this GRPO config's loss today (``None`` when it can)."""
    args = trainer.args
    if trainer.loss_type not in _GRPO_AGG:
        return f"loss_type={trainer.loss_type!r} (rf.ppo_policy_loss has grpo, bnpo, dr_grpo, dapo)"
    if trainer.importance_sampling_level != "token":
        return f"importance_sampling_level={trainer.importance_sampling_level!r} (GSPO)"
    if args.delta is not None:
        return "delta (the two-sided clip)"
    if trainer.use_adaptive_entropy:
        return "use_adaptive_entropy"
    if trainer.aux_loss_enabled:
        return "the MoE aux loss"
    return None


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with log-probs, entropy and the loss on rlhf_fast (module docstring)."""

    def __init__(self, *args, **kwargs):
        check_trl_version("GRPOTrainer")
        super().__init__(*args, **kwargs)
        _install_heads(self, "GRPOTrainer", ("log_probs", "entropy"), self.temperature, self.args.cast_lm_head_to_fp32)
        self._rf_loss_unsupported = grpo_unsupported(self)
        if self._rf_loss_unsupported is not None:
            _warn_once(f"rlhf_fast.integrations.trl.GRPOTrainer: {self._rf_loss_unsupported} is not supported by "
                       "rlhf_fast's policy loss yet (issue 14); this trainer computes stock TRL's loss for this config.")  # fmt: skip

    def _compute_loss(self, model, inputs):
        if self._rf_loss_unsupported is not None:
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
        advantages = inputs["advantages"]
        if advantages.dim() == 2 and advantages.shape[1] == 1:
            advantages = advantages[:, 0]

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

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        agg = _GRPO_AGG[self.loss_type]
        m = mask.to(torch.float32)
        if self.loss_type == "grpo":
            factor = (m.sum(1) > 0).sum().item() / B / accumulation
        elif self.loss_type == "bnpo":
            factor = 1.0 / accumulation
        elif self.loss_type == "dr_grpo":
            factor = T / self.max_completion_length / accumulation
        else:  # dapo: TRL's normalizer already spans the accumulation window
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            factor = B * T / normalizer
        policy_loss, metrics = rf.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=self.epsilon_low,
                                                  clip_high=self.epsilon_high, agg=agg, is_weights=is_weights)  # fmt: skip
        loss = policy_loss * factor
        if self.beta != 0.0:
            kl = rf.kl_penalty(logp, inputs["ref_per_token_logps"], estimator="k3")
            if self.args.use_bias_correction_kl:  # TRL: the KL estimate times the (differentiable) ratio
                kl = kl * torch.exp(torch.where(m != 0, logp - old_logp, 0.0))
            loss = loss + self.beta * rf.aggregate(kl, mask, agg=agg) * factor
        if self._entropy_bonus_enabled:
            # TRL logs the policy term per micro-batch: before the accumulation divisor (dapo's normaliser has it)
            policy_metric = loss.detach() * (1.0 if self.loss_type == "dapo" else accumulation)
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_metric).nanmean().item())
            effective = m if entropy_mask is None else m * entropy_mask
            loss = loss - self.entropy_coef * rf.aggregate(entropy, effective, agg="token-mean") / accumulation
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        self._log_grpo_metrics(mode, logp, old_logp, advantages, m, entropy, kl if self.beta != 0.0 else None)
        return loss

    @torch.no_grad()
    def _log_grpo_metrics(self, mode, logp, old_logp, advantages, m, entropy, kl):
        """TRL's GRPO metric names, each a token mean over all processes."""
        from trl.trainer.utils import nanmax, nanmin

        def global_mean(x):
            totals = self.accelerator.reduce(torch.stack([(x * m).sum(), m.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if kl is not None:
            self._metrics[mode]["kl"].append(global_mean(kl.detach()))
        self._metrics[mode]["entropy"].append(global_mean(entropy.detach()))
        ratio = torch.exp(torch.where(m != 0, logp.detach() - old_logp, 0.0))
        adv = advantages if advantages.dim() == 2 else advantages[:, None]
        low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).float()
        self._metrics[mode]["clip_ratio/low_mean"].append(global_mean(low))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_mean(high))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
        per_seq = lambda x: (x * m).sum(-1) / m.sum(-1)  # noqa: E731  (NaN for empty rows: nanmin/nanmax skip them)
        self._metrics[mode]["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(per_seq(low))).item())
        self._metrics[mode]["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(per_seq(high))).item())


# ------------------------------------------------------------------------------------------------- DPO


def dpo_unsupported(trainer) -> str | None:
    """Why ``rf.dpo_loss`` cannot compute this DPO config's loss (``None`` when it can)."""
    if len(trainer.loss_types) != 1 or trainer.loss_types[0] not in ("sigmoid", "hinge"):
        return f"loss_type={trainer.loss_types!r} (supported: one of 'sigmoid', 'hinge')"
    if trainer.loss_weights[0] != 1.0:
        return "loss_weights"
    if trainer.f_divergence_type != "reverse_kl":
        return f"f_divergence_type={trainer.f_divergence_type!r}"
    if trainer.ld_alpha is not None:
        return "ld_alpha"
    if trainer.use_weighting:
        return "use_weighting (WPO)"
    if trainer.aux_loss_enabled:
        return "the MoE aux loss"
    return None


class DPOTrainer(trl.DPOTrainer):
    """``trl.DPOTrainer`` with log-probs on ``rf.linear_logprobs`` and the loss on ``rf.dpo_loss`` (module docstring)."""

    def __init__(self, *args, **kwargs):
        check_trl_version("DPOTrainer")
        super().__init__(*args, **kwargs)
        self._rf_unsupported = dpo_unsupported(self)
        if self._rf_unsupported is None:
            if not _install_heads(self, "DPOTrainer", ("log_probs", "entropy", "mean_logits"), 1.0, False):
                self._rf_unsupported = "the model"
        else:
            _warn_once(f"rlhf_fast.integrations.trl.DPOTrainer: {self._rf_unsupported} is not supported by "
                       "rf.dpo_loss; this trainer runs stock TRL (log-probs and loss) for this config.")  # fmt: skip

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
        """TRL's DPO metric names (all but ``mean_token_accuracy``), reduced over all processes."""
        acc = self.accelerator
        T = shift_mask.size(1)
        m = shift_mask.float()
        ent = acc.gather_for_metrics(torch.stack([(outputs.entropy[:, -T:] * m).sum(), m.sum()]).reshape(1, 2)).sum(0)
        self._metrics[mode]["entropy"].append((ent[0] / ent[1]).item() if ent[1] > 0 else 0.0)
        if mode == "train":
            tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        for name, part, mask in zip(("chosen", "rejected"), outputs.mean_logits[:, -T:].chunk(2), m.chunk(2)):
            s = acc.gather_for_metrics(torch.stack([(part * mask).sum(), mask.sum()]).reshape(1, 2)).sum(0)
            self._metrics[mode][f"logits/{name}"].append((s[0] / s[1]).item() if s[1] > 0 else 0.0)
        chosen_rewards = self.beta * (chosen - ref_chosen)
        rejected_rewards = self.beta * (rejected - ref_rejected)
        self._metrics[mode]["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        self._metrics[mode]["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        self._metrics[mode]["rewards/accuracies"].append(acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        self._metrics[mode]["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
        self._metrics[mode]["logps/chosen"].append(acc.gather(chosen).mean().item())
        self._metrics[mode]["logps/rejected"].append(acc.gather(rejected).mean().item())


# ---------------------------------------------------------------------------------------------- Reward


class RewardTrainer(trl.RewardTrainer):
    """``trl.RewardTrainer`` with the Bradley-Terry loss on ``rf.pairwise_sigmoid_loss`` (module docstring)."""

    def __init__(self, *args, **kwargs):
        check_trl_version("RewardTrainer")  # compute_loss below keeps TRL 1.16's metrics bookkeeping
        super().__init__(*args, **kwargs)

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
