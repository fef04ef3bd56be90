"""The benchmark harness every ``benchmarks/bench_<op>.py`` shares.

A benchmark module describes its op as a :class:`Benchmark` (how to build inputs for a shape, the
methods to compare, the bytes the op must move or, for a compute-bound op, the floating-point operations each
method performs), built by :func:`declare` from the parts the module names ``METHODS``, ``make_inputs``,
``bytes_moved``, ``summarize`` (a generator of report lines), ``flops``, ``cpu_matmul_rates``, and calls :func:`main`. The harness measures every
(shape, mode, method), prints a table and writes ``benchmarks/results/<device>/<name>.{json,md,png}``.

Modes
    ``forward``   one forward call, inputs requiring grad (the training forward: what backward needs is
                  saved, and counts as memory).
    ``backward``  the backward alone. Each repeat runs a fresh forward *outside* the timed region, then
                  times ``torch.autograd.grad(outputs, inputs, ones)``. We recompute rather than use
                  ``retain_graph=True`` because it is correct for every method: the backward frees saved
                  tensors as it goes (as in training, so the memory is the real one), and methods whose
                  backward overwrites its inputs (in-place gradients) get a real forward every time.
    ``full``      forward + backward, timed together.

    An op without a gradient (say GAE) sets ``grad_inputs = ()``, and its ``Benchmark.modes`` defaults to
    ``("forward",)``: ``forward`` is then the call alone, on inputs that do not require grad, and the other
    modes are not offered.

    Gradients come from ``torch.autograd.grad``, not ``.backward()``: in a model the gradient of the
    logits flows on into the lm_head backward and is never accumulated into a ``.grad``, and
    accumulation into a leaf could copy an in-place gradient. The returned gradient counts as memory.

Timing
    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run, median and 20/80 %
    quantiles) when a call can simply be repeated; when each repeat needs an untimed setup (``backward``
    mode, or a method that overwrites its inputs) the same CUDA-event timing with the setup before each
    run. Never a host clock around asynchronous work, except the one-off "first call" time (JIT and
    ``torch.compile`` cost), taken between two synchronizations.
    CPU: ``time.perf_counter()`` around each call (CPU ops are synchronous), after warmup calls, in the
    steady state a training loop sees: the heap keeps the pages earlier calls freed (memory is measured
    on a separate call, below).

Memory ("peak extra": the most the call held above what was allocated just before it)
    CUDA: ``torch.cuda.reset_peak_memory_stats``, then ``max_memory_allocated() - memory_allocated()``
    measured around one call.
    CPU: there is no allocator statistic, so the number is RSS-based, and every (method, mode, shape) runs
    in a fresh subprocess (no heap or compiled code left over from another method; ``--in-process`` turns
    this off for quick runs). After the timed calls, one more call measures memory: before it the harness
    returns free heap pages to the OS (``malloc_trim``), resets the kernel's peak-RSS mark
    (``5 > /proc/self/clear_refs``) and reads the RSS; after it, peak RSS (``VmHWM``) minus that RSS.
    That call is not timed: after ``malloc_trim`` every page it allocates is a fresh page fault, which
    doubles the time of an op of a few milliseconds (GAE at 256x2048: 4.5 ms steady, 9 ms after a trim);
    tensors of more than 32 MiB (glibc's largest mmap threshold) are mmapped fresh on every call anyway.
    Where the peak cannot be reset, it falls back to the process's lifetime peak
    (``ru_maxrss``) minus the RSS after the inputs were created, and says so in the results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

# The harness's parts, a file each along its sections: what a benchmark is (spec.py), how one case is measured
# (measure.py), the machine it ran on (machine.py), the report (report.py). ``harness.<name>`` reaches the
# names the benchmarks, the GPU suite and the tests use (``__all__``), and the command line below.
from .machine import (collect_metadata, cpu_model, device_slug, git_commit, matmul_gflops, measure_ceilings,
                      measure_cpu_ceilings, package_version)  # fmt: skip
from .measure import add_ratios, error_text, measure, measure_cpu, run_benchmark
from .report import (format_ratio, plot_results, print_report, ranges_overlap, save_results, verdict, versus,
                     versus_baseline, write_markdown)  # fmt: skip
from .spec import (DEFAULT_REPEATS, DEFAULT_WARMUP, DTYPES, MODES, PACKAGE, RESULT_MARKER, Benchmark, BenchRun, Method,
                   build_case, declare, format_shape, module_cwd, module_name, results_dir,
                   torch_compile_method)  # fmt: skip

__all__ = [
    # spec.py: what a benchmark is and the run's options
    "Benchmark", "BenchRun", "DTYPES", "Method", "PACKAGE", "build_case", "declare", "format_shape", "module_cwd",
    "module_name",
    "results_dir", "torch_compile_method",
    # measure.py, machine.py, report.py
    "add_ratios", "error_text", "measure_cpu", "run_benchmark",
    "collect_metadata", "cpu_model", "device_slug", "git_commit", "matmul_gflops", "measure_ceilings", "package_version",
    "format_ratio", "ranges_overlap", "save_results", "verdict", "versus", "versus_baseline",
    # the command line every bench_<op>.py ends with
    "main",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------ cli


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    try:
        shapes = [tuple(int(d) for d in s.strip().lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes look like 4096x50000,8192x151936; got {text!r}") from None
    if not shapes or any(d <= 0 for s in shapes for d in s):
        raise argparse.ArgumentTypeError(f"shapes must be positive, like 4096x50000; got {text!r}")
    return shapes


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items

    return parse


def main(bench: Benchmark, argv: list[str] | None = None) -> list[dict]:
    """Command line shared by every ``benchmarks/bench_<op>.py``."""
    names = [m.name for m in bench.methods]
    p = argparse.ArgumentParser(prog=f"python -m {module_name(bench.module)}", description=bench.title)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--shapes", type=parse_shapes, help=f"comma-separated {bench.shape_format}; default per device")
    p.add_argument("--modes", type=_csv(bench.modes), default=list(bench.modes),
                   help="comma-separated: " + ",".join(bench.modes))  # fmt: skip
    p.add_argument("--methods", type=_csv(names), default=names, help="comma-separated: " + ",".join(names))
    repeats = {**DEFAULT_REPEATS, **(bench.repeats or {})}
    warmup = {**DEFAULT_WARMUP, **(bench.warmup or {})}
    p.add_argument("--repeats", type=int, help=f"timed calls (CPU: default {repeats['cpu']}; "
                   f"CUDA: loops with setup, default {repeats['cuda']})")  # fmt: skip
    p.add_argument("--warmup", type=int, help=f"untimed calls first (CPU: default {warmup['cpu']}; "
                   f"CUDA: default {warmup['cuda']})")  # fmt: skip
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device> under the current directory)")
    p.add_argument("--in-process", action="store_true",
                   help="CPU: measure everything in this process instead of one subprocess per measurement")  # fmt: skip
    p.add_argument("--no-warm", action="store_true",
                   help="CPU: skip the warm timings (every case again in this process, after 2 untimed calls)")  # fmt: skip
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: reprint and redraw (md, png) the saved JSON in the results folder")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one CPU measurement, JSON spec
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        r = measure(
            bench, spec["method"], tuple(spec["shape"]), DTYPES[spec["dtype"]], torch.device("cpu"),
            spec["mode"], spec["repeats"], spec["warmup"],
        )  # fmt: skip
        print(RESULT_MARKER + json.dumps(r), flush=True)
        return [r]

    kind = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if args.report_only:
        if args.out is None and kind == "cuda" and not torch.cuda.is_available():
            p.error("--report-only for GPU results on a machine without one: pass --out benchmarks/results/<gpu>")
        out_dir = args.out or results_dir(device_slug(torch.device(kind)))
        saved = json.loads((out_dir / f"{bench.name}.json").read_text())
        print_report(bench, saved["results"], saved["metadata"])
        write_markdown(bench, saved["results"], saved["metadata"], out_dir / f"{bench.name}.md", f"{bench.name}.png")
        plot_results(bench, saved["results"], saved["metadata"], out_dir / f"{bench.name}.png")
        print(f"rewrote {out_dir / bench.name}.md and .png from {bench.name}.json")
        return saved["results"]

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    device = torch.device(kind)
    config = BenchRun(
        device=device,
        dtype=DTYPES[args.dtype] if args.dtype else bench.default_dtype[kind],
        shapes=args.shapes or list(bench.default_shapes[kind]),
        modes=[m for m in MODES if m in args.modes],
        methods=args.methods,
        repeats=args.repeats if args.repeats is not None else repeats[kind],
        warmup=args.warmup if args.warmup is not None else warmup[kind],
        isolate=kind == "cpu" and not args.in_process,
        warm=not args.no_warm,
        module=bench.module,
        argv=tuple(sys.argv[1:] if argv is None else argv),
    )
    if config.repeats < 1 or config.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    ceilings = None
    if kind == "cuda":
        print("measuring device ceilings (copy bandwidth, bf16 matmul)...", flush=True)
        ceilings = measure_ceilings(device)
    else:
        print("measuring the CPU's ceilings (copy bandwidth; the op's matmul passes, if any)...", flush=True)
        ceilings = measure_cpu_ceilings(bench, config.shapes, config.dtype)
    meta = collect_metadata(device, config, ceilings)
    if kind == "cpu" and meta["load_average_start"] is not None and meta["load_average_start"] > 0.5:
        print(f"note: load average {meta['load_average_start']:.1f} before the run: other work skews CPU timings")
    results = run_benchmark(bench, config, ceilings)
    meta["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print_report(bench, results, meta)
    if not args.no_save:
        out_dir = args.out or results_dir(device_slug(device))
        for path in save_results(bench, results, meta, out_dir):
            print(f"wrote {path}")
    return results
