"""Every trainer option and every check of one, in one file.

- The options every trainer shares: ``RunConfig`` (which ops, how the processes split the model, the optimizer's
  step, checkpoints, resume, seed, device, precision) and ``SupervisedConfig`` (what sft, rm and dpo add: epochs,
  batches, schedule, lengths, evaluation). Each trainer's ``Config`` sits at the top of its own module (``sft``,
  ``reward``, ``dpo``, ``ppo``, ``best_of_n``), extends one of them with its models, data and loss, and hands its
  checks to this file: its ``validate()`` is one call to ``check_<trainer>`` below.
- The checks, in the order a run meets them (``check_config``, first thing in ``loop.start_run``; ``rlhf-fast``
  calls ``validate()`` before it starts a trainer):
  1. the trainer's own (``check_sft`` ... ``check_ppo``, which runs ``check_loss_options``): required paths,
     choices and the relations between options (a batch that splits over the processes, a ``loss_type`` that
     sets ``agg``), a ``ValueError`` naming the option (a ``UserError`` for sft's and rm's missing paths);
  2. ``check_options``: one table of ranges by option name (counts >= 1, rates > 0, discounts in [0, 1], no NaN
     or inf) for whichever of those options a config has, a ``UserError`` naming the option and its value.
- Reading and writing configs (YAML files, ``key=value`` overrides, values checked against the annotations):
  ``config_io.py``, whose functions are re-exported here (``load_config``, ``save_config``, ...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from ..preference import DPO_LOSS_TYPES
from ..truncation import keys_on
from . import distributed
from .config_io import (add_config_args, config_from_args, config_to_dict, describe_config, load_config,
                        parse_overrides, save_config)  # fmt: skip
from .errors import UserError

__all__ = [
    "KL_MODES", "LM_HEAD_PRECISIONS", "LOSS_TYPES", "LOSS_TYPE_AGG", "RunConfig", "SupervisedConfig",
    "check_best_of_n", "check_config", "check_dpo", "check_loss_options", "check_options", "check_ppo",
    "check_rm", "check_sft", "check_shares", "sampling_truncation",
    "add_config_args", "config_from_args", "config_to_dict", "describe_config", "load_config", "parse_overrides",
    "save_config",
]  # fmt: skip

# PPO: where the KL penalty goes, and TRL's loss_type -> the agg it sets (ops.micro_aggregation: the normalisers)
KL_MODES = ("reward", "k3_loss", "full_kl_loss")
LOSS_TYPE_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                 "dapo": "token-mean"}  # fmt: skip
LOSS_TYPES = tuple(LOSS_TYPE_AGG)
LM_HEAD_PRECISIONS = ("auto", "fp32")  # ppo: the lm_head matmul of the log-probs under autocast, or in float32


# ---------------------------------------------------------------------------------------------------
# the shared options


@dataclass
class RunConfig:
    """The run options every trainer shares (sft, rm, dpo, ppo, best-of-n): which ops, how the processes
    split the model, the optimizer's step, checkpoints, resume, seeds, device and precision. Each trainer's
    ``Config`` extends it with its models, data and loss (and may redeclare a default, e.g. ``lr``);
    config.yaml and ``--print-config`` list a trainer's own options first and these last."""

    ops: Literal["fused", "reference"] = "fused"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2) the models
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5
    warmup_steps: int = 0  # optimizer steps of linear warmup (counted over the whole run)
    max_grad_norm: float = 1.0
    save_every: int = 0  # steps (best-of-n: rounds) between checkpoints (0: none; the final model is always saved)
    keep_checkpoints: int = 2
    resume: bool = False  # continue the run in out_dir from its latest checkpoint (same config; see runs.py)
    overwrite: bool = False  # delete the run in out_dir first (a used out_dir is refused otherwise)
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # bf16: autocast on any device; auto: bf16 on CUDA, else fp32
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)


@dataclass
class SupervisedConfig(RunConfig):
    """The options the supervised trainers (sft, rm, dpo) add to ``RunConfig``; each trainer's ``Config``
    adds its own (model, data, out_dir and the loss's options) and its ``lr``."""

    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many optimizer steps (0: no limit)
    batch_size: int = 32  # sequences (sft) or pairs (rm, dpo) per optimizer step, over all processes
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "linear"] = "constant"  # after the warmup: constant, or linear to 0
    max_length: int = 512
    eval_every: int = 0
    log_every: int = 10


# ---------------------------------------------------------------------------------------------------
# each trainer's own checks (its Config.validate())


def check_config(cfg) -> None:
    """Every check of ``cfg``: its trainer's own (``cfg.validate()``, if it has one), then ``check_options``."""
    if callable(getattr(cfg, "validate", None)):
        cfg.validate()
    check_options(cfg)


def check_sft(cfg) -> None:
    _require(cfg, ("model", "data"), "a causal LM and an SFT dataset", UserError)


def check_rm(cfg) -> None:
    _require(cfg, ("model", "data"), "a causal LM or reward model, and preference pairs", UserError)


def check_dpo(cfg) -> None:
    _require(cfg, ("model", "data"), "a causal LM and preference pairs")
    if cfg.beta <= 0:
        raise ValueError(f"beta must be > 0, got {cfg.beta}")
    if cfg.loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {cfg.loss_type!r}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.grad_accum < 1 or cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"grad_accum ({cfg.grad_accum}) must divide batch_size ({cfg.batch_size})")


def check_ppo(cfg) -> None:
    if not cfg.policy:
        raise ValueError("policy must name the causal LM to train (a local directory or hub name)")
    if not cfg.prompts:
        raise ValueError("prompts must name a dataset of prompts")
    _one_reward(cfg)
    if cfg.kl_mode not in KL_MODES:
        raise ValueError(f"kl_mode must be one of {KL_MODES}, got {cfg.kl_mode!r}")
    if cfg.advantage in ("grpo", "rloo") and cfg.samples_per_prompt < 2:
        raise ValueError(f"advantage={cfg.advantage!r} needs samples_per_prompt >= 2")
    rollout = cfg.prompts_per_step * cfg.samples_per_prompt
    if cfg.minibatch_size < 1 or rollout % cfg.minibatch_size:
        raise ValueError(f"minibatch_size ({cfg.minibatch_size}) must divide prompts_per_step * "
                         f"samples_per_prompt ({rollout})")  # fmt: skip
    check_shares(cfg, "minibatch_size")
    if cfg.prompts_per_step % distributed.world_size():
        raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the number of "
                         f"processes ({distributed.world_size()})")  # fmt: skip
    check_sampling(cfg)
    check_loss_options(cfg)


def check_best_of_n(cfg) -> None:
    _require(cfg, ("policy", "prompts"), "a causal LM and a dataset of prompts")
    _one_reward(cfg)
    if cfg.n < 1 or cfg.rounds < 1 or cfg.prompts_per_step < 1:
        raise ValueError(f"n ({cfg.n}), rounds ({cfg.rounds}) and prompts_per_step "
                         f"({cfg.prompts_per_step}) must be >= 1")  # fmt: skip
    if cfg.prompts_per_round and cfg.prompts_per_round < cfg.batch_size:
        raise ValueError(f"prompts_per_round ({cfg.prompts_per_round}) must be at least batch_size "
                         f"({cfg.batch_size}): one kept completion per prompt")  # fmt: skip
    check_shares(cfg, "batch_size")
    check_sampling(cfg)


def check_shares(cfg, name: str, error: type[ValueError] = ValueError) -> None:
    """The global batch ``cfg.<name>`` splits evenly over the processes and into ``grad_accum`` micro-batches."""
    size, world = getattr(cfg, name), distributed.world_size()
    if cfg.grad_accum < 1 or size % (cfg.grad_accum * world):
        raise error(f"{name} ({size}) must be divisible by grad_accum ({cfg.grad_accum}) times the number of "
                    f"processes ({world})")  # fmt: skip


def _require(cfg, names: tuple[str, ...], what: str, error: type[ValueError] = ValueError) -> None:
    if not all(getattr(cfg, name) for name in names):
        raise error(f"{' and '.join(names)} must be set ({what})")


def _one_reward(cfg) -> None:
    if (cfg.reward_model is None) == (cfg.reward_fn is None):
        raise ValueError("give exactly one of reward_model and reward_fn")


def check_sampling(cfg) -> None:
    """The sampling keys: ``temperature > 0``, ``top_k`` an int >= 0, ``top_p`` in (0, 1], ``min_p`` in [0, 1)
    and ``lm_head_precision`` (ppo) ``auto`` or ``fp32``."""
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {cfg.temperature}")
    k, p, m = cfg.top_k, cfg.top_p, cfg.min_p
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {k!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1: off), got {p!r}")
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
        raise ValueError(f"min_p must be a number in [0, 1) (0: off), got {m!r}")
    precision = getattr(cfg, "lm_head_precision", "auto")
    if precision not in LM_HEAD_PRECISIONS:
        raise ValueError(f"lm_head_precision must be one of {LM_HEAD_PRECISIONS}, got {precision!r}")


def sampling_truncation(cfg) -> dict:
    """The truncation keywords of ``rf.sample_tokens`` and the log-prob ops for a ppo / best-of-n config: only
    the keys that are on (``top_k > 0``, ``top_p < 1``, ``min_p > 0``; vLLM's sampler), ``{}`` when none is."""
    return keys_on(cfg.top_k, cfg.top_p, cfg.min_p)


# ---------------------------------------------------------------------------------------------------
# the PPO policy loss's options


def check_loss_options(cfg) -> None:
    """``ValueError`` naming the PPO config key (``agg``, ``loss_mode``, ``loss_type``, ``delta``,
    ``kl_bias_correction``, the clips) whose value the policy loss cannot take, before a model is loaded:
    ``cfg.policy_loss_options()`` builds the ``rf.PolicyLossOptions``, whose fields are the keys' names."""
    cfg.policy_loss_options()
    if cfg.loss_type is not None:
        if cfg.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be None or one of {LOSS_TYPES}, got {cfg.loss_type!r}")
        preset = LOSS_TYPE_AGG[cfg.loss_type]
        if cfg.agg not in ("token-mean", preset):  # token-mean: the default, left as it is
            raise ValueError(f"loss_type={cfg.loss_type!r} sets agg={preset!r} (and its normaliser); "
                             f"agg={cfg.agg!r} contradicts it: leave agg unset")  # fmt: skip
    if cfg.kl_bias_correction and cfg.kl_mode != "k3_loss":
        raise ValueError(f"kl_bias_correction weights the k3 KL term of the loss by the ratio: it needs "
                         f"kl_mode='k3_loss', got kl_mode={cfg.kl_mode!r}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# the ranges every trainer's options share


# ints >= 1, ints >= 0 (with what 0 means), ints >= 2; floats > 0, floats >= 0
_AT_LEAST_1 = ("batch_size", "grad_accum", "epochs", "steps", "rounds", "n", "prompts_per_step", "minibatch_size",
               "ppo_epochs", "max_new_tokens", "keep_checkpoints", "log_every", "eval_samples",
               "samples_per_prompt", "kl_horizon")  # fmt: skip
_AT_LEAST_0 = {"max_steps": "0: no limit", "warmup_steps": "", "eval_every": "0: no evaluation during the run",
               "save_every": "0: no checkpoint", "prompts_per_round": "0: every prompt each round"}  # fmt: skip
_AT_LEAST_2 = ("max_length", "max_prompt_length")
_POSITIVE_FLOATS = ("lr", "critic_lr", "max_grad_norm", "temperature", "target_kl", "value_clip")
_NON_NEGATIVE_FLOATS = ("weight_decay", "kl_coef", "entropy_coef")
_UNIT_INTERVAL = ("gamma", "lam")  # GAE's discount and lambda


def check_options(cfg) -> None:
    """``UserError`` for the first option of ``cfg`` out of its range (the tables above), run before a model is
    loaded or ``out_dir`` is touched. Only the fields a config has are checked, so one table serves every
    trainer; an optional option set to None is not."""
    _check_finite(cfg)
    for name in _AT_LEAST_1:
        _check_int(cfg, name, 1)
    for name, note in _AT_LEAST_0.items():
        _check_int(cfg, name, 0, note)
    for name in _AT_LEAST_2:
        _check_int(cfg, name, 2)
    for name in _POSITIVE_FLOATS:
        value = getattr(cfg, name, None)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise UserError(f"{name} must be a number > 0, got {value!r}")
    for name in _NON_NEGATIVE_FLOATS:
        value = getattr(cfg, name, None)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise UserError(f"{name} must be a number >= 0, got {value!r}")
    for name in _UNIT_INTERVAL:
        value = getattr(cfg, name, None)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise UserError(f"{name} must be a number in [0, 1], got {value!r}")
    out_dir = getattr(cfg, "out_dir", None)
    if out_dir is not None and not str(out_dir).strip():
        raise UserError("out_dir must name a directory, got an empty string")


def _check_int(cfg, name: str, lowest: int, note: str = "") -> None:
    if not hasattr(cfg, name):
        return
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise UserError(f"{name} must be an int >= {lowest}{f' ({note})' if note else ''}, got {value!r}")


def _check_finite(cfg) -> None:
    """No float option is NaN or infinite: every one is a number the run computes with (a NaN reward penalty
    would train on NaN scores); the free-form mappings (``extra``) are not looked into."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{field.name} must be a finite number, got {value!r}")
