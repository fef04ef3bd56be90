"""Small pieces the trainers share, so each trainer stays a straight line. Every trainer (sft, reward, dpo,
ppo, best_of_n): the config base ``RunConfig``, the start and the end of a run, the optimizer with its
warmup. The supervised trainers (sft, reward, dpo) and best_of_n: the step count, micro-batches and a step
with gradient clipping. The supervised ones alone: ``SupervisedConfig``, the order of the data, evaluation,
the end of a step (logging, checkpoints) and of training."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from . import distributed
from .checkpoint import maybe_save, resume_state
from .config import save_config
from .errors import UserError
from .metrics import MetricsLogger, plot_metrics, write_json
from .models import enable_gradient_checkpointing
from .ops import get_ops
from .runs import prepare_out_dir, write_dir_atomically
from .runtime import peak_memory_mib, reset_peak_memory, resolve_device, seed_everything, seed_for
from .validation import check_options


def start_run(cfg):
    """The first lines of a trainer: the process group (under torchrun), the seeds, this process's device,
    ``cfg.out_dir`` checked and made ready (``runs.prepare_out_dir``: a used one only with ``resume`` or
    ``overwrite``) with the config saved in it (by rank 0) and the op set: ``(device, out_dir, ops)``."""
    distributed.init()
    if callable(getattr(cfg, "validate", None)):  # a config's own checks (PPO's need the world size)
        cfg.validate()
    check_options(cfg)
    seed_everything(cfg.seed)
    device = distributed.device_for_rank(resolve_device(cfg.device))
    out = prepare_out_dir(cfg)
    if distributed.is_main():
        save_config(cfg, out / "config.yaml")
    return device, out, get_ops(cfg.ops)


def finish_run(out_dir, model, tokenizer, summary: dict, *, title: str) -> None:
    """The last lines of a trainer: rank 0 saves the model (gathered first when FSDP shards it: every rank
    takes part) and tokenizer to ``<out_dir>/model`` (atomically), plots the metrics to ``curves.png`` and
    writes ``summary.json``; every rank waits for it."""
    out = Path(out_dir)
    save_pretrained(model, out / "model", tokenizer=tokenizer)
    if distributed.is_main():
        plot_metrics(out / "metrics.jsonl", out / "curves.png", title=title)
        write_json(out / "summary.json", summary)
    distributed.barrier()


def save_pretrained(model, path, *, tokenizer=None) -> None:
    """``model.save_pretrained(path)`` (and ``tokenizer.save_pretrained(path)``) by rank 0, with the whole
    state dict of an FSDP2-sharded model (gathered by every rank). Written into a hidden temporary directory
    and renamed into place, as checkpoints are: a kill while writing leaves the previous ``path`` or none,
    never a half-written model."""
    state = distributed.full_state_dict(model) if distributed.is_sharded(model) else None

    def write(tmp):
        model.save_pretrained(tmp, **({"state_dict": state} if state is not None else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    if distributed.is_main():
        write_dir_atomically(path, write)


def begin_training(model, cfg, out_dir, device, steps: int):
    """The lines between building a supervised trainer's model and its loop: activation checkpointing
    (``cfg.gradient_checkpointing``), DDP or FSDP2 when distributed
    (``cfg.parallel``), AdamW with ``cfg``'s schedule, resume from the latest checkpoint (``cfg.resume``), the
    metrics logger (rank 0) and the peak-memory window. Returns ``(ddp_model, opt, sched, saved, start,
    logger)``: ``ddp_model`` is what the forward passes that train go through (the DDP wrapper, or ``model``
    itself), ``saved`` what ``maybe_save`` writes."""
    enable_gradient_checkpointing(model, cfg.gradient_checkpointing)
    ddp_model = distributed.wrap(model, device, cfg.parallel)  # before the optimizer: FSDP swaps the parameters
    opt, sched = make_optimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                warmup_steps=cfg.warmup_steps, schedule=cfg.lr_schedule, total_steps=steps)
    saved = {"modules": {"model": model}, "optimizers": {"model": opt}, "schedulers": {"model": sched}}
    start = maybe_resume(out_dir, cfg.resume, **saved)
    logger = MetricsLogger(out_dir, enabled=distributed.is_main())
    reset_peak_memory(device)
    return ddp_model, opt, sched, saved, start, logger


def load_data(tokenize, cfg, tokenizer) -> tuple[list, list | None, int]:
    """``cfg.data`` and ``cfg.eval_data`` (if any) through ``tokenize(path, tokenizer, cfg.max_length)``, and the
    run's number of optimizer steps over the training rows (``plan_steps``)."""
    data = tokenize(cfg.data, tokenizer, cfg.max_length)
    eval_data = tokenize(cfg.eval_data, tokenizer, cfg.max_length) if cfg.eval_data else None
    return data, eval_data, plan_steps(len(data), cfg)


def eval_due(step: int, cfg, eval_data) -> bool:
    """Whether optimizer step ``step`` (0-based) ends with an evaluation (every ``cfg.eval_every`` steps)."""
    return eval_data is not None and cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0


def end_step(step: int, steps: int, record: dict, cfg, out_dir, logger, saved: dict) -> None:
    """After optimizer step ``step`` (0-based) of ``steps``: log ``record`` every ``cfg.log_every`` steps and at
    the last one, and write the checkpoint ``cfg.save_every`` asks for (none at the last step: the final
    model follows)."""
    if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
        logger.log(step + 1, record)
    maybe_save(out_dir, step + 1, cfg.save_every if step + 1 < steps else 0, cfg.keep_checkpoints, **saved)


def end_training(logger, t_start: float, cfg, device, steps: int, final_loss: float | None, **counts) -> dict:
    """The loop's end: the metrics log closed, and the summary keys the supervised trainers share, with a
    rate per count (``tokens=n`` -> ``tokens_per_s``) over the loop's time since ``t_start``."""
    seconds = time.perf_counter() - t_start
    logger.close()
    summary = {"steps": steps, "final_loss": final_loss}
    summary |= {f"{name}_per_s": n / seconds if seconds > 0 else None for name, n in counts.items()}
    return summary | {"peak_memory_mib": peak_memory_mib(device), "ops": cfg.ops}


def batch_indices(n: int, batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a permutation seeded by ``(seed, epoch)``, cut into full batches
    (a last partial batch is dropped, so every step sees ``batch_size`` rows and every rank its share)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(seed, epoch))).tolist()
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def total_steps(n: int, batch_size: int, epochs: int, max_steps: int) -> int:
    if n < batch_size:
        raise UserError(f"batch_size ({batch_size}) is larger than the data ({n} rows after tokenization): "
                        "not one full batch")  # fmt: skip
    steps = (n // batch_size) * epochs
    return min(steps, max_steps) if max_steps > 0 else steps


def plan_steps(n: int, cfg) -> int:
    """The optimizer steps of a run over ``n`` rows (``total_steps`` of ``cfg.batch_size``, ``cfg.epochs``,
    ``cfg.max_steps``), after checking that each global batch splits evenly over the processes and into
    ``cfg.grad_accum`` micro-batches."""
    if cfg.batch_size % (cfg.grad_accum * distributed.world_size()):
        raise UserError(f"batch_size ({cfg.batch_size}) must be divisible by grad_accum ({cfg.grad_accum}) "
                         f"times the number of processes ({distributed.world_size()})")  # fmt: skip
    return total_steps(n, cfg.batch_size, cfg.epochs, cfg.max_steps)


def micro_batches(step: int, n: int, cfg) -> list[list[int]]:
    """This process's ``cfg.grad_accum`` micro-batches (row indices) of the global batch of optimizer step
    ``step`` over ``n`` rows: batch ``step % steps_per_epoch`` of epoch ``step // steps_per_epoch`` of
    ``batch_indices``, cut into equal shares for the processes."""
    epoch, b = divmod(step, n // cfg.batch_size)
    rows = distributed.shard(batch_indices(n, cfg.batch_size, seed=cfg.seed, epoch=epoch)[b], cfg.batch_size)
    micro = len(rows) // cfg.grad_accum
    return [rows[i : i + micro] for i in range(0, len(rows), micro)]


LR_SCHEDULES = ("constant", "linear")


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


def make_optimizer(params, *, lr: float, weight_decay: float, warmup_steps: int, schedule: str = "constant",
                   total_steps: int | None = None):  # fmt: skip
    """AdamW and a linear warmup to ``lr`` over ``warmup_steps``; then constant, or with
    ``schedule="linear"`` a linear decay to 0 at ``total_steps``."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "linear" and not total_steps:
        raise ValueError("a linear lr_schedule needs the total number of steps")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        if schedule == "constant" or step < warmup_steps:
            return warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(model, opt, sched, max_grad_norm: float) -> float:
    """Clip, step, zero: returns the gradient norm before clipping."""
    norm = distributed.clip_grad_norm(model.parameters(), max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


def maybe_resume(out_dir, resume: bool, *, modules, optimizers, schedulers) -> int:
    """Load the latest checkpoint of ``out_dir`` when ``resume`` (and one exists); the step to start from."""
    state = resume_state(out_dir, resume, modules=modules, optimizers=optimizers, schedulers=schedulers)
    return 0 if state is None else int(state["step"])
