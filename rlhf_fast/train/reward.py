"""Reward model: a scalar head on a causal LM, trained on preference pairs with the Bradley-Terry loss.

    rlhf-fast train rm --config rm.yaml model=runs/sft/model data=data/preferences.jsonl

``AutoModelForSequenceClassification(num_labels=1)`` scores prompt + completion at its last token; the loss
over a batch of pairs is ``mean(-log sigmoid(r(x, y+) - r(x, y-)))`` (``rf.pairwise_sigmoid_loss``, or
``F.logsigmoid`` with ``ops="reference"``). Reported: the loss and the pairwise accuracy (the fraction of pairs
whose chosen completion scores higher), on the training batches and on held-out pairs.
"""

import time
from dataclasses import dataclass

import torch

from . import distributed
from .config import SupervisedConfig, check_rm
from .data import collate_preferences, tokenize_preferences
from .loop import (begin_training, end_step, end_training, eval_due, finish_run, load_data,
                   micro_batches, optimizer_step, start_run)  # fmt: skip
from .metrics import progress
from .models import build_reward_model, load_tokenizer, reward_scores
from .runtime import autocast_context


@dataclass
class Config(SupervisedConfig):
    model: str = ""  # a causal LM (usually the SFT model) or a saved reward model
    data: str = ""  # prompt/chosen/rejected records (or chosen/rejected message lists)
    eval_data: str | None = None
    out_dir: str = "runs/rm"
    lr: float = 5e-5

    def validate(self) -> None:
        check_rm(self)  # every check of these options: train/config.py


def _pair_scores(model, rows, tokenizer, device, precision):
    """``(chosen [B], rejected [B])`` scores of a list of tokenized pairs."""
    batch = collate_preferences(rows, tokenizer.pad_token_id)
    with autocast_context(device, precision):
        scores = reward_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    return scores[: len(rows)], scores[len(rows) :]


@torch.no_grad()
def evaluate(model, data, tokenizer, device, precision, batch_size: int) -> dict:
    """Pairwise accuracy and mean margin ``r(y+) - r(y-)`` over ``data`` (split over ranks)."""
    correct = margin = torch.zeros((), device=device)
    idx = distributed.shard(list(range(len(data))), len(data) - len(data) % distributed.world_size())
    for i in range(0, len(idx), batch_size):
        c, r = _pair_scores(model, [data[j] for j in idx[i : i + batch_size]], tokenizer, device, precision)
        correct, margin = correct + (c > r).sum(), margin + (c - r).sum()
    n = len(idx) * distributed.world_size()
    return {"accuracy": float(distributed.global_sum(correct)) / n, "margin": float(distributed.global_sum(margin)) / n,
            "n": n}  # fmt: skip


def train(cfg: Config) -> dict:
    device, out, ops = start_run(cfg)

    tokenizer = load_tokenizer(cfg.model)
    model = build_reward_model(cfg.model, tokenizer=tokenizer, dtype="fp32", device=device)
    data, eval_data, steps = load_data(tokenize_preferences, cfg, tokenizer)

    ddp_model, opt, sched, saved, start, logger = begin_training(model, cfg, out, device, steps)
    t_start, pairs, ev = time.perf_counter(), 0, None
    for step in progress(range(start, steps), desc="reward model", total=steps - start):
        loss_sum, correct = 0.0, 0
        for idx in micro_batches(step, len(data), cfg):
            chosen, rejected = _pair_scores(ddp_model, [data[j] for j in idx], tokenizer, device, cfg.precision)
            loss = ops.pairwise_loss(chosen, rejected)  # mean over the micro-batch's pairs
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
            correct += int((chosen > rejected).sum())
        grad_norm = optimizer_step(model, opt, sched, cfg.max_grad_norm)
        pairs += cfg.batch_size
        record = {"loss": float(distributed.global_mean(torch.tensor(loss_sum))),
                  "accuracy": float(distributed.global_sum(torch.tensor(float(correct)))) / cfg.batch_size,
                  "grad_norm": grad_norm, "lr": sched.get_last_lr()[0]}  # fmt: skip
        ev = None
        if eval_due(step, cfg, eval_data):
            ev = evaluate(model, eval_data, tokenizer, device, cfg.precision, cfg.batch_size)
            record |= {f"eval_{k}": v for k, v in ev.items() if k != "n"}
        end_step(step, steps, record, cfg, out, logger, saved)
    summary = end_training(logger, t_start, cfg, device, steps, record["loss"] if steps > start else None,
                           pairs=pairs)  # fmt: skip
    if eval_data is not None:  # the last step's evaluation when it had one (the model has not changed since)
        ev = ev if ev is not None else evaluate(model, eval_data, tokenizer, device, cfg.precision,
                                                cfg.batch_size)  # fmt: skip
        summary |= {"eval_accuracy": ev["accuracy"], "eval_margin": ev["margin"], "eval_pairs": ev["n"]}
    finish_run(out, model, tokenizer, summary, title=f"reward model ({cfg.ops} ops)")
    return summary
