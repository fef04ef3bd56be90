"""Best-of-n rejection sampling: sample n completions per prompt, keep the best, fine-tune on it.

    rlhf-fast train best-of-n --config bon.yaml policy=runs/sft/model reward_model=runs/rm/model \\
        prompts=data/prompts.jsonl

One round is a straight line:
  1. sample ``n`` completions of each prompt of the round from the current policy (``rollout.generate`` on
     the prompts repeated ``n`` times; ancestral sampling at ``temperature``, truncated by ``top_k`` /
     ``top_p`` / ``min_p`` when they are on);
  2. score them with a frozen reward model or a reward function ``(prompts, completions) -> list[float]``
     and keep the highest-scoring completion of each prompt (the first sampled, on ties);
  3. fine-tune the policy on the (prompt, kept completion) pairs with the SFT loss — the mean negative
     log-likelihood of the completion tokens (``ops.sft_nll``: ``rf.linear_logprobs`` from the hidden
     states, or ``cross_entropy`` on the logits with ``ops="reference"``) — for ``epochs`` passes.
``rounds > 1`` repeats it, each round sampling from the policy the previous one left (expert iteration,
ReST, RAFT). Logged per round: the mean score of all samples and of the kept ones, the fine-tuning loss.

Best-of-n sampling is itself a policy, whose KL to the sampler is at most ``log n - (n - 1) / n`` nats;
fine-tuning on its samples distills it. ``eval_prompts`` are scored (one sample each, ``eval_fn`` or the
reward) before the first round and after the last, with the exact KL to the initial policy
(``rollout.evaluate_policy``). Checkpoints are taken between rounds (``save_every`` rounds) and a
resumed run continues from the last one exactly. Under torchrun each process samples a share of the
prompts and fine-tunes on a share of every batch (DDP, or FSDP2 with ``parallel="fsdp"``); a run gives the same
result on any number of processes.
"""

import time
from dataclasses import dataclass, replace

import torch

from . import distributed
from .checkpoint import maybe_save, resume_state
from .data import IGNORE_INDEX, collate_prompts, collate_sft, tokenize_prompts
from .config import RunConfig, check_best_of_n, sampling_truncation
from .loop import finish_run, make_optimizer, micro_batches, optimizer_step, start_run, total_steps
from .metrics import MetricsLogger, progress
from .models import enable_gradient_checkpointing, load_causal_lm, load_tokenizer
from .rollout import function_spec, generate, make_scorers, policy_evaluator, row_seeds
from .runtime import autocast_context, peak_memory_mib, reset_peak_memory


@dataclass
class Config(RunConfig):
    # models and data
    policy: str = ""  # causal LM to improve (a local dir or hub name), usually the SFT model
    reward_model: str | None = None  # a scalar-output sequence classifier (rlhf-fast train rm)
    reward_fn: str | None = None  # or "module:function" scoring (prompts, completions) -> list[float]
    prompts: str = ""  # dataset with a "prompt" (or "messages") column
    eval_prompts: str | None = None  # held-out prompts, scored before the first round and after the last
    eval_fn: str | None = None  # "module:function" for evaluation (e.g. an oracle); None: the reward
    out_dir: str = "runs/best_of_n"
    # sampling and selection
    rounds: int = 1  # sample -> select -> fine-tune cycles
    prompts_per_round: int = 0  # 0: every prompt each round; else the next slice of a seeded permutation
    n: int = 8  # completions sampled per prompt, the best of which is kept
    prompts_per_step: int = 32  # prompts per sampling batch (n sequences each) and per evaluation batch
    max_prompt_length: int = 64
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # truncated sampling (vLLM's sampler): the top_k most likely tokens only (0: off)
    top_p: float = 1.0  # nucleus: the smallest set of most likely tokens holding top_p of the mass (1: off)
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (0: off)
    # fine-tuning on the kept completions (each round)
    epochs: int = 1
    batch_size: int = 32  # sequences per optimizer step
    weight_decay: float = 0.0
    # evaluation (checkpoints, resume, seed, device: RunConfig; save_every counts rounds here)
    eval_samples: int = 256

    def validate(self) -> None:
        check_best_of_n(self)  # every check of these options: train/config.py


def round_prompts(n_prompts: int, rnd: int, cfg: Config) -> list[int]:
    """The prompts of round ``rnd``: all of them, or consecutive slices of a permutation seeded per pass."""
    per_round = cfg.prompts_per_round or n_prompts
    per_pass = max(1, n_prompts // per_round)
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(cfg.seed + rnd // per_pass))
    return order[(rnd % per_pass) * per_round :][:per_round].tolist()


@torch.no_grad()
def sample_best(policy, tokenizer, prompts, picks: list[int], reward, cfg: Config, rnd: int):
    """Sample ``n`` completions of each picked prompt, score them, keep the best of each:
    ``(sft rows of the kept completions, scores [P, n], seconds spent sampling)``. Under torchrun each process
    samples a share of the prompts and every process gets all the kept rows; the draws of the ``j``-th sample
    of the ``i``-th prompt of round ``rnd`` are keyed by ``(seed, rnd, i * n + j)`` whatever the layout."""
    device = next(policy.parameters()).device
    kept, scores, seconds = [], [], 0.0
    mine = distributed.local_rows(len(picks))
    for start in range(mine.start, mine.stop, cfg.prompts_per_step):
        index = list(range(start, min(start + cfg.prompts_per_step, mine.stop)))
        rows = prompts.select([picks[i % len(picks)] for i in index])
        repeated = rows.select([i for i in range(len(rows)) for _ in range(cfg.n)])
        ids, mask = collate_prompts(repeated["prompt_input_ids"], tokenizer.pad_token_id)
        seeds = row_seeds(cfg.seed, rnd, [i * cfg.n + j for i in index for j in range(cfg.n)])
        t0 = time.perf_counter()
        with autocast_context(device, cfg.precision):
            ro = generate(policy, tokenizer, ids.to(device), mask.to(device), repeated["prompt"],
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seeds=seeds,
                          synced=distributed.is_sharded(policy), truncation=sampling_truncation(cfg))  # fmt: skip
        seconds += time.perf_counter() - t0
        group = reward(ro).view(len(rows), cfg.n)
        best = group.argmax(1)  # the first maximum of each row
        P = ids.shape[1]
        for i, prompt_ids in enumerate(rows["prompt_input_ids"]):
            j = i * cfg.n + int(best[i])
            completion = ro.input_ids[j, P:][ro.response_mask[j] > 0].tolist()
            kept.append({"input_ids": list(prompt_ids) + completion,
                         "labels": [IGNORE_INDEX] * len(prompt_ids) + completion})  # fmt: skip
        scores += group.cpu().tolist()
    n = len(picks)
    return distributed.gather_objects(kept, n), torch.tensor(distributed.gather_objects(scores, n)), seconds


def fine_tune(ops, policy, train_policy, opt, sched, kept: list[dict], tokenizer, rnd: int, cfg: Config) -> dict:
    """``epochs`` passes of the SFT loss over the kept completions (the mean NLL of their tokens per global
    batch; each process takes its share of a batch, ``train_policy`` is ``policy`` or its DDP wrapper)."""
    device = next(policy.parameters()).device
    steps = total_steps(len(kept), cfg.batch_size, cfg.epochs, 0)
    losses, norms = [], []
    for step in range(rnd * steps, (rnd + 1) * steps):  # counted over rounds: a fresh order per (round, epoch)
        chunks = micro_batches(step, len(kept), cfg)
        local = sum(sum(t != IGNORE_INDEX for t in kept[j]["labels"][1:]) for c in chunks for j in c)
        count = max(1.0, float(distributed.global_sum(torch.tensor(float(local)))))
        loss = 0.0
        for chunk in chunks:
            batch = {k: v.to(device) for k, v in collate_sft([kept[j] for j in chunk], tokenizer.pad_token_id).items()}
            with autocast_context(device, cfg.precision):
                nll, _ = ops.sft_nll(train_policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
            (nll * distributed.world_size() / count).backward()  # DDP averages over the processes
            loss += float(nll.detach()) / count
        norms.append(optimizer_step(policy, opt, sched, cfg.max_grad_norm))
        losses.append(float(distributed.global_sum(torch.tensor(loss))))
    return {"sft_loss": sum(losses) / len(losses), "sft_loss_last": losses[-1],
            "grad_norm": sum(norms) / len(norms), "sft_steps": len(losses)}  # fmt: skip


def train(cfg: Config, *, reward_fn=None, eval_fn=None) -> dict:
    """Run best-of-n fine-tuning; ``reward_fn`` / ``eval_fn`` (callables ``(prompts, completions) ->
    list[float]``) take the place of ``cfg.reward_fn`` / ``cfg.eval_fn`` for callers in Python."""
    if reward_fn is not None:  # a new config: the caller's is left as it was
        cfg = replace(cfg, reward_fn=function_spec(reward_fn))
    device, out, ops = start_run(cfg)

    tokenizer = load_tokenizer(cfg.policy, padding_side="left")
    policy = load_causal_lm(cfg.policy, dtype="fp32", device=device)  # float32 weights: bf16 is autocast
    policy = enable_gradient_checkpointing(policy, cfg.gradient_checkpointing)
    train_policy = distributed.wrap(policy, device, cfg.parallel)  # before the optimizer: FSDP swaps the parameters
    reward, scorer = make_scorers(cfg, device, reward_fn=reward_fn, eval_fn=eval_fn)

    prompts = tokenize_prompts(cfg.prompts, tokenizer, cfg.max_prompt_length)
    if len(prompts) < max(cfg.prompts_per_round, cfg.batch_size):
        raise ValueError(f"{len(prompts)} prompts are fewer than prompts_per_round ({cfg.prompts_per_round}) "
                         f"or batch_size ({cfg.batch_size})")  # fmt: skip
    evaluate = None
    if cfg.eval_prompts:
        eval_prompts = tokenize_prompts(cfg.eval_prompts, tokenizer, cfg.max_prompt_length)
        eval_prompts = eval_prompts.select(range(min(cfg.eval_samples, len(eval_prompts))))
        ref = load_causal_lm(cfg.policy, dtype="fp32", device=device).eval().requires_grad_(False)  # for the KL only
        ref = distributed.shard_frozen(ref, cfg.parallel)
        evaluate = policy_evaluator(cfg, ref, tokenizer, eval_prompts, scorer=scorer, ops=ops)

    opt, sched = make_optimizer(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                warmup_steps=cfg.warmup_steps)  # fmt: skip
    saved = {"modules": {"policy": policy}, "optimizers": {"policy": opt}, "schedulers": {"policy": sched}}
    start, summary = 0, {"score_all": [], "score_kept": []}
    state = resume_state(out, cfg.resume, **saved)
    if state is not None:
        start, summary = state["step"], state["summary"]
    elif evaluate is not None:
        summary["before"] = evaluate(policy)

    logger = MetricsLogger(out, enabled=distributed.is_main())
    reset_peak_memory(device)
    for rnd in progress(range(start, cfg.rounds), desc="best-of-n", total=cfg.rounds - start):
        t0 = time.perf_counter()
        # ---- sample n completions per prompt from the current policy, score, keep the best of each
        kept, scores, sample_seconds = sample_best(policy, tokenizer, prompts, round_prompts(len(prompts), rnd, cfg),
                                                   reward, cfg, rnd)  # fmt: skip
        # ---- fine-tune on the kept completions
        record = fine_tune(ops, policy, train_policy, opt, sched, kept, tokenizer, rnd, cfg)
        best = scores.max(1).values
        record |= {"score_all": float(scores.mean()), "score_kept": float(best.mean()),
                   "score_kept_minus_all": float(best.mean() - scores.mean()),
                   "kept_length": sum(sum(t != IGNORE_INDEX for t in r["labels"]) for r in kept) / len(kept),
                   "samples_per_s": scores.numel() / sample_seconds, "lr": sched.get_last_lr()[0],
                   "seconds": time.perf_counter() - t0}  # fmt: skip
        summary["score_all"].append(record["score_all"])
        summary["score_kept"].append(record["score_kept"])
        logger.log(rnd + 1, record)
        maybe_save(out, rnd + 1, cfg.save_every if rnd + 1 < cfg.rounds else 0, cfg.keep_checkpoints, **saved,
                   state={"summary": summary})  # fmt: skip
    logger.close()

    summary |= {"rounds": cfg.rounds, "n": cfg.n, "ops": cfg.ops, "peak_memory_mib": peak_memory_mib(device)}
    if evaluate is not None:
        summary["after"] = evaluate(policy)
    finish_run(out, policy, tokenizer, summary, title=f"best-of-{cfg.n} ({cfg.ops} ops)")
    return summary
