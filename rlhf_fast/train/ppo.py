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
``kl_coef * sum_t k1_t`` from each sequence's score.

``ops="fused"`` computes log-probs and entropy with ``rf.linear_logprobs`` from the hidden states (the
``[B, T, V]`` logits are never built) and the losses with ``rf.ppo_policy_loss`` / ``rf.value_loss`` /
``rf.gae``; ``ops="reference"`` runs the same loop on plain PyTorch (``rlhf_fast.train.ops``).
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

import rlhf_fast as rf

from .checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from .common import MetricsLogger, autocast_context, plot_metrics, progress, resolve_device, seed_everything
from .config import save_config
from .data import collate_prompts, load_records, tokenize_prompts
from .models import CriticModel, build_reward_model, load_causal_lm, load_tokenizer
from .ops import KL_MODES, PolicyLossConfig, get_ops
from .rollout import Rollout, generate, load_function, mean_and_stderr, score
from .runtime import peak_memory_mib, reset_peak_memory, write_json


@dataclass
class Config:
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
    ops: Literal["fused", "reference"] = "fused"
    advantage: Literal["gae", "grpo", "rloo"] = "gae"
    steps: int = 50  # PPO iterations (rollout + update)
    prompts_per_step: int = 32
    samples_per_prompt: int = 1  # >= 2 for grpo / rloo
    max_prompt_length: int = 64
    max_new_tokens: int = 16
    temperature: float = 1.0  # sampling temperature; log-probs are taken at the same temperature
    ppo_epochs: int = 2
    minibatch_size: int = 16  # sequences per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = 1
    lr: float = 1e-5
    critic_lr: float = 1e-4
    max_grad_norm: float = 1.0
    # the loss
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    agg: str = "token-mean"
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_mode: Literal["reward", "k3_loss", "full_kl_loss"] = "reward"
    kl_coef: float = 0.05
    target_kl: float | None = None  # adaptive KL coefficient (Ziegler et al.) towards this KL per sequence
    kl_horizon: int = 10000
    missing_eos_penalty: float | None = None  # subtracted from the score of responses cut at max_new_tokens
    # evaluation, checkpoints, runtime
    eval_samples: int = 256  # held-out prompts scored at the start and the end
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the latest checkpoint in out_dir
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16 autocast on CUDA; float32 on CPU
    log_every: int = 1
    extra: dict = field(default_factory=dict)  # free-form notes copied to the summary

    def validate(self) -> None:
        if not self.policy:
            raise ValueError("policy must name the causal LM to train (a local directory or hub name)")
        if not self.prompts:
            raise ValueError("prompts must name a dataset of prompts")
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError("give exactly one of reward_model and reward_fn")
        if self.kl_mode not in KL_MODES:
            raise ValueError(f"kl_mode must be one of {KL_MODES}, got {self.kl_mode!r}")
        if self.advantage in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ValueError(f"advantage={self.advantage!r} needs samples_per_prompt >= 2")
        rollout = self.prompts_per_step * self.samples_per_prompt
        if self.minibatch_size < 1 or rollout % self.minibatch_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) must divide prompts_per_step * "
                             f"samples_per_prompt ({rollout})")  # fmt: skip
        if self.grad_accum < 1 or self.minibatch_size % self.grad_accum:
            raise ValueError(f"grad_accum ({self.grad_accum}) must divide minibatch_size ({self.minibatch_size})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


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
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
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
    # RLOO: s_i - mean_{j != i} s_j = G / (G - 1) * (s_i - mean_j s_j)
    return rf.group_advantages(scores, G, normalize_std=False) * (G / (G - 1))


@torch.no_grad()
def evaluate(policy, ref, tokenizer, prompt_data, *, scorer, cfg: Config, ops) -> dict:
    """Mean score (± standard error) of one sample per held-out prompt, and the exact KL to the reference
    per response (``rf.full_kl`` summed over the response's tokens)."""
    scores, kls = [], []
    device = next(policy.parameters()).device
    for start in range(0, len(prompt_data), cfg.prompts_per_step):
        rows = prompt_data[start : start + cfg.prompts_per_step]
        ids, mask = collate_prompts(rows["prompt_input_ids"], tokenizer.pad_token_id)
        ro = generate(policy, tokenizer, ids.to(device), mask.to(device), rows["prompt"],
                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)  # fmt: skip
        scores += scorer(ro).tolist()
        R = ro.response_mask.shape[1]
        with autocast_context(device, cfg.precision):
            logits = ops.response_logits(policy, ro.input_ids, ro.attention_mask, R)
            ref_logits = ops.response_logits(ref, ro.input_ids, ro.attention_mask, R)
        kl = rf.full_kl(logits.float(), ref_logits.float(), temperature=cfg.temperature)
        kls += (kl * ro.response_mask).sum(1).tolist()
    mean, se = mean_and_stderr(scores)
    return {"score": mean, "score_stderr": se, "kl_to_ref": float(torch.tensor(kls).mean()), "n": len(scores)}


# -------------------------------------------------------------------------------------------- train


def train(cfg: Config, *, reward_fn=None, eval_fn=None) -> dict:
    """Run PPO; ``reward_fn`` / ``eval_fn`` (callables ``(prompts, completions) -> list[float]``) take the
    place of ``cfg.reward_fn`` / ``cfg.eval_fn`` for callers in Python."""
    if reward_fn is not None:
        cfg.reward_fn = f"{getattr(reward_fn, '__module__', '?')}:{getattr(reward_fn, '__qualname__', '?')}"
    cfg.validate()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    ops = get_ops(cfg.ops)

    # Models: the policy, a frozen reference, a critic (gae only), a frozen reward model or function.
    tokenizer = load_tokenizer(cfg.policy, padding_side="left")
    policy = load_causal_lm(cfg.policy, device=device)
    ref = load_causal_lm(cfg.ref_policy or cfg.policy, device=device).eval().requires_grad_(False)
    critic = CriticModel.from_pretrained(cfg.critic or cfg.policy).to(device) if cfg.advantage == "gae" else None
    if cfg.reward_model is not None:
        reward_model = build_reward_model(cfg.reward_model, device=device).eval().requires_grad_(False)

        def reward(ro: Rollout) -> torch.Tensor:
            with autocast_context(device, cfg.precision):
                return score(ro, reward_model=reward_model)
    else:
        reward_function = reward_fn or load_function(cfg.reward_fn)

        def reward(ro: Rollout) -> torch.Tensor:
            return score(ro, reward_fn=reward_function)

    eval_fn = eval_fn or (load_function(cfg.eval_fn) if cfg.eval_fn else None)
    scorer = reward if eval_fn is None else (lambda ro: score(ro, reward_fn=eval_fn))

    prompts = tokenize_prompts(load_records(cfg.prompts), tokenizer, cfg.max_prompt_length)
    eval_prompts = None
    if cfg.eval_prompts:
        eval_prompts = tokenize_prompts(load_records(cfg.eval_prompts), tokenizer, cfg.max_prompt_length)
        eval_prompts = eval_prompts.select(range(min(cfg.eval_samples, len(eval_prompts))))

    policy_opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=0.0) if critic else None
    modules = {"policy": policy} | ({"critic": critic} if critic else {})
    optimizers = {"policy": policy_opt} | ({"critic": critic_opt} if critic else {})

    start_step, kl_coef, summary = 0, cfg.kl_coef, {}
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, modules=modules, optimizers=optimizers)
        start_step, kl_coef, summary = state["step"], state["kl_coef"], state["summary"]
    elif eval_prompts is not None:
        summary["before"] = evaluate(policy, ref, tokenizer, eval_prompts, scorer=scorer, cfg=cfg, ops=ops)

    loss_cfg = PolicyLossConfig(temperature=cfg.temperature, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                dual_clip=cfg.dual_clip, agg=cfg.agg, entropy_coef=cfg.entropy_coef,
                                kl_mode=cfg.kl_mode, kl_coef=kl_coef)  # fmt: skip
    logger = MetricsLogger(out)
    reset_peak_memory(device)
    tokens_total, seconds_total, update_seconds = 0, 0.0, 0.0
    n_prompts = len(prompts)
    for step in progress(range(start_step, cfg.steps), desc="ppo", total=cfg.steps - start_step):
        t0 = time.perf_counter()
        # ---- rollout: this step's prompts, each repeated samples_per_prompt times
        pick = step_prompts(n_prompts, cfg.prompts_per_step, seed=cfg.seed, step=step)
        rows = prompts.select([i for i in pick for _ in range(cfg.samples_per_prompt)])
        prompt_ids, prompt_mask = collate_prompts(rows["prompt_input_ids"], tokenizer.pad_token_id)
        with autocast_context(device, cfg.precision):
            ro = generate(policy, tokenizer, prompt_ids.to(device), prompt_mask.to(device), rows["prompt"],
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)  # fmt: skip
        scores = reward(ro)
        if cfg.missing_eos_penalty:
            scores = scores - cfg.missing_eos_penalty * (~ro.finished).float()
        mask = ro.response_mask
        B, R = mask.shape

        # ---- log-probs of the sampling policy and of the reference, values: constants for the update
        with torch.no_grad(), autocast_context(device, cfg.precision):
            old_logp, _ = ops.response_logprobs(policy, ro.input_ids, ro.attention_mask, mask,
                                                temperature=cfg.temperature)  # fmt: skip
            ref_logp, _ = ops.response_logprobs(ref, ro.input_ids, ro.attention_mask, mask,
                                                temperature=cfg.temperature)  # fmt: skip
            values = _values(critic, ro.input_ids, ro.attention_mask, R) if critic else None
        k1 = (old_logp - ref_logp) * mask  # per-token KL(pi || pi_ref) sample, for rewards and logging
        kl_per_seq = k1.sum(1)

        # ---- rewards and advantages
        if cfg.advantage == "gae":
            last = (mask.sum(1).long() - 1).clamp(min=0)
            rewards = torch.zeros_like(mask)
            rewards[torch.arange(B, device=device), last] = scores
            if cfg.kl_mode == "reward":
                rewards = rewards - loss_cfg.kl_coef * k1
            advantages, returns = ops.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
            if cfg.whiten_advantages:
                advantages = rf.masked_whiten(advantages, mask)
        else:
            seq_reward = scores - loss_cfg.kl_coef * kl_per_seq if cfg.kl_mode == "reward" else scores
            advantages, returns = sequence_advantages(seq_reward, cfg), None
            if cfg.whiten_advantages:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

        # ---- minibatch epochs
        t_update = time.perf_counter()
        data = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "response_mask": mask,
                "old_logp": old_logp, "ref_logp": ref_logp, "advantages": advantages}  # fmt: skip
        if critic is not None:
            data |= {"old_values": values, "returns": returns}
        stats: dict[str, list[float]] = {}
        micro = cfg.minibatch_size // cfg.grad_accum
        for _epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(B).tolist()
            for mb_start in range(0, B, cfg.minibatch_size):
                for opt in optimizers.values():
                    opt.zero_grad(set_to_none=True)
                for mu_start in range(mb_start, mb_start + cfg.minibatch_size, micro):
                    idx = torch.tensor(perm[mu_start : mu_start + micro], device=device)
                    mb = {k: v[idx] for k, v in data.items()}
                    with autocast_context(device, cfg.precision):
                        pg_loss, metrics = ops.policy_loss(policy, mb, loss_cfg, ref_model=ref)
                        loss = pg_loss
                        if critic is not None:
                            v = critic(mb["input_ids"], mb["attention_mask"])[:, -R - 1 : -1]
                            v_loss = ops.value_loss(v, mb["old_values"], mb["returns"], mb["response_mask"],
                                                    clip=cfg.value_clip, agg=cfg.agg)  # fmt: skip
                            loss = loss + v_loss
                            metrics["value_loss"] = v_loss.detach()
                    (loss / cfg.grad_accum).backward()
                    metrics["policy_loss"] = pg_loss.detach()
                    for k, val in metrics.items():
                        stats.setdefault(k, []).append(float(val))
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                stats.setdefault("grad_norm", []).append(float(grad_norm))
                if critic is not None:
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
                for opt in optimizers.values():
                    opt.step()

        # ---- KL coefficient, bookkeeping, logging
        seconds = time.perf_counter() - t0
        tokens = int(mask.sum())
        tokens_total, seconds_total = tokens_total + tokens, seconds_total + seconds
        update_seconds += seconds - (t_update - t0)
        mean_kl = float(kl_per_seq.mean())
        kl_coef_used = loss_cfg.kl_coef
        loss_cfg = PolicyLossConfig(**{**loss_cfg.__dict__, "kl_coef": kl_controller_update(
            kl_coef_used, mean_kl, cfg, B)})  # fmt: skip
        record = {k: sum(v) / len(v) for k, v in stats.items()}
        record |= {"score": float(scores.mean()), "kl": mean_kl, "kl_coef": kl_coef_used,
                   "response_length": float(mask.sum(1).mean()), "finished": float(ro.finished.float().mean()), "tokens_per_s": tokens / seconds,
                   "rollout_s": t_update - t0, "update_s": seconds - (t_update - t0)}  # fmt: skip
        if critic is not None:
            on = mask > 0
            residual = (returns - values)[on]
            record["explained_variance"] = float(1 - residual.var() / returns[on].var().clamp(min=1e-8))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logger.log(step + 1, record)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(checkpoint_path(out, step + 1), modules=modules, optimizers=optimizers,
                            state={"step": step + 1, "kl_coef": loss_cfg.kl_coef, "summary": summary})  # fmt: skip
            prune_checkpoints(out, cfg.keep_checkpoints)
    logger.close()

    # ---- final evaluation, model, summary, plots
    summary["tokens_per_s"] = tokens_total / seconds_total if seconds_total else None
    # the training phase alone (old/ref log-probs, values, advantages and the minibatch epochs are not in it:
    # they count in tokens_per_s with the sampling)
    summary["update_tokens_per_s"] = tokens_total / update_seconds if update_seconds else None
    summary["peak_memory_mib"] = peak_memory_mib(device)
    summary["ops"] = cfg.ops
    summary["final_kl_coef"] = loss_cfg.kl_coef
    if eval_prompts is not None:
        summary["after"] = evaluate(policy, ref, tokenizer, eval_prompts, scorer=scorer, cfg=cfg, ops=ops)
    policy.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    if critic is not None:
        critic.save_pretrained(out / "critic")
    plot_metrics(out / "metrics.jsonl", out / "curves.png", title=f"PPO ({cfg.ops} ops)")
    summary["extra"] = cfg.extra
    write_json(out / "summary.json", summary)
    return summary
