"""Cross-evaluation of two demo runs: the SFT policy and each run's PPO policy, scored by the demo's oracle under
each run's sampling settings (the trainer's own evaluation: the same held-out prompts and draws).

    rlhf-fast demo out_dir=runs/demo
    rlhf-fast demo out_dir=runs/demo-trunc top_k=20 top_p=0.9
    python -m rlhf_fast.benchmarks.demo_cross_eval runs/demo runs/demo-trunc --out cross_eval.json

Separates what truncated sampling does to the evaluation (the same policy scores differently under another
sampler) from what it does to training (each PPO policy under both samplers). Then, teacher-forced on each
held-out prompt's right completion (its letters, then ``</s>``): each policy's mean probability of the right
token over the full softmax and over each sampler's truncated distribution, and the share of right tokens
inside that sampler's kept set (a right token outside it can never be sampled, so never reinforced).
"""

import argparse
import json
import tempfile
from dataclasses import replace

import torch

import rlhf_fast as rf
from rlhf_fast.demo import task
from rlhf_fast.train import ppo
from rlhf_fast.train.config_io import load_config
from rlhf_fast.train.data import tokenize_prompts
from rlhf_fast.train.loop import start_run
from rlhf_fast.train.models import load_causal_lm, load_tokenizer
from rlhf_fast.train.rollout import make_scorers, policy_evaluator

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="demo out_dirs (each with ppo-fused/config.yaml and ppo-fused/model)")
    p.add_argument("--out", help="write the scores here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    configs = {run: load_config(ppo.Config, f"{run}/ppo-fused/config.yaml") for run in args.runs}
    first = configs[args.runs[0]]
    policies = {"sft": first.policy, **{f"ppo {run}": f"{run}/ppo-fused/model" for run in args.runs}}
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run, cfg in configs.items():
            sampling = {k: getattr(cfg, k) for k in SAMPLING_KEYS}
            cfg = replace(first, out_dir=tmp, overwrite=True, **sampling)
            device, _, ops = start_run(cfg)
            tok = load_tokenizer(cfg.policy, padding_side="left")
            ref = load_causal_lm(cfg.policy, dtype="fp32", device=device).eval().requires_grad_(False)
            _, scorer = make_scorers(cfg, device)
            prompts = tokenize_prompts(cfg.eval_prompts, tok, cfg.max_prompt_length)
            held_out = prompts.select(range(min(cfg.eval_samples, len(prompts))))
            evaluate = policy_evaluator(cfg, ref, tok, held_out, scorer=scorer, ops=ops)
            label = ", ".join(f"{k}={v}" for k, v in sampling.items())
            for name, path in policies.items():
                policy = load_causal_lm(path, dtype="fp32", device=device).eval()
                r = evaluate(policy) | {"teacher_forced": teacher_forced(policy, tok, held_out, sampling)}
                scores.setdefault(name, {})[label] = r
                t = r["teacher_forced"]
                print(f"{name:<28} sampled with {label:<45} {r['score']:.3f} ± {r['score_stderr']:.3f}  "
                      f"KL {r['kl_to_ref']:.3f}  right token: P {t['p_right_full']:.3f} full, "
                      f"{t['p_right_truncated']:.3f} truncated, kept {t['right_kept_frac']:.3f}", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(scores, f, indent=1)
    return scores


@torch.no_grad()
def teacher_forced(policy, tok, prompts, sampling: dict) -> dict:
    """Over the right completions (``task.target`` + ``</s>``) of ``prompts``, one prompt at a time:
    the mean probability of the right token under the full softmax (``p_right_full``) and under the truncated
    distribution of ``sampling`` (``p_right_truncated``, 0 outside its kept set), and the share of right tokens
    inside the kept set (``right_kept_frac``)."""
    T, truncation = sampling["temperature"], {k: sampling[k] for k in ("top_k", "top_p", "min_p")}
    full = truncated = kept = 0.0
    count = 0
    for row in prompts:
        answer = tok(task.target(row["prompt"]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([list(row["prompt_input_ids"]) + answer], device=policy.device)
        logits = policy(ids).logits[:, -len(answer) - 1 : -1].float()
        labels = torch.tensor([answer], device=ids.device)
        logp = rf.logprobs(logits, labels, temperature=T)
        logp_truncated = rf.logprobs(logits, labels, temperature=T, **truncation)
        full += float(logp.exp().sum())
        truncated += float(logp_truncated.exp().sum())
        kept += float(torch.isfinite(logp_truncated).sum())
        count += len(answer)
    return {"p_right_full": full / count, "p_right_truncated": truncated / count, "right_kept_frac": kept / count,
            "tokens": count}  # fmt: skip


if __name__ == "__main__":
    main()
