"""``rlhf-fast demo``: the whole RLHF pipeline from nothing, on a CPU, in minutes.

1. Data: the built-in synthetic task (``rlhf_fast.demo.task``: repeat a word of 4-6 letters), with a sloppy
   demonstrator for SFT and Bradley-Terry-noisy preference labels drawn from a programmatic oracle that
   plays the human labeler.
2. A word-level tokenizer and a small ``LlamaForCausalLM`` built from a ``transformers`` config (no download).
3. SFT on the demonstrations → a reward model on the preferences (initialised from the SFT model) → PPO
   against the reward model with a k1 KL penalty towards the SFT model (RLOO advantages over 4 samples
   per prompt by default; ``advantage=gae`` trains a critic instead).
4. The oracle scores one sampled completion per held-out prompt before PPO (the SFT policy) and after;
   ``<out>/summary.json`` holds the numbers, each stage's ``curves.png`` its training curves.

    rlhf-fast demo                                  # defaults: rlhf_fast.demo.task.DemoDefaults
    rlhf-fast demo out_dir=runs/demo ppo_steps=50 compare_ops=true

``compare_ops=true`` runs the PPO stage a second time with ``ops="reference"`` (plain PyTorch, the model's
full logits) from the same start and seed, and reports both runs' tokens/s and peak memory.
"""

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import task
from ..train import ppo, reward, sft
from ..train.config import check_sampling
from ..train.models import build_causal_lm
from ..train.metrics import write_json

_D = task.DemoDefaults()


@dataclass
class Config:
    out_dir: str = "runs/demo"
    overwrite: bool = False  # replace the stages' runs of an earlier demo in out_dir (refused otherwise)
    seed: int = _D.seed
    device: str = "cpu"
    # data
    n_sft: int = _D.n_sft
    n_pref: int = _D.n_pref
    n_pref_eval: int = _D.n_pref_eval
    n_prompts: int = _D.n_prompts
    n_eval: int = _D.n_eval
    # model
    hidden_size: int = _D.hidden_size
    intermediate_size: int = _D.intermediate_size
    num_hidden_layers: int = _D.num_hidden_layers
    num_attention_heads: int = _D.num_attention_heads
    # stages
    sft_lr: float = _D.sft_lr
    sft_batch_size: int = _D.sft_batch_size
    sft_steps: int = _D.sft_steps
    rm_lr: float = _D.rm_lr
    rm_batch_size: int = _D.rm_batch_size
    rm_steps: int = _D.rm_steps
    ppo_lr: float = _D.ppo_lr
    ppo_prompts_per_step: int = _D.ppo_prompts_per_step
    ppo_samples_per_prompt: int = _D.ppo_samples_per_prompt
    ppo_steps: int = _D.ppo_steps
    ppo_epochs: int = _D.ppo_epochs
    ppo_minibatches: int = _D.ppo_minibatches
    advantage: str = "rloo"
    kl_coef: float = _D.kl_coef
    temperature: float = _D.temperature
    # truncated sampling in PPO's rollouts, its loss and its evaluation (README "Truncated sampling"); off by default
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = _D.max_new_tokens
    ops: str = "fused"
    compare_ops: bool = False
    threads: int = 1  # torch CPU threads: a model this small runs fastest on one (and far faster when shared)

    def validate(self) -> None:
        """The keys a run would otherwise reject only after SFT and the reward model (minutes in)."""
        check_sampling(self)


def _ppo_config(cfg: Config, out: Path, paths: dict, ops: str) -> ppo.Config:
    return ppo.Config(
        policy=str(out / "sft" / "model"), reward_model=str(out / "rm" / "model"), prompts=paths["prompts"],
        eval_prompts=paths["eval_prompts"], eval_fn="rlhf_fast.demo.task:reward_fn", out_dir=str(out / f"ppo-{ops}"),
        ops=ops, steps=cfg.ppo_steps, prompts_per_step=cfg.ppo_prompts_per_step,
        samples_per_prompt=cfg.ppo_samples_per_prompt, advantage=cfg.advantage, clip_low=_D.cliprange,
        minibatch_size=cfg.ppo_prompts_per_step * cfg.ppo_samples_per_prompt // cfg.ppo_minibatches,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        min_p=cfg.min_p, ppo_epochs=cfg.ppo_epochs, lr=cfg.ppo_lr,
        critic_lr=_D.vf_lr, gamma=_D.gamma, lam=_D.lam, kl_coef=cfg.kl_coef, eval_samples=cfg.n_eval,
        seed=cfg.seed, device=cfg.device, precision="auto", log_every=5, overwrite=cfg.overwrite,
    )  # fmt: skip


def run(cfg: Config) -> dict:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    t0 = time.perf_counter()
    times = {}

    # 1-2. data, tokenizer, initial model
    paths = task.write_datasets(out / "data", n_sft=cfg.n_sft, n_pref=cfg.n_pref, n_prompts=cfg.n_prompts,
                                n_eval=cfg.n_eval, n_pref_eval=cfg.n_pref_eval, seed=cfg.seed)  # fmt: skip
    tok = task.build_tokenizer()
    model = build_causal_lm(len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                            num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                            max_position_embeddings=_D.max_position_embeddings, pad_token_id=tok.pad_token_id,
                            tie_word_embeddings=_D.tie_word_embeddings,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, seed=cfg.seed)  # fmt: skip
    model.save_pretrained(out / "init")
    tok.save_pretrained(out / "init")
    n_params = sum(p.numel() for p in model.parameters())

    # 3. SFT -> reward model -> PPO
    t = time.perf_counter()
    sft_summary = sft.train(sft.Config(
        model=str(out / "init"), data=paths["sft"], out_dir=str(out / "sft"), ops=cfg.ops, epochs=10**6,
        max_steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, warmup_steps=_D.sft_warmup_steps,
        lr_schedule="linear", seed=cfg.seed, device=cfg.device, log_every=10, overwrite=cfg.overwrite,
    ))  # fmt: skip
    times["sft_s"] = time.perf_counter() - t
    t = time.perf_counter()
    rm_summary = reward.train(reward.Config(
        model=str(out / "sft" / "model"), data=paths["preferences"], eval_data=paths["eval_preferences"],
        out_dir=str(out / "rm"), ops=cfg.ops, epochs=10**6, max_steps=cfg.rm_steps, batch_size=cfg.rm_batch_size,
        lr=cfg.rm_lr, warmup_steps=_D.rm_warmup_steps, lr_schedule="linear", seed=cfg.seed, device=cfg.device,
        log_every=10, overwrite=cfg.overwrite,
    ))  # fmt: skip
    times["rm_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ppo_summary = ppo.train(_ppo_config(cfg, out, paths, cfg.ops))
    times["ppo_s"] = time.perf_counter() - t
    compare = {}
    if cfg.compare_ops:
        other = "reference" if cfg.ops == "fused" else "fused"
        other_summary = ppo.train(_ppo_config(cfg, out, paths, other))
        compare = {ops: {"tokens_per_s": s["tokens_per_s"], "peak_memory_mib": s["peak_memory_mib"],
                         "oracle_score_after": s["after"]["score"]}
                   for ops, s in ((cfg.ops, ppo_summary), (other, other_summary))}  # fmt: skip

    before, after = ppo_summary["before"], ppo_summary["after"]
    gain_in_se = (after["score"] - before["score"]) / (before["score_stderr"] ** 2 + after["score_stderr"] ** 2) ** 0.5
    summary = {
        "sft": {"oracle_score": before["score"], "oracle_score_stderr": before["score_stderr"],
                "final_loss": sft_summary["final_loss"], "tokens_per_s": sft_summary["tokens_per_s"]},
        "rm": {"eval_accuracy": rm_summary["eval_accuracy"], "eval_pairs": rm_summary["eval_pairs"],
               "label_agreement_with_oracle": task.BT_AGREEMENT},
        "ppo": {"oracle_score_before": before["score"], "oracle_score_after": after["score"],
                "oracle_score_before_stderr": before["score_stderr"],
                "oracle_score_after_stderr": after["score_stderr"], "gain_in_stderr": gain_in_se,
                "eval_prompts": after["n"], "kl_to_ref": after["kl_to_ref"], "tokens_per_s": ppo_summary["tokens_per_s"],
                "peak_memory_mib": ppo_summary["peak_memory_mib"], "ops": cfg.ops,
                "sampling": {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "min_p": cfg.min_p}},
        "ops_comparison": compare,
        "model_parameters": n_params,
        "demonstrator_score": task.DEMONSTRATOR_MEAN,
        "seconds": {**times, "total_s": time.perf_counter() - t0},
        "config": dataclasses.asdict(cfg),
    }  # fmt: skip
    write_json(out / "summary.json", summary)
    print(format_table(summary))
    return summary


def format_table(s: dict) -> str:
    p = s["ppo"]
    rows = [
        ("SFT oracle score (held-out)", f"{s['sft']['oracle_score']:.3f} ± {s['sft']['oracle_score_stderr']:.3f}"),
        ("reward model held-out accuracy", f"{s['rm']['eval_accuracy']:.3f} ({s['rm']['eval_pairs']} pairs; "
                                           f"labels agree with the oracle {s['rm']['label_agreement_with_oracle']:.2f})"),
        ("PPO oracle score before", f"{p['oracle_score_before']:.3f} ± {p['oracle_score_before_stderr']:.3f}"),
        ("PPO oracle score after", f"{p['oracle_score_after']:.3f} ± {p['oracle_score_after_stderr']:.3f} "
                                   f"(+{p['gain_in_stderr']:.1f} standard errors, {p['eval_prompts']} prompts)"),
        ("KL(pi || pi_ref) per response", f"{p['kl_to_ref']:.3f} nats"),
        ("PPO throughput", f"{p['tokens_per_s']:.0f} response tokens/s ({p['ops']} ops)"),
    ]  # fmt: skip
    off = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}
    truncated = [f"{k}={v}" for k, v in p.get("sampling", {}).items() if k in off and v != off[k]]
    if truncated:  # the PPO rows are then those of the truncated distribution
        rows.insert(2, ("PPO sampling (rollouts, loss, evaluation)", ", ".join(truncated)))
    for ops, c in s["ops_comparison"].items():
        rows.append((f"PPO with {ops} ops", f"{c['tokens_per_s']:.0f} tokens/s, peak "
                                            f"{c['peak_memory_mib']['peak_mib']:.0f} MiB"))  # fmt: skip
    rows.append(("wall time", f"{s['seconds']['total_s']:.0f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
