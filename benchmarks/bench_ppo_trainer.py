"""The PPO trainer end to end, ``ops="fused"`` against ``ops="reference"``: the same loop (same prompts, samples,
optimizer steps), only the hot spots differ. Throughput and peak memory of each, in a fresh process apiece.

    python -m benchmarks.bench_ppo_trainer                      # CPU preset: V=32000, H=256, 2 layers
    python -m benchmarks.bench_ppo_trainer --preset qwen0.5b    # GPU: a Qwen2-0.5B-shaped model from a config

The model is a ``LlamaForCausalLM`` built from a config (random weights: nothing is downloaded), with a
word-level tokenizer of ``V`` synthetic words; prompts are random words, the reward a programmatic
function of the completion (``reward_fn`` below), so no reward model adds its own cost. Reported per run:
response tokens per second over whole PPO steps (sampling included: the same work in both runs) and over
the update phase alone (the minibatch epochs, where the ops differ most), and peak memory above what was
in use after the models were loaded (CUDA allocator peak, or peak RSS on CPU).
Results: ``benchmarks/results/<device>/ppo_trainer.{json,md}``.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import harness

# ``benchmarks.bench_ppo_trainer`` from a checkout, ``rlhf_fast.benchmarks.bench_ppo_trainer`` when installed
MODULE = harness.module_name(__name__ if __spec__ is None else __spec__.name)

PRESETS = {
    # a small model whose [tokens, vocab] logits dominate, as they do in RLHF at scale
    "cpu": dict(vocab=32000, hidden=256, layers=2, heads=4, prompt_len=32, new_tokens=64, prompts_per_step=16,
                minibatch=8, steps=3),
    # Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, vocab 151936): ~0.5B parameters
    # the GPU suite's dry run: every code path in seconds
    "tiny": dict(vocab=64, hidden=16, layers=1, heads=2, prompt_len=4, new_tokens=4, prompts_per_step=4,
                 minibatch=2, steps=1),
    "qwen0.5b": dict(vocab=151936, hidden=896, layers=24, heads=14, prompt_len=128, new_tokens=256,
                     prompts_per_step=32, minibatch=8, steps=3),
}


def reward_fn(prompts, completions):
    """A cheap programmatic reward: the fraction of completion words whose index is even."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(int(w[1:]) % 2 == 0 for w in words if w[1:].isdigit()) / max(1, len(words)))
    return out


def build(workdir: Path, p: dict, device: str) -> None:
    """Tokenizer, model and prompts for the preset, saved under ``workdir``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhf_fast.train.models import build_causal_lm

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(p["vocab"] - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")  # fmt: skip
    model = build_causal_lm(len(vocab), hidden_size=p["hidden"], num_layers=p["layers"], num_heads=p["heads"],
                            max_position_embeddings=p["prompt_len"] + p["new_tokens"] + 8,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    gen = torch.Generator().manual_seed(0)
    with open(workdir / "prompts.jsonl", "w") as f:
        for _ in range(4 * p["prompts_per_step"]):
            ids = torch.randint(4, p["vocab"], (p["prompt_len"],), generator=gen).tolist()
            f.write(json.dumps({"prompt": " ".join(f"w{i - 4}" for i in ids)}) + "\n")


def run_one(workdir: Path, p: dict, ops: str, device: str) -> dict:
    from rlhf_fast.train import ppo

    cfg = ppo.Config(policy=str(workdir / "model"), reward_fn=f"{MODULE}:reward_fn",
                     prompts=str(workdir / "prompts.jsonl"), out_dir=str(workdir / f"run-{ops}"), ops=ops,
                     steps=p["steps"], prompts_per_step=p["prompts_per_step"], minibatch_size=p["minibatch"],
                     max_prompt_length=p["prompt_len"] + 1, max_new_tokens=p["new_tokens"], ppo_epochs=1,
                     lr=1e-6, device=device, precision="auto")  # fmt: skip
    s = ppo.train(cfg)
    return {"ops": ops, "tokens_per_s": s["tokens_per_s"], "update_tokens_per_s": s["update_tokens_per_s"],
            "peak_memory": s["peak_memory_mib"]}  # fmt: skip


def parse_args(argv, description: str, presets: dict, child: str, **extra: dict):
    """The command line of a trainer benchmark (this one, ``bench_trl_grpo``): ``(args, preset, p, cuda)``, ``p``
    the preset's shape with ``--steps`` applied. ``extra``: more options after ``--device``, ``{"--name": kwargs}``;
    ``--_child WORKDIR <child> DEVICE`` runs one configuration (the parent starts one such process per run)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--preset", choices=sorted(presets), default=None, help="default: cpu, or qwen0.5b on CUDA")
    ap.add_argument("--device", default="auto")
    for name, kwargs in extra.items():
        ap.add_argument(name, **kwargs)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads per run (default 1: two OpenMP threads collapse when another process shares a "
                         "2-core machine, and the two runs would not see the same machine)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device> under the current "
                    "directory)")
    ap.add_argument("--_child", nargs=3, metavar=("WORKDIR", child, "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    preset = args.preset or ("qwen0.5b" if cuda else "cpu")
    p = dict(presets[preset])
    if args.steps:
        p["steps"] = args.steps
    return args, preset, p, cuda


def run_child(args, p: dict, run_one) -> list:
    """The ``--_child`` process: ``run_one(workdir, p, which, device)``, printed as the ``RESULT`` line the parent
    reads."""
    workdir, which, device = args._child
    if device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    print("RESULT " + json.dumps(run_one(Path(workdir), p, which, device)))
    return []


def spawn(module: str, preset: str, p: dict, threads: int, workdir: str, which: str, device: str):
    """One run in a fresh ``python -m <module> --_child`` process: ``(result, None)``, or ``(None, reason)`` when it
    failed (its stderr's tail printed)."""
    cmd = [sys.executable, "-m", module, "--preset", preset, "--steps", str(p["steps"]),
           "--threads", str(threads), "--_child", workdir, which, device]  # fmt: skip
    env = {**os.environ, "RLHF_FAST_NO_PROGRESS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=harness.module_cwd())
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(out.stderr[-3000:], file=sys.stderr)
        tail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
        return None, f"exit {out.returncode}: {tail}"[:300]
    return json.loads(line[7:]), None


def main(argv=None) -> list[dict]:
    args, preset, p, cuda = parse_args(argv, __doc__.splitlines()[0], PRESETS, "OPS",
                                       **{"--ops": dict(default="fused,reference")})
    if args._child:
        return run_child(args, p, run_one)
    device = "cuda" if cuda else "cpu"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), p, device)
        for ops in args.ops.split(","):
            r, reason = spawn(MODULE, preset, p, args.threads, tmp, ops, device)
            if r is None:
                results.append({"ops": ops, "status": "failed", "reason": reason})
                if not args.no_save:
                    save(results, preset, p, device, args.threads, args.out)
                continue
            results.append({**r, "status": "ok"})
            r = results[-1]
            print(f"{ops:10s} {r['tokens_per_s']:9.1f} tok/s (whole steps)  {r['update_tokens_per_s']:9.1f} tok/s "
                  f"(update)  peak extra {r['peak_memory']['peak_extra_mib']:8.1f} MiB", flush=True)  # fmt: skip
            if not args.no_save:  # after each run: a run killed later keeps this one
                save(results, preset, p, device, args.threads, args.out)
    return results


def save(results: list[dict], preset: str, p: dict, device: str, threads: int, out: Path | None = None) -> None:
    import transformers
    import triton

    out = out or harness.results_dir(harness.device_slug(torch.device(device)))
    out.mkdir(parents=True, exist_ok=True)
    commit = (harness.git_commit() or "unknown")[:12]
    meta = {"preset": preset, "shape": p, "device": device, "machine": platform.processor() or platform.machine(),
            "commit": commit, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "load_average": os.getloadavg(),
            "cpu_threads": threads if device == "cpu" else None}  # fmt: skip
    (out / "ppo_trainer.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [f"# PPO trainer, fused vs reference ops ({preset}: V={p['vocab']}, H={p['hidden']}, {p['layers']} "
             f"layers, {p['prompts_per_step']} prompts x {p['new_tokens']} new tokens, {p['steps']} steps)", "",
             f"commit {commit}, torch {torch.__version__}, triton {triton.__version__}, {meta['machine']}, "
             f"load average {meta['load_average'][0]:.1f}"
             + (f", {threads} CPU thread(s) per run" if device == "cpu" else ""), "",
             "| ops | tokens/s (whole PPO steps) | tokens/s (update phase) | peak extra memory (MiB) |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        if r["status"] == "ok":
            lines.append(f"| {r['ops']} | {r['tokens_per_s']:.1f} | {r['update_tokens_per_s']:.1f} | "
                         f"{r['peak_memory']['peak_extra_mib']:.0f} ({r['peak_memory']['kind']}) |")  # fmt: skip
    (out / "ppo_trainer.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'ppo_trainer.md'}")


if __name__ == "__main__":
    main()
