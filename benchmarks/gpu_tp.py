"""Tensor parallel in one process: the one-process op (TP=1) against ``P`` simulated vocabulary shards.

The GPU suite's ``tp`` section (``benchmarks/gpu_suite.py``). A TP group needs ``P`` GPUs; this item runs
the same arithmetic on one: the vocabulary (the logits' last dimension, or the lm_head's rows) is cut into
``P`` contiguous slices of unequal sizes, and for each slice ``rlhf_fast._vocab_parallel.shard_partials``
runs the op's own launchers on it (what rank ``r`` computes); ``combine_logprobs`` merges the stacked
statistics in-process exactly as the MAX and SUM all-reduces merge them across ranks; ``shard_grads`` gives
each slice's gradient, and the hidden-state gradient is the sum over slices (the all-reduce of the linear
ops' backward). Compared with the one-process op on the whole vocabulary:

- ``max_abs_diff`` of the log-probs, the entropy and every gradient, and whether each is within its bar
  (float32 outputs: 1e-5 of their scale; gradients: 4 ulps of their dtype at their scale);
- the time of the TP=1 op (forward + backward) against the slices' work (forward statistics, combination
  and backward, summed over the slices, and the largest slice's own share): what one rank of a ``P``-way
  group would spend, without the communication (two all-reduces of ``[N]`` vectors forward, ``d_hidden``
  backward for the linear op).

    rlhf-fast bench gpu --sections tp [--dry-run]      # this item alone
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import torch

import rlhf_fast as rf
from rlhf_fast import _vocab_parallel as vp

from . import harness
from .gpu_report import _header, _write
from .measure import summarize_times

# (op, shape, dry-run shape): logprobs [N, V] at TRL's fused log-prob shape, linear_logprobs [N, H, V] at Liger's
CASES = (
    ("logprobs", (8192, 151936), (6, 37)),
    ("linear_logprobs", (8192, 4096, 131072), (6, 16, 37)),
)
PARTS = (2, 4, 8)
DRY_PARTS = (2, 3)
TEMPERATURE = 0.9
IGNORE = -100


def slice_sizes(V: int, P: int) -> list[int]:
    """``P`` unequal contiguous slices of ``V`` (one slice ~7% bigger, the next smaller, ...): what a
    vocabulary that is not padded to a multiple of ``P`` gives, and what the tests call odd sizes."""
    base, k = V // P, max(1, V // (15 * P))
    sizes = [base + (k if r % 2 == 0 else -k) for r in range(P)]
    sizes[-1] += V - sum(sizes)
    return sizes


def _inputs(op: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    N, V = shape[0], shape[-1]
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = IGNORE
    d = {"labels": labels.to(device), "g_logp": torch.randn(N, generator=g).to(device),
         "g_entropy": torch.randn(N, generator=g).to(device)}  # fmt: skip
    if op == "logprobs":
        d["logits"] = (2 * torch.randn(N, V, generator=g)).to(device, dtype)
    else:
        H = shape[1]
        d["hidden"] = torch.randn(N, H, generator=g).to(device, dtype)
        d["weight"] = (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype)
    return d


def tp1(op: str, d: dict, impl: str) -> dict:
    """The one-process op on the whole vocabulary, forward and backward."""
    if op == "logprobs":
        x = d["logits"].detach().requires_grad_(True)
        logp, ent = rf.logprobs(x, d["labels"], temperature=TEMPERATURE, return_entropy=True, impl=impl)
        torch.autograd.backward((logp, ent), (d["g_logp"], d["g_entropy"]))
        return {"logp": logp.detach(), "entropy": ent.detach(), "d_logits": x.grad}
    h, w = (d[k].detach().requires_grad_(True) for k in ("hidden", "weight"))
    logp, ent = rf.linear_logprobs(h, w, d["labels"], temperature=TEMPERATURE, return_entropy=True, impl=impl)
    torch.autograd.backward((logp, ent), (d["g_logp"], d["g_entropy"]))
    return {"logp": logp.detach(), "entropy": ent.detach(), "d_hidden": h.grad, "d_weight": w.grad}


def simulated(op: str, d: dict, impl: str, sizes: list[int], timings: list[float] | None = None) -> dict:
    """The same outputs and gradients from ``len(sizes)`` vocabulary slices, combined in this process.
    ``timings`` (when given) receives each slice's seconds (its forward statistics and backward)."""
    linear = op == "linear_logprobs"
    # the op's own (forward, backward): its Triton launchers or PyTorch twins (its module rlhf_fast.<op>_op)
    forward, backward = importlib.import_module(f"rlhf_fast.{op}_op")._backend(impl)
    V, labels = sum(sizes), d["labels"]
    opts, ins, parts = [], [], []
    for r, size in enumerate(sizes):
        t0 = time.perf_counter()
        lo = sum(sizes[:r])
        shard = vp.Shard(None, offset=lo, size=size, vocab=V)
        opts.append(vp.LogprobsShardOptions(shard, impl, forward, backward, linear=linear, temperature=TEMPERATURE,
                                            ignore_index=IGNORE))  # fmt: skip
        ins.append((d["hidden"], d["weight"][lo : lo + size], None) if linear else (d["logits"][:, lo : lo + size][None],))
        parts.append(vp.shard_partials(opts[-1], labels, ins[-1]))
        _tick(timings, r, t0)
    stats = [torch.stack([p[2][i] for p in parts]) for i in range(4)]  # [P, N] each
    logp, ent, row_max, log_norm = vp.combine_logprobs(*stats, torch.stack([p[1] for p in parts]), None)
    ignored = labels == IGNORE
    logp.masked_fill_(ignored, 0.0)
    g_logp = d["g_logp"].float().masked_fill(ignored, 0.0)
    grads = []
    for r in range(len(sizes)):
        t0 = time.perf_counter()
        grads.append(vp.shard_grads(opts[r], ins[r], parts[r][0], parts[r][1], (row_max, log_norm, ent), g_logp,
                                    d["g_entropy"].float(), (True, True, False)))  # fmt: skip
        _tick(timings, r, t0)
    out = {"logp": logp, "entropy": ent}
    if linear:
        out["d_hidden"] = sum(g[0].float() for g in grads).to(d["hidden"].dtype)
        out["d_weight"] = torch.cat([g[1] for g in grads])
    else:
        out["d_logits"] = torch.cat(grads, dim=-1)[0]  # each [1, N, V_r]
    return out


def _tick(timings, r, t0):
    if timings is not None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        while len(timings) <= r:
            timings.append(0.0)
        timings[r] += time.perf_counter() - t0


def _bar(name: str, ref: torch.Tensor, P: int) -> float:
    """float32 outputs: 1e-5 of their scale. Gradients: ``2 + P`` ulps of their dtype at their scale (``d_hidden``
    sums ``P`` partial products, each rounded to the dtype, where TP=1 rounds one)."""
    scale = ref.float().abs().max().item()
    if name in ("logp", "entropy"):
        return 1e-5 * max(scale, 1.0)
    return (2 + P) * torch.finfo(ref.dtype).eps * max(scale, 1e-30)


def _time_ms(fn, device: torch.device, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return summarize_times(times)


def run_case(op: str, shape: tuple, P: int, dtype: torch.dtype, device: torch.device, repeats: int,
             impl: str = "triton") -> dict:  # fmt: skip
    d = _inputs(op, shape, dtype, device)
    sizes = slice_sizes(shape[-1], P)
    ref, sim = tp1(op, d, impl), simulated(op, d, impl, sizes)
    diffs = {}
    for name, want in ref.items():
        diff = (sim[name].float() - want.float()).abs().max().item()
        bar = _bar(name, want, P)
        diffs[name] = {"max_abs_diff": diff, "bar": bar, "ok": diff <= bar}
    del ref, sim
    tp1_time = _time_ms(lambda: tp1(op, d, impl), device, repeats)
    per_slice: list[float] = []
    for _ in range(repeats):
        simulated(op, d, impl, sizes, per_slice)
    per_slice = [1e3 * s / repeats for s in per_slice]
    return {"op": op, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "P": P, "slices": sizes,
            "status": "PASS" if all(v["ok"] for v in diffs.values()) else "FAIL", "diffs": diffs,
            "tp1_ms": tp1_time["median_ms"], "slices_sum_ms": sum(per_slice), "largest_slice_ms": max(per_slice)}  # fmt: skip


def run(ctx) -> None:
    """The suite's section (``ctx``: ``gpu_suite.Context``): every case while the time box lasts, each saved to
    ``<out>/tp.json`` and ``tp.md`` as it ends."""
    dtype = torch.float32 if ctx.dry_run else torch.bfloat16
    results = []
    for P in DRY_PARTS if ctx.dry_run else PARTS:  # the smaller groups first: they matter most if time runs out
        for op, shape, dry_shape in CASES:
            s = dry_shape if ctx.dry_run else shape
            if ctx.time_left() <= 0:
                results.append({"op": op, "shape": list(s), "P": P, "status": "NOT RUN", "reason": "time box"})
                continue
            try:
                results.append(run_case(op, s, P, dtype, ctx.device, 1 if ctx.dry_run else 3))
            except Exception as exc:  # recorded, the next case runs
                reason = harness.error_text(exc)
                results.append({"op": op, "shape": list(s), "P": P, "status": "ERROR", "reason": reason})
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            _save(ctx.out, ctx.meta(), results)


def _save(out: Path, meta: dict, results: list[dict]) -> None:
    _write(out / "tp.json", {"section": "tp", "meta": meta, "results": results})
    lines = ["# Tensor parallel: TP=1 against simulated vocabulary slices", "", *_header(meta), "",
             "| status | op | shape | P | slices | worst diff / bar | TP=1 ms | slices sum ms | largest slice ms |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        if "diffs" not in r:
            lines.append(f"| {r['status']} | {r['op']} | {harness.format_shape(r['shape'])} | {r['P']} | | "
                         f"{r.get('reason', '')} | | | |")
            continue
        name, worst = max(r["diffs"].items(), key=lambda kv: kv[1]["max_abs_diff"] / kv[1]["bar"])
        lines.append(f"| {r['status']} | {r['op']} | {harness.format_shape(r['shape'])} | {r['P']} | "
                     f"{','.join(map(str, r['slices']))} | {name}: {worst['max_abs_diff']:.2g} / {worst['bar']:.2g} | "
                     f"{r['tp1_ms']:.2f} | {r['slices_sum_ms']:.2f} | {r['largest_slice_ms']:.2f} |")
    (out / "tp.md").write_text("\n".join(lines) + "\n")
