"""Supervised fine-tuning: next-token loss on the completion tokens of prompt/completion (or ``messages``) data.

    rlhf-fast train sft --config sft.yaml model=Qwen/Qwen2.5-0.5B data=data/sft.jsonl

The loss is the mean negative log-likelihood over the completion tokens of the global batch, computed by
``rf.linear_logprobs`` from the final hidden states and the lm_head weight (``ops="fused"``: the
``[B, T, V]`` logits are never built) or by ``cross_entropy`` on the model's logits (``ops="reference"``).
"""

import time
from dataclasses import dataclass

import torch

from . import distributed
from .config import SupervisedConfig, check_sft
from .data import collate_sft, tokenize_sft
from .loop import (begin_training, end_step, end_training, eval_due, finish_run, load_data,
                   micro_batches, optimizer_step, start_run)  # fmt: skip
from .metrics import progress
from .models import load_causal_lm, load_tokenizer
from .runtime import autocast_context


@dataclass
class Config(SupervisedConfig):
    model: str = ""  # causal LM to fine-tune: a local directory or a hub name
    data: str = ""  # prompt/completion, messages or text records (JSONL, Parquet, a hub dataset)
    eval_data: str | None = None
    out_dir: str = "runs/sft"
    lr: float = 1e-4

    def validate(self) -> None:
        check_sft(self)  # every check of these options: train/config.py


def _nll(ops, model, rows, tokenizer, device, precision):
    batch = {k: v.to(device) for k, v in collate_sft(rows, tokenizer.pad_token_id).items()}
    with autocast_context(device, precision):
        return ops.sft_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


@torch.no_grad()
def evaluate(ops, model, data, tokenizer, device, precision, batch_size: int) -> float:
    """Mean completion-token NLL over ``data`` (this rank's share, summed over ranks)."""
    total, count = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    rows = distributed.shard(list(range(len(data))), len(data) - len(data) % distributed.world_size())
    for i in range(0, len(rows), batch_size):
        nll, n = _nll(ops, model, [data[j] for j in rows[i : i + batch_size]], tokenizer, device, precision)
        total, count = total + nll.float(), count + n
    return float(distributed.global_sum(total) / distributed.global_sum(count).clamp(min=1))


def train(cfg: Config) -> dict:
    device, out, ops = start_run(cfg)

    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, dtype="fp32", device=device)
    data, eval_data, steps = load_data(tokenize_sft, cfg, tokenizer)

    ddp_model, opt, sched, saved, start, logger = begin_training(model, cfg, out, device, steps)
    t_start, tokens = time.perf_counter(), 0
    for step in progress(range(start, steps), desc="sft", total=steps - start):
        chunks = [[data[j] for j in idx] for idx in micro_batches(step, len(data), cfg)]
        # Normalise by the global number of completion tokens: the mean over the global batch, however the
        # rows are split across micro-batches and processes (DDP averages gradients: times world size).
        counts = [sum(sum(t != -100 for t in r["labels"][1:]) for r in chunk) for chunk in chunks]
        global_count = float(distributed.global_sum(torch.tensor(float(sum(counts)))))
        loss_sum = 0.0
        for chunk in chunks:
            nll, _ = _nll(ops, ddp_model, chunk, tokenizer, device, cfg.precision)
            (nll * distributed.world_size() / global_count).backward()
            loss_sum += float(nll.detach())
        grad_norm = optimizer_step(model, opt, sched, cfg.max_grad_norm)
        tokens += int(distributed.global_sum(torch.tensor(float(sum(len(r["input_ids"]) for c in chunks for r in c)))))
        loss = float(distributed.global_sum(torch.tensor(loss_sum))) / global_count
        record = {"loss": loss, "grad_norm": grad_norm, "lr": sched.get_last_lr()[0]}
        if eval_due(step, cfg, eval_data):
            record["eval_loss"] = evaluate(ops, model, eval_data, tokenizer, device, cfg.precision, cfg.batch_size)
        end_step(step, steps, record, cfg, out, logger, saved)
    summary = end_training(logger, t_start, cfg, device, steps, record["loss"] if steps > start else None,
                           tokens=tokens)  # fmt: skip
    if eval_data is not None:  # the last step's evaluation when it had one (the model has not changed since)
        done = steps > start and "eval_loss" in record
        summary["eval_loss"] = record["eval_loss"] if done else evaluate(ops, model, eval_data, tokenizer, device,
                                                                          cfg.precision, cfg.batch_size)  # fmt: skip
    finish_run(out, model, tokenizer, summary, title=f"SFT ({cfg.ops} ops)")
    return summary
