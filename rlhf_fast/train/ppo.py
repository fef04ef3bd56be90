"""PPO for RLHF, as one straight loop: rollout → scores → rewards with a KL penalty → advantages →
minibatch epochs of the clipped policy loss (and the clipped value loss) → logging.

    rlhf-fast train ppo --config ppo.yaml policy=runs/sft/model reward_model=runs/rm/model

The objective is ``E[r(x, y)] - kl_coef * KL(pi || pi_ref)``, whose optimum is ``pi_ref(y) exp(r(y)/kl_coef) / Z``.
By default (``kl_mode="reward"``) the KL enters as the textbook per-token penalty: the reward of response
token ``t`` is ``-kl_coef * (log pi_old(y_t) - log pi_ref(y_t))`` (k1), plus the score on the last token.
``kl_mode="full_kl_loss"`` adds ``kl_coef * rf.full_kl`` (the exact KL over the vocabulary, same optimum) to
the loss instead, ``kl_mode="k3_loss"`` GRPO's k3 estimate (a forward-KL gradient; see ``rf.kl_penalty``).

Advantages: ``"gae"`` (a critic with a value head, ``rf.gae``, whitened), or critic-free with several samples
per prompt: ``"grpo"`` (score minus the group mean, over the group std) and ``"rloo"`` (score minus the mean
of the *other* samples of the prompt). Critic-free modes with ``kl_mode="reward"`` subtract
``kl_coef * sum_t k1_t`` from each sequence's score. Critic-free runs log ``frac_reward_zero_std`` (TRL's
name): the share of prompts whose samples all score alike, which give no advantage signal.

Distributed (``torchrun --nproc-per-node N``, DDP): each process samples and scores a contiguous ``1/N`` of the
step's prompts (all samples of a prompt on one process), the rollouts are gathered so every process holds the
step's whole batch, advantages are computed on it, and each process takes a ``1/N`` share of every minibatch,
whose loss is weighted so that the gradient is the one process's (``token-mean`` over the whole minibatch).
Responses are drawn with counter-based noise keyed by ``(seed, step, row)`` (``rollout.generate``), and the
minibatch order by ``(seed, step, epoch)``: the run is the same on any number of processes.

The policy loss takes ``rf.ppo_policy_loss``'s ``loss_mode`` (vanilla, gspo, cispo, sapo, geo_mean) and
``delta``, and ``kl_bias_correction`` for ``kl_mode="k3_loss"``; ``loss_type`` (TRL's grpo / bnpo / dr_grpo /
dapo) sets ``agg`` and its normaliser over the minibatch as TRL's ``GRPOTrainer`` does
(``rlhf_fast.train.ops.micro_aggregation``).

``ops="fused"`` computes the rollout's log-probs with ``rf.linear_logprobs`` and the policy loss with
``rf.linear_ppo_loss`` from the hidden states (the ``[B, T, V]`` logits are never built; the exact KL of
``full_kl_loss`` by ``rf.linear_full_kl``), and ``rf.value_loss`` / ``rf.gae``; ``ops="reference"`` runs the
same loop on plain PyTorch (``rlhf_fast.train.ops``).
"""

import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F

import rlhf_fast as rf

from . import distributed
from .checkpoint import maybe_save, resume_state
from .data import collate_prompts, tokenize_prompts
from .config import RunConfig, check_ppo, sampling_truncation
from .loop import finish_run, make_optimizer, save_pretrained, start_run
from .metrics import MetricsLogger, progress
from .models import CriticModel, enable_gradient_checkpointing, load_causal_lm, load_tokenizer
from .ops import PolicyLossConfig, micro_aggregation, micro_weight
from .rollout import check_finite_scores, function_spec, generate, make_scorers, policy_evaluator, row_seeds
from .runtime import autocast_context, peak_memory_mib, reset_peak_memory, seed_for


@dataclass
class Config(RunConfig):
    # models and data
    policy: str = ""  # causal LM to train (a local dir or hub name), usually the SFT model
    ref_policy: str | None = None  # frozen reference for the KL; None: the initial policy
    reward_model: str | None = None  # a scalar-output sequence classifier (rlhf-fast train rm)
    reward_fn: str | None = None  # or "module:function" scoring (prompts, completions) -> list[float]
    critic: str | None = None  # causal LM (or saved critic) the value model starts from; None: the policy
    prompts: str = ""  # dataset with a "prompt" (or "messages") column
    eval_prompts: str | None = None  # held-out prompts, scored before and after training
    eval_fn: str | None = None  # "module:function" for evaluation (e.g. an oracle); None: the reward
    out_dir: str = "runs/ppo"
    # the loop
    advantage: Literal["gae", "grpo", "rloo"] = "gae"
    steps: int = 50  # PPO iterations (rollout + update)
    prompts_per_step: int = 32
    samples_per_prompt: int = 1  # >= 2 for grpo / rloo
    max_prompt_length: int = 64
    max_new_tokens: int = 16
    temperature: float = 1.0  # sampling temperature; log-probs are taken at the same temperature
    # truncated sampling (vLLM's sampler; off by default): the loss's log-probs are the same truncated distribution's
    top_k: int = 0  # sample among the top_k most likely tokens only (0: off)
    top_p: float = 1.0  # nucleus: the smallest set of most likely tokens holding top_p of the mass (1: off)
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (0: off)
    lm_head_precision: Literal["auto", "fp32"] = "auto"  # fp32: the log-probs' lm_head matmul in float32 under bf16
    ppo_epochs: int = 2
    minibatch_size: int = 16  # sequences per optimizer step (split into grad_accum micro-batches)
    critic_lr: float = 1e-4  # the critic's optimizer (lr, warmup_steps and lr_schedule: both optimizers)
    lr_schedule: Literal["constant", "linear"] = "constant"  # after the warmup: constant, or linear to 0 at the end
    # the loss
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    agg: str = "token-mean"
    entropy_coef: float = 0.0
    loss_mode: Literal["vanilla", "gspo", "cispo", "sapo", "geo_mean"] = "vanilla"  # rf.ppo_policy_loss's
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] | None = None  # TRL's aggregation presets (set agg)
    delta: float | None = None  # TRL's two-sided clip: the unclipped ratio capped at delta (vanilla / gspo)
    kl_bias_correction: bool = False  # kl_mode="k3_loss": k3 weighted by the ratio (TRL's use_bias_correction_kl)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_mode: Literal["reward", "k3_loss", "full_kl_loss"] = "reward"
    kl_coef: float = 0.05
    target_kl: float | None = None  # adaptive KL coefficient (Ziegler et al.) towards this KL per sequence
    kl_horizon: int = 10000
    missing_eos_penalty: float | None = None  # subtracted from the score of responses cut at max_new_tokens
    # evaluation and logging (checkpoints, resume, seed, device: RunConfig)
    eval_samples: int = 256  # held-out prompts scored at the start and the end
    log_every: int = 1
    extra: dict = field(default_factory=dict)  # free-form notes copied to the summary

    def validate(self) -> None:
        check_ppo(self)  # every check of these options: train/config.py

    def policy_loss_options(self) -> rf.PolicyLossOptions:
        """The loss ops' options of these keys (``ValueError`` naming a key the loss cannot take). Their
        ``kl_coef`` is 0: the trainer's adaptive one is ``PolicyLossConfig.kl_coef``."""
        return rf.PolicyLossOptions(loss_mode=self.loss_mode, clip_low=self.clip_low, clip_high=self.clip_high,
                                    dual_clip=self.dual_clip, delta=self.delta, entropy_coef=self.entropy_coef,
                                    kl_bias_correction=self.kl_bias_correction, agg=self.agg)  # fmt: skip


# ------------------------------------------------------------------------------------------ pieces


@torch.no_grad()
def _values(critic, input_ids, attention_mask, R: int) -> torch.Tensor:
    """``[B, R]`` value of the state before each response token (at its predicting position)."""
    return critic(input_ids, attention_mask)[:, -R - 1 : -1]


def step_prompts(n: int, per_step: int, *, seed: int, step: int) -> list[int]:
    """The prompt indices of a step: consecutive slices of a stream of permutations of the ``n`` prompts, one
    per pass, seeded by ``(seed, pass)`` (a function of the step alone, so a resumed run picks the same)."""
    picked, position = [], step * per_step
    while len(picked) < per_step:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(seed, epoch))).tolist()
        take = order[offset : offset + per_step - len(picked)]
        picked, position = picked + take, position + len(take)
    return picked


def kl_controller_update(kl_coef: float, observed_kl: float, cfg: Config, n_sequences: int) -> float:
    """Ziegler et al.'s adaptive KL: ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``."""
    if cfg.target_kl is None:
        return kl_coef
    error = max(-0.2, min(0.2, observed_kl / cfg.target_kl - 1.0))
    return kl_coef * (1.0 + error * n_sequences / cfg.kl_horizon)


def sequence_advantages(scores: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Critic-free ``[N]`` advantages over groups of ``samples_per_prompt`` completions of one prompt."""
    G = cfg.samples_per_prompt
    if cfg.advantage == "grpo":
        return rf.group_advantages(scores, G, normalize_std=True)
    # RLOO: s_i - mean_{j != i} s_j
    return rf.group_advantages(scores, G, normalize_std=False, baseline="loo")


def zero_std_fraction(scores: torch.Tensor, group: int) -> float:
    """The share of prompts whose ``group`` consecutive scores are all equal (TRL's ``frac_reward_zero_std``):
    groups that give a critic-free advantage no signal."""
    groups = scores.view(-1, group)
    return int((groups == groups[:, :1]).all(1).sum()) / groups.shape[0]


# -------------------------------------------------------------------------------------------- train


@dataclass
class Models:
    """The policy, a frozen reference, a critic (``gae`` only). Under torchrun the trained ones go through DDP
    (``train_*``: the wrappers the training forwards use) or are sharded in place by FSDP2, with the frozen
    ones, before the optimizers are built on their parameters."""

    policy: torch.nn.Module
    train_policy: torch.nn.Module
    ref: torch.nn.Module
    critic: torch.nn.Module | None
    train_critic: torch.nn.Module | None


def load_models(cfg: Config, device) -> Models:
    policy = load_causal_lm(cfg.policy, dtype="fp32", device=device)  # float32 weights: bf16 is autocast
    policy = enable_gradient_checkpointing(policy, cfg.gradient_checkpointing)
    train_policy = distributed.wrap(policy, device, cfg.parallel)
    ref = load_causal_lm(cfg.ref_policy or cfg.policy, dtype="fp32", device=device).eval().requires_grad_(False)
    ref = distributed.shard_frozen(ref, cfg.parallel)
    critic = None
    if cfg.advantage == "gae":
        critic = CriticModel.from_pretrained(cfg.critic or cfg.policy, dtype="fp32", device=device)
        enable_gradient_checkpointing(critic, cfg.gradient_checkpointing)
    train_critic = distributed.wrap(critic, device, cfg.parallel) if critic else None
    return Models(policy, train_policy, ref, critic, train_critic)


def make_optimizers(models: Models, cfg: Config):
    """AdamW for the policy (and the critic) with one schedule over all the run's updates: ``(modules,
    optimizers, schedulers)``, keyed ``"policy"`` / ``"critic"`` (what checkpoints save)."""
    updates = cfg.steps * cfg.ppo_epochs * (cfg.prompts_per_step * cfg.samples_per_prompt // cfg.minibatch_size)
    schedule = {"weight_decay": 0.0, "warmup_steps": cfg.warmup_steps, "schedule": cfg.lr_schedule,
                "total_steps": updates}  # fmt: skip
    modules, optimizers, schedulers = {"policy": models.policy}, {}, {}
    optimizers["policy"], schedulers["policy"] = make_optimizer(models.policy.parameters(), lr=cfg.lr, **schedule)
    if models.critic is not None:
        modules["critic"] = models.critic
        optimizers["critic"], schedulers["critic"] = make_optimizer(models.critic.parameters(), lr=cfg.critic_lr,
                                                                    **schedule)  # fmt: skip
    return modules, optimizers, schedulers


def collect_rollout(step: int, prompts, tokenizer, models: Models, reward, ops, cfg: Config, device) -> dict:
    """One step's batch, the same on every process: this process samples and scores its share of the step's
    prompts (each repeated ``samples_per_prompt`` times), takes the log-probs of the sampling policy and of
    the reference and the values (constants for the update), then the rows of all processes are gathered,
    responses right-padded to the longest. Keys: the tensors of ``ops.policy_loss``'s batch (``input_ids``,
    ``attention_mask``, ``response_mask``, ``old_logp``, ``ref_logp``), ``values`` (or ``None``), ``scores``,
    ``finished``."""
    policy, critic, G = models.policy, models.critic, cfg.samples_per_prompt
    pick = step_prompts(len(prompts), cfg.prompts_per_step, seed=cfg.seed, step=step)
    slots = distributed.shard(list(range(cfg.prompts_per_step)), cfg.prompts_per_step)
    rows = prompts.select([pick[s] for s in slots for _ in range(G)])
    prompt_ids, prompt_mask = collate_prompts(rows["prompt_input_ids"], tokenizer.pad_token_id)
    P = distributed.global_max(prompt_ids.shape[1])  # one prompt width on every process
    prompt_ids = F.pad(prompt_ids, (P - prompt_ids.shape[1], 0), value=tokenizer.pad_token_id)
    prompt_mask = F.pad(prompt_mask, (P - prompt_mask.shape[1], 0), value=0)
    seeds = row_seeds(cfg.seed, step, [s * G + j for s in slots for j in range(G)])
    with autocast_context(device, cfg.precision):
        # generate() steps until all processes are done under FSDP: its forwards are collective
        ro = generate(policy, tokenizer, prompt_ids.to(device), prompt_mask.to(device), rows["prompt"],
                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seeds=seeds,
                      synced=distributed.is_sharded(policy), truncation=sampling_truncation(cfg))  # fmt: skip
    scores = reward(ro)
    if cfg.missing_eos_penalty:
        scores = scores - cfg.missing_eos_penalty * (~ro.finished).float()
        check_finite_scores(scores, ro.completions, f"missing_eos_penalty={cfg.missing_eos_penalty!r} gave")

    local_mask, fp32 = ro.response_mask, cfg.lm_head_precision == "fp32"
    with torch.no_grad(), autocast_context(device, cfg.precision):
        # the sampled (truncated) distribution's log-probs; the reference's over its full softmax
        old_logp, _ = ops.response_logprobs(policy, ro.input_ids, ro.attention_mask, local_mask,
                                            temperature=cfg.temperature, truncation=sampling_truncation(cfg),
                                            lm_head_fp32=fp32)  # fmt: skip
        ref_logp, _ = ops.response_logprobs(models.ref, ro.input_ids, ro.attention_mask, local_mask,
                                            temperature=cfg.temperature, lm_head_fp32=fp32)  # fmt: skip
        values = _values(critic, ro.input_ids, ro.attention_mask, local_mask.shape[1]) if critic else None
    # A sampled token outside the kept set recomputed from the full forward (a near-tie at the threshold,
    # which generate's cached forward split the other way): -inf log-prob, so out of the loss and the KL
    missed = (local_mask > 0) & torch.isinf(old_logp)
    old_logp, ref_logp = old_logp.masked_fill(missed, 0.0), ref_logp.masked_fill(missed, 0.0)
    loss_mask = local_mask.masked_fill(missed, 0.0)

    R = distributed.global_max(local_mask.shape[1])
    return {
        "input_ids": distributed.gather_rows(ro.input_ids, length=P + R, value=tokenizer.pad_token_id),
        "attention_mask": distributed.gather_rows(ro.attention_mask, length=P + R),
        "response_mask": distributed.gather_rows(local_mask, length=R),
        "loss_mask": distributed.gather_rows(loss_mask, length=R),
        "old_logp": distributed.gather_rows(old_logp * local_mask, length=R),
        "ref_logp": distributed.gather_rows(ref_logp * local_mask, length=R),
        "values": distributed.gather_rows(values * local_mask, length=R) if critic else None,
        "scores": distributed.gather_rows(scores),
        "finished": distributed.gather_rows(ro.finished.float()),
    }


def advantages_and_returns(batch: dict, k1: torch.Tensor, kl_coef: float, ops, cfg: Config):
    """``(advantages, returns)``: GAE over per-token rewards (the score on the last response token, minus
    ``kl_coef * k1`` with ``kl_mode="reward"``), or critic-free ``grpo`` / ``rloo`` over the sequences' scores
    (minus ``kl_coef * sum_t k1_t``) with ``returns`` ``None``; whitened with ``cfg.whiten_advantages``."""
    mask, scores = batch["response_mask"], batch["scores"]
    if cfg.advantage == "gae":
        B = mask.shape[0]
        last = (mask.sum(1).long() - 1).clamp(min=0)
        rewards = torch.zeros_like(mask)
        rewards[torch.arange(B, device=mask.device), last] = scores
        if cfg.kl_mode == "reward":
            rewards = rewards - kl_coef * k1
        advantages, returns = ops.gae(rewards, batch["values"], mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            advantages = rf.masked_whiten(advantages, mask)
        return advantages, returns
    seq_reward = scores - kl_coef * k1.sum(1) if cfg.kl_mode == "reward" else scores
    advantages = sequence_advantages(seq_reward, cfg)
    if cfg.whiten_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    return advantages, None


def ppo_epochs(batch: dict, advantages, returns, step: int, models: Models, optimizers, schedulers, ops,
               loss_cfg: PolicyLossConfig, cfg: Config, device) -> dict[str, list[float]]:  # fmt: skip
    """``cfg.ppo_epochs`` passes over the batch in minibatches of ``cfg.minibatch_size`` (an order seeded by
    ``(seed, step, epoch)``): each process takes a ``1/world`` share of every minibatch, in ``grad_accum``
    micro-batches whose losses are weighted so that the gradient is the minibatch's; one optimizer step per
    minibatch. Returns each metric's values, one per minibatch (summed over the processes)."""
    world, critic, mask = distributed.world_size(), models.critic, batch["response_mask"]
    B, R = mask.shape
    data = {k: batch[k] for k in ("input_ids", "attention_mask", "response_mask", "old_logp", "ref_logp")}
    data["response_mask"] = mask = batch["loss_mask"]  # the response tokens in the sampled distribution's kept set
    data["advantages"] = advantages
    if critic is not None:
        data |= {"old_values": batch["values"], "returns": returns}
    stats: dict[str, list[float]] = {}
    share = cfg.minibatch_size // world
    micro = share // cfg.grad_accum
    for epoch in range(cfg.ppo_epochs):
        order = torch.Generator().manual_seed(seed_for(cfg.seed, step, epoch))
        perm = torch.randperm(B, generator=order).tolist()
        for mb_start in range(0, B, cfg.minibatch_size):
            minibatch = perm[mb_start : mb_start + cfg.minibatch_size]
            mb_mask = mask[minibatch]
            mine = minibatch[distributed.rank() * share : (distributed.rank() + 1) * share]
            sums: dict[str, float] = {}
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            for mu_start in range(0, share, micro):
                idx = torch.tensor(mine[mu_start : mu_start + micro], device=device)
                mb = {k: v[idx] for k, v in data.items()}
                # the weights of the micro-batch's losses in the minibatch's (of the policy loss: TRL's loss_type)
                agg, agg_norm, weight = micro_aggregation(cfg.loss_type, cfg.agg, mb["response_mask"], mb_mask,
                                                          cfg.max_new_tokens)  # fmt: skip
                v_weight = micro_weight(mb["response_mask"], mb_mask, agg)
                token_share = float(mb["response_mask"].sum() / mb_mask.sum().clamp(min=1))  # of the metrics
                mb_cfg = loss_cfg
                if cfg.loss_type is not None:
                    mb_cfg = replace(loss_cfg, options=replace(loss_cfg.options, agg=agg, agg_norm=agg_norm))
                with autocast_context(device, cfg.precision):
                    pg_loss, metrics = ops.policy_loss(models.train_policy, mb, mb_cfg, ref_model=models.ref)
                    loss = pg_loss if cfg.loss_type is None else pg_loss * weight
                    if critic is not None:
                        v = models.train_critic(mb["input_ids"], mb["attention_mask"])[:, -R - 1 : -1]
                        v_loss = ops.value_loss(v, mb["old_values"], mb["returns"], mb["response_mask"],
                                                clip=cfg.value_clip, agg=agg)  # fmt: skip
                        loss = loss + (v_loss if cfg.loss_type is None else v_loss * v_weight)
                # DDP averages over the processes: times world, the sum of the weighted losses
                (loss * ((weight if cfg.loss_type is None else 1.0) * world)).backward()
                sums["policy_loss"] = sums.get("policy_loss", 0.0) + weight * float(pg_loss.detach())
                if critic is not None:
                    sums["value_loss"] = sums.get("value_loss", 0.0) + v_weight * float(v_loss.detach())
                for k, val in metrics.items():
                    sums[k] = sums.get(k, 0.0) + token_share * float(val)
            totals = distributed.global_sum(torch.tensor([sums[k] for k in sorted(sums)], dtype=torch.float64))
            for k, val in zip(sorted(sums), totals.tolist()):
                stats.setdefault(k, []).append(val)
            grad_norm = distributed.clip_grad_norm(models.policy.parameters(), cfg.max_grad_norm)
            stats.setdefault("grad_norm", []).append(grad_norm)
            if critic is not None:
                distributed.clip_grad_norm(critic.parameters(), cfg.max_grad_norm)
            for opt, sched in zip(optimizers.values(), schedulers.values()):
                opt.step()
                sched.step()
    return stats


def train(cfg: Config, *, reward_fn=None, eval_fn=None) -> dict:
    """Run PPO; ``reward_fn`` / ``eval_fn`` (callables ``(prompts, completions) -> list[float]``) take the
    place of ``cfg.reward_fn`` / ``cfg.eval_fn`` for callers in Python."""
    if reward_fn is not None:  # a new config: the caller's is left as it was
        cfg = replace(cfg, reward_fn=function_spec(reward_fn))
    device, out, ops = start_run(cfg)
    tokenizer = load_tokenizer(cfg.policy, padding_side="left")
    models = load_models(cfg, device)
    reward, scorer = make_scorers(cfg, device, reward_fn=reward_fn, eval_fn=eval_fn)
    prompts = tokenize_prompts(cfg.prompts, tokenizer, cfg.max_prompt_length)
    evaluate = None
    if cfg.eval_prompts:
        eval_prompts = tokenize_prompts(cfg.eval_prompts, tokenizer, cfg.max_prompt_length)
        eval_prompts = eval_prompts.select(range(min(cfg.eval_samples, len(eval_prompts))))
        evaluate = policy_evaluator(cfg, models.ref, tokenizer, eval_prompts, scorer=scorer, ops=ops)
    modules, optimizers, schedulers = make_optimizers(models, cfg)

    start_step, kl_coef, summary = 0, cfg.kl_coef, {}
    state = resume_state(out, cfg.resume, modules=modules, optimizers=optimizers, schedulers=schedulers)
    if state is not None:
        start_step, kl_coef, summary = state["step"], state["kl_coef"], state["summary"]
    elif evaluate is not None:
        summary["before"] = evaluate(models.policy)

    loss_cfg = PolicyLossConfig(temperature=cfg.temperature, kl_mode=cfg.kl_mode, kl_coef=kl_coef,
                                options=cfg.policy_loss_options(), truncation=sampling_truncation(cfg),
                                lm_head_fp32=cfg.lm_head_precision == "fp32")  # fmt: skip
    logger = MetricsLogger(out, enabled=distributed.is_main())
    reset_peak_memory(device)
    tokens_total, seconds_total, update_seconds = 0, 0.0, 0.0
    for step in progress(range(start_step, cfg.steps), desc="ppo", total=cfg.steps - start_step):
        t0 = time.perf_counter()
        batch = collect_rollout(step, prompts, tokenizer, models, reward, ops, cfg, device)
        mask = batch["response_mask"]
        k1 = (batch["old_logp"] - batch["ref_logp"]) * mask  # per-token KL(pi || pi_ref) sample
        advantages, returns = advantages_and_returns(batch, k1, loss_cfg.kl_coef, ops, cfg)
        t_update = time.perf_counter()
        stats = ppo_epochs(batch, advantages, returns, step, models, optimizers, schedulers, ops, loss_cfg, cfg,
                           device)  # fmt: skip

        # ---- KL coefficient, bookkeeping, logging
        seconds = time.perf_counter() - t0
        tokens = int(mask.sum())
        tokens_total, seconds_total = tokens_total + tokens, seconds_total + seconds
        update_seconds += seconds - (t_update - t0)
        mean_kl = float(k1.sum(1).mean())
        kl_coef_used = loss_cfg.kl_coef
        loss_cfg = replace(loss_cfg, kl_coef=kl_controller_update(kl_coef_used, mean_kl, cfg, mask.shape[0]))
        record = {k: sum(v) / len(v) for k, v in stats.items()}
        record |= {"score": float(batch["scores"].mean()), "kl": mean_kl, "kl_coef": kl_coef_used,
                   "lr": schedulers["policy"].get_last_lr()[0],
                   "response_length": float(mask.sum(1).mean()), "finished": float(batch["finished"].mean()),
                   "tokens_per_s": tokens / seconds, "rollout_s": t_update - t0,
                   "update_s": seconds - (t_update - t0)}  # fmt: skip
        if cfg.advantage != "gae":
            record["frac_reward_zero_std"] = zero_std_fraction(batch["scores"], cfg.samples_per_prompt)
        if models.critic is not None:
            on = mask > 0
            residual = (returns - batch["values"])[on]
            record["explained_variance"] = float(1 - residual.var() / returns[on].var().clamp(min=1e-8))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logger.log(step + 1, record)
        maybe_save(out, step + 1, cfg.save_every if step + 1 < cfg.steps else 0, cfg.keep_checkpoints,
                   modules=modules, optimizers=optimizers, schedulers=schedulers,
                   state={"kl_coef": loss_cfg.kl_coef, "summary": summary})  # fmt: skip
    logger.close()

    # ---- final evaluation, model, summary, plots
    summary["tokens_per_s"] = tokens_total / seconds_total if seconds_total else None
    # the training phase alone: the time of the minibatch epochs (ppo_epochs: forwards, backwards, optimizer
    # steps). The rollout before it (sampling, scores, old/ref log-probs, values) and the advantages are not in
    # it: they count in tokens_per_s, which times whole steps
    summary["update_tokens_per_s"] = tokens_total / update_seconds if update_seconds else None
    summary["peak_memory_mib"] = peak_memory_mib(device)
    summary["ops"] = cfg.ops
    summary["world_size"] = distributed.world_size()
    summary["final_kl_coef"] = loss_cfg.kl_coef
    if evaluate is not None:
        summary["after"] = evaluate(models.policy)
    summary["extra"] = cfg.extra
    if models.critic is not None:
        save_pretrained(models.critic, out / "critic")
    finish_run(out, models.policy, tokenizer, summary, title=f"PPO ({cfg.ops} ops)")
    return summary
