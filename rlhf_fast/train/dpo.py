"""Direct preference optimisation (DPO, Rafailov et al. 2023) on prompt/chosen/rejected pairs.

    rlhf-fast train dpo --config dpo.yaml model=runs/sft/model data=data/preferences.jsonl

No reward model and no sampling: the policy ``pi`` is trained so that its implicit reward
``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))`` ranks each pair the labeler's way. With
``delta = (log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-))`` and ``z = beta * delta`` the loss
over a batch of pairs is the mean of ``-log sigmoid(z)`` (``"sigmoid"``, with ``label_smoothing`` eps:
``-(1-eps) log sigmoid(z) - eps log sigmoid(-z)``), ``(delta - 1/(2 beta))^2`` (``"ipo"``) or
``relu(1 - z)`` (``"hinge"``).

The reference log-probs are constants: they are computed once, before the first step and without
gradients, for every training and held-out pair, by the frozen reference model (``ref_model``, or the
initial policy itself when it is None), and kept per pair. Each step then runs only the policy.

``ops="fused"`` computes the loss with ``rf.linear_dpo_loss`` from the final hidden states and the lm_head
weight (the ``[2B, T, V]`` logits are never built); ``ops="reference"`` with the model's logits, ``log_softmax``
and the DPO formulas in plain PyTorch. Reported: the loss, ``reward_accuracy`` (the fraction of pairs whose
chosen answer gets the higher implicit reward), ``reward_margin`` and the mean ``chosen_rewards`` /
``rejected_rewards`` on the training batches; on held-out pairs the same accuracy and margin, and the
policy's own log-prob margin ``log pi(y+) - log pi(y-)`` next to the reference's.

Distributed: each process takes an equal share of every batch of pairs; the loss is a mean over pairs, so
DDP's average of the gradients is the gradient of the global mean.
"""

import time
from dataclasses import dataclass
from typing import Literal

import torch

from . import distributed
from .config import SupervisedConfig, check_dpo
from .data import collate_preferences, tokenize_preferences
from .loop import (begin_training, end_step, end_training, eval_due, finish_run, load_data,
                   micro_batches, optimizer_step, start_run)  # fmt: skip
from .metrics import progress
from .models import load_causal_lm, load_tokenizer
from .runtime import autocast_context

METRICS = ("chosen_rewards", "rejected_rewards", "reward_accuracy", "reward_margin")  # of ops.dpo_loss


@dataclass
class Config(SupervisedConfig):
    model: str = ""  # causal LM to train (usually the SFT model): a local directory or a hub name
    ref_model: str | None = None  # frozen reference; None: the initial policy (``model``)
    data: str = ""  # prompt/chosen/rejected records (or chosen/rejected message lists)
    eval_data: str | None = None
    out_dir: str = "runs/dpo"
    beta: float = 0.1  # strength of the pull towards the reference (the KL coefficient of the objective)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0  # sigmoid loss: assumed probability that a label is flipped (cDPO)
    average_log_prob: bool = False  # mean instead of sum of the token log-probs of each answer
    lr: float = 1e-6  # TRL's default: the implicit reward moves fast on a pretrained model

    def validate(self) -> None:
        check_dpo(self)  # every check of these options: train/config.py


def _batch(data, idx: list[int], tokenizer, device) -> dict:
    """The pairs ``idx`` of ``data`` as one ``[2B, T]`` batch on ``device``: chosen rows, then rejected rows."""
    return {k: v.to(device) for k, v in collate_preferences([data[j] for j in idx], tokenizer.pad_token_id).items()}


@torch.no_grad()
def pair_logprobs(ops, model, data, tokenizer, device, precision, batch_size: int, *, average: bool):
    """``(chosen [N], rejected [N])`` float32 sequence log-probs of the answers of all ``N`` pairs of ``data``
    under ``model`` (prompt tokens not counted). Each process scores every ``world``-th pair; the sum over
    processes fills in the rest, so every process ends up with all of them."""
    chosen = torch.zeros(len(data), device=device)
    rejected = torch.zeros(len(data), device=device)
    mine = list(range(distributed.rank(), len(data), distributed.world_size()))
    for i in range(0, len(mine), batch_size):
        idx = mine[i : i + batch_size]
        batch = _batch(data, idx, tokenizer, device)
        with autocast_context(device, precision):
            logp = ops.sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                         average=average).float()  # fmt: skip
        chosen[idx], rejected[idx] = logp[: len(idx)], logp[len(idx) :]
    return distributed.global_sum(chosen), distributed.global_sum(rejected)


def evaluate(ops, model, data, ref_logp, tokenizer, device, cfg: Config) -> dict:
    """Held-out implicit-reward accuracy and margin, and the policy's and the reference's mean log-prob
    margin ``log p(y+) - log p(y-)``."""
    chosen, rejected = pair_logprobs(ops, model, data, tokenizer, device, cfg.precision, cfg.batch_size,
                                     average=cfg.average_log_prob)  # fmt: skip
    ref_chosen, ref_rejected = ref_logp
    chosen_r, rejected_r = cfg.beta * (chosen - ref_chosen), cfg.beta * (rejected - ref_rejected)
    return {"reward_accuracy": float((chosen_r > rejected_r).float().mean()),
            "reward_margin": float((chosen_r - rejected_r).mean()),
            "logp_margin": float((chosen - rejected).mean()),
            "ref_logp_margin": float((ref_chosen - ref_rejected).mean())}  # fmt: skip


def train(cfg: Config) -> dict:
    device, out, ops = start_run(cfg)

    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, dtype="fp32", device=device)
    data, eval_data, steps = load_data(tokenize_preferences, cfg, tokenizer)

    # ---- reference log-probs, once per pair, before any update (and before a resumed run loads its
    # checkpoint, so that the initial policy is the reference then too)
    ref = load_causal_lm(cfg.ref_model, dtype="fp32", device=device) if cfg.ref_model else model
    ref_logp = {name: pair_logprobs(ops, ref, pairs, tokenizer, device, cfg.precision, cfg.batch_size,
                                    average=cfg.average_log_prob)
                for name, pairs in (("train", data), ("eval", eval_data)) if pairs is not None}  # fmt: skip
    (ref_chosen, ref_rejected), ref_eval = ref_logp["train"], ref_logp.get("eval")
    del ref

    ddp_model, opt, sched, saved, start, logger = begin_training(model, cfg, out, device, steps)
    t_start, tokens, ev = time.perf_counter(), 0, None
    for step in progress(range(start, steps), desc="dpo", total=steps - start):
        sums = dict.fromkeys(("loss", *METRICS), 0.0)
        for idx in micro_batches(step, len(data), cfg):
            batch = _batch(data, idx, tokenizer, device)
            with autocast_context(device, cfg.precision):
                loss, metrics = ops.dpo_loss(ddp_model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                             ref_chosen[idx], ref_rejected[idx], beta=cfg.beta,
                                             loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                                             average_log_prob=cfg.average_log_prob)  # fmt: skip
            (loss / cfg.grad_accum).backward()  # mean over the micro-batch's pairs -> mean over the batch
            for k, v in (("loss", loss), *((k, metrics[k]) for k in METRICS)):
                sums[k] += float(v.detach()) / cfg.grad_accum
            tokens += int(batch["attention_mask"].sum())
        grad_norm = optimizer_step(model, opt, sched, cfg.max_grad_norm)
        record = {k: float(distributed.global_mean(torch.tensor(v))) for k, v in sums.items()}
        record |= {"grad_norm": grad_norm, "lr": sched.get_last_lr()[0]}
        ev = None
        if eval_due(step, cfg, eval_data):
            ev = evaluate(ops, model, eval_data, ref_eval, tokenizer, device, cfg)
            record |= {f"eval_{k}": v for k, v in ev.items() if k != "ref_logp_margin"}
        end_step(step, steps, record, cfg, out, logger, saved)
    tokens = int(distributed.global_sum(torch.tensor(float(tokens))))
    summary = end_training(logger, t_start, cfg, device, steps, record["loss"] if steps > start else None,
                           pairs=(steps - start) * cfg.batch_size, tokens=tokens)  # fmt: skip
    if eval_data is not None:  # the last step's evaluation when it had one (the model has not changed since)
        ev = ev if ev is not None else evaluate(ops, model, eval_data, ref_eval, tokenizer, device, cfg)
        summary |= {f"eval_{k}": v for k, v in ev.items()} | {"eval_pairs": len(eval_data)}
    finish_run(out, model, tokenizer, summary, title=f"DPO ({cfg.ops} ops, {cfg.loss_type} loss)")
    return summary
