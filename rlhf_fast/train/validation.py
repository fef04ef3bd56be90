"""The checks every trainer's options share, run first thing (``loop.start_run``): a count that must be
positive, a learning rate that must be > 0, a discount in [0, 1], and no float option NaN or infinite... each a
``UserError`` naming the option and its value, before a model is loaded or ``out_dir`` is touched. Only the
fields a config has are checked, so one table serves every trainer; an optional option set to None is not."""

from __future__ import annotations

import dataclasses
import math

from .errors import UserError

__all__ = ["check_options"]

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
    """``UserError`` for the first option of ``cfg`` out of its range (see the tables above)."""
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
