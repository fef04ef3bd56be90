"""What the first call of ``rf.linear_logprobs``' PyTorch path costs in a new process, against later calls.

At a vocabulary of 16384 or more the PyTorch linear ops build their chunk bodies with ``torch.compile`` on
the first chunk (``rlhf_fast/_fused_chunk.py``): seconds of compilation, and the compiler's own modules stay
resident in the process. Each method runs in its own new process (forward + backward, twice), and reports
each call's seconds and the process's peak resident memory (``VmHWM``) above what it held once the inputs
were built:

- ``naive``: ``log_softmax(hidden @ weight.T).gather(labels)``, the [N, V] float32 logits built;
- ``rlhf_fast``: ``rf.linear_logprobs`` as shipped (compiled chunk bodies);
- ``rlhf_fast_eager``: the same with ``RLHF_FAST_COMPILE=0`` (the eager twins, nothing compiled).

    python -m benchmarks.bench_first_call [--shape 4096x256x50000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

METHODS = ("naive", "rlhf_fast", "rlhf_fast_eager")
DEFAULT_SHAPE = (4096, 256, 50000)

_CHILD = r"""
import json, sys, time
def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
import torch
import rlhf_fast as rf
method, N, H, V = sys.argv[1], *map(int, sys.argv[2:5])
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(N, H, generator=gen).requires_grad_(True)
weight = (torch.randn(V, H, generator=gen) * 0.05).requires_grad_(True)
labels = torch.randint(0, V, (N,), generator=gen)
base = hwm_mib()
calls = []
for _ in range(2):
    t0 = time.perf_counter()
    if method == "naive":
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    else:
        logp = rf.linear_logprobs(hidden, weight, labels, impl="torch")
    logp.sum().backward()
    hidden.grad = weight.grad = None
    calls.append({"seconds": time.perf_counter() - t0, "peak_rise_mib": hwm_mib() - base})
print(json.dumps({"calls": calls, "inputs_mib": base}))
"""


def run_method(method: str, shape: tuple[int, int, int]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if method == "rlhf_fast_eager":
        env["RLHF_FAST_COMPILE"] = "0"
    proc = subprocess.run([sys.executable, "-c", _CHILD, method, *map(str, shape)], env=env, capture_output=True,
                          text=True, timeout=3600)  # fmt: skip
    if proc.returncode != 0:
        return {"method": method, "status": "error", "reason": proc.stderr.strip().splitlines()[-1:]}
    return {"method": method, "status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def report(results: list[dict], shape, meta: dict) -> str:
    naive = next((r for r in results if r["method"] == "naive" and r["status"] == "ok"), None)
    lines = [f"# First call of rf.linear_logprobs (PyTorch path), N x H x V = {' x '.join(map(str, shape))}", "",
             f"- CPU: {meta['cpu']}, {meta['threads']} threads, load average at start {meta['load']}",
             f"- Commit: {meta['commit']}; torch {meta['torch']}", "",
             "| method | call 1 (s) | call 2 (s) | peak rise, call 1 (MiB) | x naive's | peak rise after call 2 (MiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']}: {r.get('reason')} | | | | |")
            continue
        c1, c2 = r["calls"]
        ratio = f"{c1['peak_rise_mib'] / naive['calls'][0]['peak_rise_mib']:.2f}x" if naive else "-"
        lines.append(f"| {r['method']} | {c1['seconds']:.1f} | {c2['seconds']:.1f} | {c1['peak_rise_mib']:.0f} | "
                     f"{ratio} | {c2['peak_rise_mib']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    from . import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="x".join(map(str, DEFAULT_SHAPE)), help="N x H x V (default %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--out", default="benchmarks/results/cpu", help="folder for first_call.json / .md")
    args = p.parse_args(argv)
    try:
        shape = tuple(int(s) for s in args.shape.lower().split("x"))
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        p.error(f"--shape must be NxHxV with positive integers, got {args.shape!r}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        p.error(f"--methods: choose from {', '.join(METHODS)}")
    import torch

    meta = {"cpu": machine.cpu_model(), "threads": torch.get_num_threads(), "commit": machine.git_commit(),
            "torch": torch.__version__, "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "command": "python -m benchmarks.bench_first_call " + " ".join(argv if argv is not None else sys.argv[1:])}  # fmt: skip
    results = [run_method(m, shape) for m in methods]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "first_call.json").write_text(json.dumps({"meta": meta, "shape": shape, "results": results}, indent=1))
    (out / "first_call.md").write_text(report(results, shape, meta))
    print(report(results, shape, meta))
    return results


if __name__ == "__main__":
    main()
