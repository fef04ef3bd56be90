"""A TRL ``GRPOTrainer`` step, stock ``trl.GRPOTrainer`` against ``rlhf_fast.integrations.trl.GRPOTrainer``:
the same model, config, seed and prompts, each run in a fresh process. Step time and peak memory.

    python -m benchmarks.bench_trl_grpo                      # CPU preset: V=32000, H=256, 2 layers, float32
    python -m benchmarks.bench_trl_grpo --preset qwen0.5b    # GPU: a Qwen2.5-0.5B-shaped model, TRL's default bf16

The model, tokenizer and prompts are ``bench_ppo_trainer.build``'s (a random ``LlamaForCausalLM`` from a
config, a word-level tokenizer, random-word prompts; the reward is its programmatic ``reward_fn``). The
config is TRL's default GRPO loss (``loss_type="dapo"``, bias-corrected KL) with ``beta > 0``, so the
reference model is loaded and scored and the KL term is in the loss. Each step generates (the same
sampled completions in both runs: generation does not go through the ops that differ), scores with the
reference model, and takes one optimizer step. Reported per run, over the steps after the first: the
step time (mean), the time in ``compute_loss`` (the policy's forward: backbone, log-probs, loss) and in
the backward of that loss, and the peak memory above what was in use once the trainer was built (CUDA
allocator peak, or the peak resident set on CPU; the optimizer state, created in the first step, counts
in it for both runs).

The two runs must start from identical weights (a float64 fingerprint of every tensor of the policy and
the reference model) and take the same first step (logged loss and gradient norm: 1e-4 relative in
float32, 5e-2 under bf16): otherwise the benchmark fails, naming the difference.
Results: ``benchmarks/results/<device>/trl_grpo.{json,md}``.
"""

import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

from . import bench_ppo_trainer, harness

# ``benchmarks.bench_trl_grpo`` from a checkout, ``rlhf_fast.benchmarks.bench_trl_grpo`` when installed
MODULE = harness.module_name(__name__ if __spec__ is None else __spec__.name)
TRAINERS = ("stock", "rlhf_fast")

# bench_ppo_trainer.build's keys (vocab, hidden, layers, heads, prompt_len, new_tokens, prompts_per_step) and
# num_generations: each step generates prompts_per_step x num_generations completions of new_tokens tokens.
PRESETS = {
    # a small model whose [tokens, vocab] logits dominate, as they do in RLHF at scale
    "cpu": dict(vocab=32000, hidden=256, layers=2, heads=4, prompt_len=32, new_tokens=32, prompts_per_step=4,
                num_generations=4, steps=4, bf16=False),
    # the GPU suite's dry run and the test: every code path in seconds
    "tiny": dict(vocab=64, hidden=16, layers=1, heads=2, prompt_len=4, new_tokens=4, prompts_per_step=2,
                 num_generations=2, steps=2, bf16=False),
    # Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, vocab 151936), TRL's default bf16
    "qwen0.5b": dict(vocab=151936, hidden=896, layers=24, heads=14, prompt_len=128, new_tokens=64,
                     prompts_per_step=8, num_generations=4, steps=3, bf16=True),
}  # fmt: skip


def reward(prompts, completions, **kwargs):
    """TRL's reward-function signature around ``bench_ppo_trainer.reward_fn``."""
    return bench_ppo_trainer.reward_fn(prompts, completions)


def fingerprint(model) -> list[list[float]]:
    """Per tensor (name order): float64 sum, sum of squares and a strided sample's sum. Equal lists = the
    same weights (for the benchmark's purpose: a different initialisation or load changes every entry)."""
    out = []
    for _, p in sorted(model.state_dict().items()):
        x = p.detach().double().flatten()
        out.append([x.sum().item(), (x * x).sum().item(), x[::97].sum().item()])
    return out


class _Timer:
    """Wall time of each call of ``obj.name`` (CUDA synchronised), bucketed by the current step."""

    def __init__(self, obj, name: str, cuda: bool):
        self.per_step: list[float] = []
        self.cuda = cuda
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            self._sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                if self.per_step:
                    self.per_step[-1] += time.perf_counter() - t0

        setattr(obj, name, timed)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def run_one(workdir: Path, p: dict, which: str, device: str) -> dict:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from rlhf_fast.integrations import count_op_calls
    from rlhf_fast.integrations import trl as rft
    from rlhf_fast.train.runtime import peak_memory_mib, reset_peak_memory

    cls = {"stock": trl.GRPOTrainer, "rlhf_fast": rft.GRPOTrainer}[which]
    cuda = device == "cuda"
    with open(workdir / "prompts.jsonl") as f:
        data = Dataset.from_list([json.loads(line) for line in f])
    batch = p["prompts_per_step"] * p["num_generations"]
    args = trl.GRPOConfig(output_dir=str(workdir / f"run-{which}"), per_device_train_batch_size=batch,
                          num_generations=p["num_generations"], max_completion_length=p["new_tokens"],
                          max_steps=p["steps"], beta=0.04, learning_rate=1e-6, bf16=p["bf16"], use_cpu=not cuda,
                          logging_steps=1, save_strategy="no", report_to=[], seed=0, disable_tqdm=True)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = cls(model=str(workdir / "model"), reward_funcs=reward, args=args, train_dataset=data)
    if which == "rlhf_fast" and trainer._rf_loss_unsupported is not None:
        raise RuntimeError(f"rlhf_fast's GRPO loss does not cover this config: {trainer._rf_loss_unsupported}")
    weights = {"policy": fingerprint(trainer.model), "reference": fingerprint(trainer.ref_model)}
    dev = torch.device(device)
    loss_t = _Timer(trainer, "compute_loss", cuda)
    backward_t = _Timer(trainer.accelerator, "backward", cuda)
    step_s: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            for t in (loss_t, backward_t):
                t.per_step.append(0.0)
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            step_s.append(time.perf_counter() - self.t0)

    trainer.add_callback(Clock())
    with count_op_calls("linear_logprobs", "ppo_policy_loss", "kl_penalty") as rf_calls:
        reset_peak_memory(dev)
        trainer.train()
        peak = peak_memory_mib(dev)
    logs = [r for r in trainer.state.log_history if "loss" in r and "grad_norm" in r]
    if len(step_s) != p["steps"] or not logs:
        raise RuntimeError(f"{which}: {len(step_s)} steps timed and {len(logs)} logged, expected {p['steps']}")
    after = slice(1, None) if len(step_s) > 1 else slice(None)  # the first step warms up (and makes the optimizer)

    def mean(xs):
        return sum(xs[after]) / len(xs[after])

    tokens = [r.get("num_tokens") for r in trainer.state.log_history if "num_tokens" in r]
    return {"trainer": which, "class": f"{cls.__module__}.{cls.__name__}", "steps": len(step_s),
            "step_s": mean(step_s), "step_s_all": step_s, "compute_loss_s": mean(loss_t.per_step),
            "backward_s": mean(backward_t.per_step), "first_loss": logs[0]["loss"],
            "first_grad_norm": logs[0]["grad_norm"], "num_tokens": tokens[-1] if tokens else None,
            "first_step_s": step_s[0], "peak_memory": peak, "rf_calls": rf_calls, "weights": weights}  # fmt: skip


def check_same_start(results: list[dict], bf16: bool) -> dict:
    """Raise ``RuntimeError`` unless the runs started from the same weights and took the same first step, and only
    the second one ran on rlhf_fast's ops."""
    a, b = results
    if any(a["rf_calls"].values()) or not (b["rf_calls"]["linear_logprobs"] and b["rf_calls"]["ppo_policy_loss"]):
        raise RuntimeError(f"rlhf_fast ops called: {a['trainer']} {a['rf_calls']}, {b['trainer']} {b['rf_calls']} (the "
                           "stock run must call none, the rlhf_fast run linear_logprobs and ppo_policy_loss)")
    for part in ("policy", "reference"):
        if a["weights"][part] != b["weights"][part]:
            raise RuntimeError(f"the {part} models of the {a['trainer']} and {b['trainer']} runs differ at the start")
    rtol = 5e-2 if bf16 else 1e-4
    atol = 1e-2 if bf16 else 1e-6
    diffs = {}
    for key in ("first_loss", "first_grad_norm"):
        x, y = a[key], b[key]
        diffs[key] = abs(x - y)
        if not abs(x - y) <= atol + rtol * abs(y):
            raise RuntimeError(f"{key}: {a['trainer']} {x!r} vs {b['trainer']} {y!r} (allowed {atol} + {rtol} relative)")
    return {"same_weights": True, "abs_diff": diffs, "rtol": rtol, "atol": atol}


def main(argv=None) -> list[dict]:
    args, preset, p, cuda = bench_ppo_trainer.parse_args(argv, __doc__.splitlines()[0], PRESETS, "TRAINER")
    if args._child:
        return bench_ppo_trainer.run_child(args, p, run_one)
    device = "cuda" if cuda else "cpu"
    results, check = [], None
    with tempfile.TemporaryDirectory() as tmp:
        bench_ppo_trainer.build(Path(tmp), p, device)
        for which in TRAINERS:
            r, reason = bench_ppo_trainer.spawn(MODULE, preset, p, args.threads, tmp, which, device)
            if r is None:
                results.append({"trainer": which, "status": "failed", "reason": reason})
            else:
                results.append({**r, "status": "ok"})
                r = results[-1]
                print(f"{which:10s} step {r['step_s']:8.3f} s  compute_loss {r['compute_loss_s']:8.3f} s  backward "
                      f"{r['backward_s']:8.3f} s  peak extra {r['peak_memory']['peak_extra_mib']:8.1f} MiB",
                      flush=True)  # fmt: skip
            if not args.no_save:  # after each run: a run killed later keeps this one
                save(results, check, preset, p, device, args.threads, args.out)
    if all(r["status"] == "ok" for r in results):
        check = check_same_start(results, p["bf16"])  # raises: the comparison would be meaningless
        if not args.no_save:
            save(results, check, preset, p, device, args.threads, args.out)
    else:
        raise RuntimeError("a run failed: " + "; ".join(r.get("reason", "") for r in results if r["status"] != "ok"))
    return results


def save(results: list[dict], check: dict | None, preset: str, p: dict, device: str, threads: int,
         out: Path | None = None) -> None:  # fmt: skip
    import transformers
    import triton
    import trl

    out = out or harness.results_dir(harness.device_slug(torch.device(device)))
    out.mkdir(parents=True, exist_ok=True)
    commit = (harness.git_commit() or "unknown")[:12]
    meta = {"preset": preset, "shape": p, "device": device, "machine": platform.processor() or platform.machine(),
            "commit": commit, "torch": torch.__version__, "triton": triton.__version__, "trl": trl.__version__,
            "transformers": transformers.__version__, "load_average": os.getloadavg(),
            "cpu_threads": threads if device == "cpu" else None,
            "config": {"loss_type": "dapo (TRL's default)", "beta": 0.04, "use_bias_correction_kl": True,
                       "bf16": p["bf16"]},
            "same_start": check}  # fmt: skip
    slim = [{k: v for k, v in r.items() if k != "weights"} for r in results]
    (out / "trl_grpo.json").write_text(json.dumps({"meta": meta, "results": slim}, indent=2) + "\n")
    seqs = p["prompts_per_step"] * p["num_generations"]
    lines = [f"# TRL GRPOTrainer step, stock vs rlhf_fast ({preset}: V={p['vocab']}, H={p['hidden']}, {p['layers']} "
             f"layers, {seqs} completions ({p['prompts_per_step']} prompts x {p['num_generations']}) of {p['new_tokens']} "
             f"tokens after {p['prompt_len']}-word prompts, {'bf16' if p['bf16'] else 'float32'}, {p['steps']} steps)", "",
             f"commit {commit}, trl {trl.__version__}, torch {torch.__version__}, triton {triton.__version__}, "
             f"{meta['machine']}, load average {meta['load_average'][0]:.1f}"
             + (f", {threads} CPU thread(s) per run" if device == "cpu" else ""), "",
             "loss_type dapo (TRL's default), beta 0.04 (reference model and bias-corrected KL). Times: mean over the "
             "steps after the first; compute_loss = the policy's forward (backbone, log-probs, loss), backward = "
             "that loss's backward; the rest of a step is generation, reward, reference scoring and the optimizer.",
             "",
             "| trainer | step s | compute_loss s | backward s | peak extra memory (MiB) | first step s | first-step loss | "
             "first-step grad norm |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        if r["status"] == "ok":
            lines.append(f"| {r['trainer']} | {r['step_s']:.3f} | {r['compute_loss_s']:.3f} | {r['backward_s']:.3f} | "
                         f"{r['peak_memory']['peak_extra_mib']:.0f} ({r['peak_memory']['kind']}) | {r['first_step_s']:.3f} | "
                         f"{r['first_loss']:.6g} | {r['first_grad_norm']:.6g} |")  # fmt: skip
        else:
            lines.append(f"| {r['trainer']} | {r['status']}: {r.get('reason', '')} | | | | | | |")
    if check:
        lines += ["", f"Same start: identical weights (policy and reference); first-step loss and grad norm differ by "
                  f"{check['abs_diff']['first_loss']:.2g} and {check['abs_diff']['first_grad_norm']:.2g} "
                  f"(allowed {check['atol']} + {check['rtol']} relative)."]  # fmt: skip
    (out / "trl_grpo.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'trl_grpo.md'}")


if __name__ == "__main__":
    main()
