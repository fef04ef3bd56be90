"""The GPU suite: scarce GPU minutes turned into committed evidence, in one command.

    rlhf-fast bench gpu [--budget-s 420] [--out DIR] [--dry-run]
    python -m benchmarks.gpu_suite ...                   # the same, from a checkout's root

Sections run in priority order (:data:`SECTIONS`), each in its own process, time-boxed from the budget
(its planned share of what is left, so time a section does not use goes to the later ones), and each
writes its results to ``DIR`` as it goes: a run killed at its limit still leaves what it measured.

1. ``environment``: device, SM count, driver, versions, and the measured ceilings (device-to-device copy
   bandwidth counting bytes read + written; bf16 matmul rate at 8192^3).
2. ``correctness``: every Triton kernel and launcher specialisation against float64, forward and backward,
   fp32/bf16/fp16, odd and real shapes, one with N·V > 2^31 (``benchmarks/gpu_correctness.py``).
3. ``ops``: the op benchmarks (``benchmarks/bench_*.py``) at the peers' headline shapes, against eager,
   torch.compile and the peers that are installed (the others listed with the reason).
4. ``trainer``: on a random Qwen2.5-0.5B-shaped model, bf16: PPO steps, ``ops="fused"`` vs ``"reference"``
   (``benchmarks/bench_ppo_trainer.py --preset qwen0.5b``); then a TRL GRPO step, stock ``trl.GRPOTrainer`` vs
   ``rlhf_fast.integrations.trl.GRPOTrainer`` (``benchmarks/bench_trl_grpo.py --preset qwen0.5b``).
5. ``summary.md`` + ``summary.json`` (every raw figure) + ``summary.png``, written by this process at the end
   (and after every section), from what the sections left on disk.

Every file carries the commit, versions, ceilings and the command. ``--dry-run`` runs every code path on CPU
with tiny shapes (kernels under the Triton interpreter) in well under a minute: the test suite runs it.
Adding to the suite is one entry: a :class:`Section` in :data:`SECTIONS`, an :class:`OpRun` in
:data:`OPS`, or a case in ``gpu_correctness.CASES``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import gpu_tp, harness
from .gpu_report import _header, _read, _write, correctness_table, write_summary  # noqa: F401 (re-exported)

MODULE = harness.module_name("benchmarks.gpu_suite")
PEERS = ("trl", "liger-kernel", "cut-cross-entropy", "quack-kernels", "transformers", "accelerate")
_PEER_MODULES = {"trl": "trl", "liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy",
                 "quack-kernels": "quack", "transformers": "transformers", "accelerate": "accelerate"}  # fmt: skip
# A section's process gets this long past its time box to write what it has and exit, then it is killed
# (the environment variable is for the tests).
_GRACE_S = float(os.environ.get("RLHF_FAST_SUITE_GRACE_S", "15"))


@dataclass(frozen=True)
class Section:
    """One part of the suite: ``run(ctx)`` writes ``<out>/<name>.json`` (and more) as it goes."""

    name: str
    title: str
    planned_s: float  # planned seconds on one H100/H200 (benchmarks/README.md): its share of the budget
    run: Callable[["Context"], None]


@dataclass(frozen=True)
class OpRun:
    """One op benchmark of the ``ops`` section: ``benchmarks/bench_<name>.py`` at the peers' headline shapes."""

    name: str  # bench module suffix
    shapes: tuple[tuple[int, ...], ...]  # on CUDA
    dry_shapes: tuple[tuple[int, ...], ...]
    modes: tuple[str, ...] = ("forward", "full")
    planned_s: float = 20.0
    note: str = ""  # which peer figure the shape matches


OPS: list[OpRun] = [
    OpRun("logprobs", ((8192, 151936),), ((4, 64),), planned_s=25,
          note="TRL's fused log-prob+entropy kernel, 8192 x 151936 bf16"),
    OpRun("linear_logprobs", ((8192, 4096, 131072),), ((8, 16, 64),), planned_s=35,
          note="Liger's fused linear cross entropy with entropy, M=8192 H=4096 V=131072 bf16"),
    OpRun("ppo", ((16, 512, 151936),), ((2, 4, 64),), planned_s=25, note="GRPO/PPO loss from logits"),
    OpRun("linear_ppo", ((16, 512, 4096, 131072),), ((1, 8, 16, 64),), modes=("full",), planned_s=20,
          note="M=8192 H=4096 V=131072 bf16: issue 14's bar 40 ms (three matmul passes, ~33 ms at the measured rate)"),
    # issue 24's two bars (truncated sampling): never measured on a GPU, planned_s as skip_ignored's (two methods,
    # forward + backward only; benchmarks/README.md)
    OpRun("truncation", ((8192, 151936),), ((4, 64),), modes=("full",), planned_s=10,
          note="issue 24: rf.logprobs top_k=50 top_p=0.95 vs transformers' warpers + log_softmax (bar: <= 0.5x time, <= 0.25x memory)"),
    OpRun("truncation_linear", ((8192, 4096, 151936),), ((8, 16, 64),), modes=("full",), planned_s=10,
          note="issue 24: rf.linear_logprobs top_k=50 top_p=0.95 vs untruncated (bar: <= 1.5x time)"),
    OpRun("full_kl", ((8192, 151936),), ((4, 64),), planned_s=15),
    OpRun("gae", ((256, 2048),), ((2, 16),), modes=("forward",), planned_s=10, note="B=256, T=2048"),
    OpRun("linear_dpo", ((4, 512, 4096, 128256),), ((1, 4, 16, 64),), planned_s=25,
          note="Liger's fused linear DPO"),
    OpRun("pairwise", ((4096,),), ((16,),), planned_s=10),
    OpRun("sampling", ((256, 151936),), ((4, 64),), modes=("forward",), planned_s=10),
    OpRun("skip_ignored", ((8192, 4096, 131072),), ((16, 16, 64),), modes=("full",), planned_s=10,
          note="issue 16: linear_logprobs with half the rows ignored, skip_ignored=True vs False"),
]  # fmt: skip


@dataclass
class Context:
    out: Path
    dry_run: bool
    deadline: float  # time.time() after which no new item starts
    command: str

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.dry_run else torch.device("cuda")

    def time_left(self) -> float:
        return self.deadline - time.time()

    def meta(self) -> dict:
        """Commit, versions, ceilings (once measured) and the command: in every file."""
        env = _read(self.out / "environment.json")
        return {
            "command": self.command,
            "git_commit": harness.git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dry_run": self.dry_run,
            "device_name": env.get("environment", {}).get("device_name"),
            "versions": versions(),
            "ceilings": env.get("ceilings"),
        }


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": harness.package_version("triton"),
           "cuda": torch.version.cuda, "rlhf_fast": harness.package_version("rlhf_fast")}  # fmt: skip
    out.update({d: harness.package_version(d) for d in PEERS})
    return out


# ---------------------------------------------------------------------------------------- 1. environment


def run_environment(ctx: Context) -> None:
    device = ctx.device
    env = {"platform": platform.platform(), "cpu": harness.cpu_model(), "cpu_count": os.cpu_count(),
           "device": device.type, "device_name": harness.cpu_model()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, sm_count=props.multi_processor_count,
                   compute_capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                   driver=_nvidia_smi("driver_version"), slug=harness.device_slug(device))  # fmt: skip
    peers = {}
    for dist, mod in _PEER_MODULES.items():
        try:
            importlib.import_module(mod)
            peers[dist] = {"version": harness.package_version(dist), "importable": True}
        except Exception as exc:  # not installed, or broken: the reason is the finding
            peers[dist] = {"version": harness.package_version(dist), "importable": False,
                           "reason": harness.error_text(exc)}  # fmt: skip
    env["peers"] = peers
    _write(ctx.out / "environment.json", {"section": "environment", "meta": ctx.meta(), "environment": env})
    sizes = dict(copy_bytes=1 << 20, matmul_size=64) if ctx.dry_run else {}
    ceilings = harness.measure_ceilings(device, **sizes)
    payload = {"section": "environment", "environment": env, "ceilings": ceilings}
    _write(ctx.out / "environment.json", payload)  # first, so that meta() below reads the ceilings
    payload["meta"] = ctx.meta()
    _write(ctx.out / "environment.json", payload)
    lines = ["# Environment", "", *_header(payload["meta"]), "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items() if k != "peers"]
    lines += ["", "| peer | version | importable |", "|---|---|---|"]
    lines += [f"| {k} | {p['version'] or '-'} | {'yes' if p['importable'] else 'no: ' + p['reason']} |"
              for k, p in peers.items()]  # fmt: skip
    (ctx.out / "environment.md").write_text("\n".join(lines) + "\n")


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ---------------------------------------------------------------------------------------- 2. correctness


def run_correctness(ctx: Context) -> None:
    import warnings

    from . import gpu_correctness as gc

    # The interpreter evaluates 0 * -inf on the padded lanes of a block (then discarded by tl.where).
    warnings.filterwarnings("ignore", message="invalid value encountered", category=RuntimeWarning)
    plan = gc.planned(ctx.dry_run)
    rows: list[dict] = []
    not_run: list[dict] = []
    for case, label, shape, dtype in plan:
        if ctx.time_left() <= 0:
            not_run.append({"case": case.name, "shape_label": label, "shape": list(shape),
                            "dtype": str(dtype).removeprefix("torch."), "status": "NOT RUN", "reason": "time box"})
        else:
            t0 = time.perf_counter()
            rows.append({**gc.run_case(case, label, shape, dtype, ctx.device), "seconds": time.perf_counter() - t0})
        _save_correctness(ctx, rows + not_run, len(plan))


def _save_correctness(ctx: Context, rows: list[dict], planned: int) -> None:
    meta = ctx.meta()
    counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "ERROR", "NOT RUN")}
    _write(ctx.out / "correctness.json", {"section": "correctness", "meta": meta, "planned": planned,
                                          "counts": counts, "rows": rows})  # fmt: skip
    (ctx.out / "correctness.md").write_text("\n".join(["# Native correctness", "", *_header(meta), "",
                                                       *correctness_table(rows)]) + "\n")  # fmt: skip


# ------------------------------------------------------------------------------------------------ 3. ops


def run_ops(ctx: Context) -> None:
    env = _read(ctx.out / "environment.json")
    ceilings = env.get("ceilings") if not ctx.dry_run else None
    (ctx.out / "ops").mkdir(exist_ok=True)
    index = {"section": "ops", "ops": {}}
    for op in OPS:
        bench = importlib.import_module(f"{harness.PACKAGE}.bench_{op.name}").BENCHMARK
        if ctx.time_left() <= 0:
            index["ops"][op.name] = {"status": "not run", "reason": "time box"}
            index["meta"] = ctx.meta()
            _write(ctx.out / "ops.json", index)
            continue
        dtype = torch.float32 if ctx.dry_run else torch.bfloat16
        shapes = list(op.dry_shapes if ctx.dry_run else op.shapes)
        modes = [m for m in op.modes if m in bench.modes]
        results: list[dict] = []
        argv = ("--shapes", ",".join(map(harness.format_shape, shapes)), "--modes", ",".join(modes))
        config = harness.BenchRun(device=ctx.device, dtype=dtype, shapes=shapes, modes=modes,
                                   methods=[m.name for m in bench.methods], repeats=1 if ctx.dry_run else 20,
                                   warmup=1 if ctx.dry_run else 3, isolate=False, module=bench.module, argv=argv)
        meta = harness.collect_metadata(ctx.device, config, ceilings)
        meta.update(suite=ctx.meta(), command=ctx.command)
        for method in bench.methods:  # one method at a time: stop at the time box, save after each
            if ctx.time_left() <= 0:
                results.append({"method": method.name, "status": "skipped", "reason": "time box reached"})
                continue
            if ctx.dry_run and method.first_call_note == "compile":  # tens of seconds of C++ builds on CPU
                results.append({"method": method.name, "status": "skipped", "reason": "dry run: not compiled"})
                continue
            # The harness runs gc.collect() around every call; with torch, transformers and the peers imported a
            # full collection took 0.5 s (59 of the dry run's 75 s here). Objects alive now are moved out of
            # the collector's sight (never freed: the modules and the benchmark descriptions), so that each
            # collection scans only what the measurement itself allocates.
            gc.freeze()
            results += harness.run_benchmark(bench, dataclasses.replace(config, methods=[method.name]), ceilings)
            harness.add_ratios([r for r in results if "mode" in r], bench.baseline)
            # the raw figures after every method; the report (markdown, plot) once the op is done
            _write(ctx.out / "ops" / f"{bench.name}.json", {"benchmark": bench.name, "title": bench.title,
                                                            "metadata": meta, "results": results})  # fmt: skip
        try:
            harness.save_results(bench, results, meta, ctx.out / "ops")
        except Exception as exc:  # a report that fails must not lose the raw figures (already written)
            print(f"{bench.name}: report failed ({harness.error_text(exc)}); raw results kept", flush=True)
        index["ops"][op.name] = {"status": "done", "note": op.note, "shapes": [list(s) for s in shapes],
                                 "modes": modes, "files": [f"ops/{op.name}.{e}" for e in ("json", "md", "png")]}
        index["meta"] = ctx.meta()
        _write(ctx.out / "ops.json", index)


# -------------------------------------------------------------------------------------------- 4. trainer


# Planned seconds of the trainer section's items on one H100/H200 (benchmarks/README.md); the TRL GRPO item
# starts only with TRL_GRPO_MIN_S of the section's box left, else it is listed as not run.
TRAINER_PLANNED_S = {"ppo_trainer": 50, "trl_grpo": 30}
TRL_GRPO_MIN_S = 20.0


def run_trainer(ctx: Context) -> None:
    from . import bench_ppo_trainer, bench_trl_grpo

    preset = "tiny" if ctx.dry_run else "qwen0.5b"
    common = ["--out", str(ctx.out / "trainer"), "--device", "cpu" if ctx.dry_run else "auto"]
    argv = ["--preset", preset, "--steps", "1" if ctx.dry_run else "2", *common]
    record = {"section": "trainer", "meta": ctx.meta(), "argv": argv, "status": "running"}
    _write(ctx.out / "trainer.json", record)
    results = bench_ppo_trainer.main(argv)
    record.update(preset=preset, shape=bench_ppo_trainer.PRESETS[preset], results=results)

    # one TRL GRPO step (after a warm-up step), stock trl.GRPOTrainer vs rlhf_fast.integrations.trl's
    grpo_argv = ["--preset", preset, "--steps", "2", *common]
    grpo = record["trl_grpo"] = {"argv": grpo_argv, "preset": preset, "shape": bench_trl_grpo.PRESETS[preset]}
    error = None
    if ctx.time_left() < TRL_GRPO_MIN_S:
        grpo["status"] = f"NOT RUN: time box ({max(ctx.time_left(), 0):.0f} s left, {TRL_GRPO_MIN_S:.0f} s needed)"
    else:
        grpo["status"] = "running"
        _write(ctx.out / "trainer.json", record)
        try:
            bench_trl_grpo.main(grpo_argv)
            grpo["status"] = "done"
        except Exception as exc:  # recorded, then raised: the section fails loudly, the PPO figures kept
            grpo["status"], error = f"failed: {harness.error_text(exc)}", exc
        saved = _read(ctx.out / "trainer" / "trl_grpo.json")  # what the benchmark wrote (same-start check included)
        grpo.update(results=saved.get("results", []), same_start=saved.get("meta", {}).get("same_start"))
    record.update(status="done", meta=ctx.meta())
    _write(ctx.out / "trainer.json", record)
    if error is not None:
        raise error


SECTIONS: list[Section] = [
    Section("environment", "Environment and measured ceilings", 15, run_environment),
    Section("correctness", "Native correctness of every kernel against float64", 110, run_correctness),
    Section("ops", "Op benchmarks at the peers' headline shapes", sum(op.planned_s for op in OPS), run_ops),
    Section("trainer", "Qwen2.5-0.5B shape: a PPO step, fused vs reference ops; a TRL GRPO step, stock vs rlhf_fast",
            sum(TRAINER_PLANNED_S.values()), run_trainer),
    Section("tp", "Tensor parallel: TP=1 vs simulated vocabulary slices (benchmarks/gpu_tp.py)", 10, gpu_tp.run),
]


# ------------------------------------------------------------------------------------------------ driver


def plan(budget_s: float) -> list[dict]:
    total = sum(s.planned_s for s in SECTIONS)
    return [{"name": s.name, "planned_s": s.planned_s, "share_of_budget": s.planned_s / total * budget_s}
            for s in SECTIONS]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="rlhf-fast bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for all sections together (default 420)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device-slug>/ under the "
                   "current directory; benchmarks/results/dry-run/ with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="every code path on CPU, tiny shapes, Triton interpreter")
    p.add_argument("--sections", help="comma-separated subset of " + ",".join(s.name for s in SECTIONS))
    p.add_argument("--_section", help=argparse.SUPPRESS)  # internal: run one section in this process
    p.add_argument("--_deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--_command", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: the suite measures a GPU (--dry-run runs every code path on CPU)")
    names = [s.name for s in SECTIONS]
    chosen = names if not args.sections else [s.strip() for s in args.sections.split(",") if s.strip()]
    if any(n not in names for n in chosen):
        p.error(f"--sections: choose from {', '.join(names)}")

    if args._section:  # a child: one section, then exit
        ctx = Context(args.out, args.dry_run, args._deadline, args._command)
        next(s for s in SECTIONS if s.name == args._section).run(ctx)
        return {}

    slug = "dry-run" if args.dry_run else harness.device_slug(torch.device("cuda"))
    out = (args.out or harness.results_dir(slug)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "rlhf-fast bench gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    ctx = Context(out, args.dry_run, 0.0, command.strip())
    sections = [s for s in SECTIONS if s.name in chosen]
    suite = {"meta": ctx.meta(), "budget_s": args.budget_s, "plan": plan(args.budget_s), "sections": []}
    env = os.environ.copy()
    if args.dry_run and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # the kernels under the interpreter, set before rlhf_fast is imported
    env.setdefault("RLHF_FAST_NO_PROGRESS", "1")
    start = time.time()
    for i, section in enumerate(sections):
        left = args.budget_s - (time.time() - start)
        rest = sum(s.planned_s for s in sections[i:])
        box = max(0.0, left * section.planned_s / rest)
        record = {"name": section.name, "title": section.title, "planned_s": section.planned_s, "box_s": box}
        suite["sections"].append(record)
        if box < 1:
            record.update(status="not run: budget spent", seconds=0.0)
            continue
        print(f"[gpu suite] {section.name}: time box {box:.0f} s", flush=True)
        t0 = time.time()
        cmd = [sys.executable, "-m", MODULE, "--_section", section.name, "--out", str(out), "--_deadline",
               str(t0 + box), "--_command", ctx.command] + (["--dry-run"] if args.dry_run else [])  # fmt: skip
        # its own process group: at the time box the section and every process it started (the trainer's runs)
        # are killed together, so that nothing keeps the GPU busy under the next section
        proc = subprocess.Popen(cmd, env=env, cwd=harness.module_cwd(), start_new_session=True)
        try:
            code = proc.wait(timeout=box + _GRACE_S)
            status = "done" if code == 0 else f"failed (exit {code}): see its output"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"killed at its time box ({box:.0f} s + {_GRACE_S} s): partial results kept"
        record.update(status=status, seconds=time.time() - t0)
        suite["meta"] = ctx.meta()
        write_summary(out, suite)  # after every section: a run killed later still has its summary
    suite["seconds"] = time.time() - start
    write_summary(out, suite)
    print(f"[gpu suite] {suite['seconds']:.0f} s; results in {out} (summary.md)", flush=True)
    return suite


if __name__ == "__main__":
    main()
