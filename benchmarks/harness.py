"""The benchmark harness every ``benchmarks/bench_<op>.py`` shares.

A benchmark module describes its op as a :class:`Benchmark` (how to build inputs for a shape, the
methods to compare, the bytes the op must move or, for a compute-bound op, the floating-point operations each
method performs) and calls :func:`main`. The harness measures every
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

    An op without a gradient (say GAE) sets ``Benchmark.modes = ("forward",)`` and ``grad_inputs = ()``:
    ``forward`` is then the call alone, on inputs that do not require grad, and the other modes are not
    offered.

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
import ctypes
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# This folder is importable twice: as ``benchmarks`` from a checkout's root (``python -m benchmarks.bench_x``)
# and as ``rlhf_fast.benchmarks`` from an installation (``rlhf-fast bench x``, any directory).
PACKAGE = __package__ or "benchmarks"


def results_dir(slug: str) -> Path:
    """Default results folder: ``benchmarks/results/<slug>`` under the current directory."""
    return Path.cwd() / "benchmarks" / "results" / slug


def module_name(module: str) -> str:
    """``benchmarks.bench_x`` as this installation imports it (``rlhf_fast.benchmarks.bench_x`` when installed)."""
    return f"{PACKAGE}.{module.rsplit('.', 1)[-1]}"


def module_cwd() -> Path | None:
    """Where ``python -m <module_name(...)>`` resolves: the checkout's root for ``benchmarks``, anywhere else."""
    return REPO_ROOT if PACKAGE == "benchmarks" else None

MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 1 << 20

# CPU runs take seconds per call at real sizes: a few repeats after one warmup call (the first call of a
# fresh process pays page faults and thread-pool start-up, ~3x a steady call at 4096x50000).
# On CUDA only the loop with an untimed setup uses these; do_bench picks its own count (25 ms warmup,
# 100 ms of repeats, Triton's defaults).
DEFAULT_REPEATS = {"cpu": 3, "cuda": 20}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 3}
# Zeroed before each CUDA-event-timed run to flush L2 (as do_bench does): larger than any L2 (H100: 50 MiB).
_L2_FLUSH_BYTES = 256 * MIB
# Ceilings: a 1 GiB device-to-device copy (moves 2 GiB: read + write) and an 8192^3 bf16 matmul are large
# enough to reach steady-state bandwidth / tensor-core rate on any current GPU.
_COPY_BYTES = 1 << 30
_MATMUL_SIZE = 8192
_RESULT_MARKER = "@@bench-result@@ "
# A worker that takes longer than this is stuck (the slowest default CPU case takes well under a minute).
_WORKER_TIMEOUT_S = 3600


# ------------------------------------------------------------------------------------------ description


@dataclass(frozen=True)
class Method:
    """One way of computing the op.

    ``make()`` returns ``fn(**inputs) -> Tensor | tuple[Tensor, ...]``; it may import a peer library or
    wrap with ``torch.compile`` and may raise (the method is then reported as skipped or failed, the run
    goes on).
    """

    name: str
    make: Callable[[], Callable[..., Any]]
    description: str
    modes: tuple[str, ...] = MODES
    devices: tuple[str, ...] = ("cpu", "cuda")
    requires: tuple[str, ...] = ()  # modules it imports, checked (without importing) before running
    overwrites_inputs: bool = False  # its backward writes over its inputs: restore them before each repeat
    note: str = ""  # short, shown in the table's note column
    first_call_note: str = ""  # e.g. "compile": show the first call's time (one-off cost) in the table


@dataclass(frozen=True)
class Benchmark:
    """An op to benchmark: its inputs, the methods compared and the bytes it must move."""

    name: str  # results file stem
    module: str  # importable module defining it, run as ``python -m <module>`` for CPU workers
    title: str  # one line for the markdown header
    methods: tuple[Method, ...]
    make_inputs: Callable[[tuple[int, ...], torch.dtype, torch.device], dict[str, torch.Tensor]]
    grad_inputs: tuple[str, ...]  # inputs differentiated in the backward and full modes
    # Minimum traffic of the op per mode (GB/s column), or None for an op whose bound is compute (see flops).
    bytes_moved: Callable[[tuple[int, ...], torch.dtype, str], int] | None
    bytes_formula: str  # that formula in words, for the markdown ("" without bytes_moved)
    default_shapes: dict[str, tuple[tuple[int, ...], ...]]  # per device type
    default_dtype: dict[str, torch.dtype]  # per device type
    shape_format: str = "NxV"
    baseline: str = "eager"
    summarize: Callable[[list[dict]], list[str]] | None = None  # extra lines for the report
    # Floating-point operations one call performs, from a result dict (its "shape", "mode", "method",
    # "device", "dtype"): adds a TFLOP/s column and, on GPU, its fraction of the measured bf16 matmul rate.
    # Per method, because methods may do different work (e.g. recompute a product in backward). None: no column.
    flops: Callable[[dict], float | None] | None = None
    flops_formula: str = ""  # that formula in words, for the markdown
    # Extra table columns after "method": (header, cell text from a result dict), e.g. the work a method does.
    extra_columns: tuple[tuple[str, Callable[[dict], str]], ...] = ()
    # The modes the op has: all of MODES for a differentiable op, ("forward",) for one without a gradient.
    modes: tuple[str, ...] = MODES
    # Per device type, overrides of DEFAULT_REPEATS / DEFAULT_WARMUP: an op of a few milliseconds needs more
    # repeats than the seconds-long default cases (the --repeats / --warmup flags override both).
    repeats: dict[str, int] | None = None
    warmup: dict[str, int] | None = None
    # CPU ceiling of a compute-bound op: ``fn(shape, dtype) -> {pass name: GFLOP/s}``, the machine's measured
    # rate for each matmul pass of the op at that shape (plain torch products, the op's own layouts). Adds
    # "% mm" (achieved TFLOP/s over the rate of the same passes) to CPU tables: CPUs differ between machines,
    # and a fraction of the machine's own rate travels where milliseconds do not.
    cpu_matmul_rates: Callable[[tuple[int, ...], torch.dtype], dict[str, float]] | None = None

    def __post_init__(self):
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ValueError(f"{self.name}: modes must be a non-empty subset of {MODES}, got {self.modes}")
        if not self.grad_inputs and self.modes != ("forward",):
            raise ValueError(f"{self.name}: without grad_inputs there is nothing to differentiate: modes=('forward',)")

    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise ValueError(f"unknown method {name!r}; {self.name} has {[m.name for m in self.methods]}")


# ------------------------------------------------------------------------------------------- one case


@dataclass
class Case:
    """What one measurement runs: ``state = setup()`` untimed (if any), then ``run(state)`` timed.

    ``run`` returns what it computed; the harness drops it after stopping the clock, so freeing outputs
    and saved tensors is not timed.
    """

    run: Callable[[Any], Any]
    setup: Callable[[], Any] | None
    grad_to_none: list[torch.Tensor]


def build_case(
    fn: Callable[..., Any],
    inputs: dict[str, torch.Tensor],
    grad_inputs: tuple[str, ...],
    mode: str,
    overwrites_inputs: bool = False,
) -> Case:
    """The (setup, run) pair measuring ``fn(**inputs)`` in ``mode`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    targets = [inputs[name] for name in grad_inputs]
    grad_outputs: list[torch.Tensor] = []  # ones shaped like the outputs, made on the first (warmup) call

    def forward() -> list[torch.Tensor]:
        outs = fn(**inputs)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]

    def backward(outs: list[torch.Tensor]):
        if not grad_outputs:
            grad_outputs.extend(torch.ones_like(o) for o in outs)
        return torch.autograd.grad(outs, targets, grad_outputs)

    restore = None
    if overwrites_inputs and mode != "forward":
        pristine = [(t, t.detach().clone()) for t in targets]

        def restore():
            with torch.no_grad():
                for t, saved in pristine:
                    t.copy_(saved)

    if mode == "forward":
        return Case(run=lambda _: forward(), setup=None, grad_to_none=targets)
    if mode == "backward":

        def fresh_forward():
            if restore is not None:
                restore()
            return forward()

        return Case(run=backward, setup=fresh_forward, grad_to_none=targets)
    return Case(run=lambda _: backward(forward()), setup=restore, grad_to_none=targets)


# --------------------------------------------------------------------------------------------- timing


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (what ``torch.quantile`` and do_bench use)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_times(times_ms: list[float]) -> dict:
    s = sorted(times_ms)
    return {
        "median_ms": _quantile(s, 0.5),
        "p20_ms": _quantile(s, 0.2),
        "p80_ms": _quantile(s, 0.8),
        "repeats": len(s),
    }


# CPU memory: RSS, from /proc on Linux (psutil elsewhere).
_LIBC = None
if sys.platform.startswith("linux"):
    try:
        _LIBC = ctypes.CDLL("libc.so.6")
    except OSError:
        pass


def _malloc_trim() -> None:
    """Give free heap pages back to the OS, so that memory freed earlier is not already resident."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    rss = _proc_status_bytes("VmRSS")
    if rss is None:
        import psutil

        rss = psutil.Process().memory_info().rss
    return rss


def lifetime_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux >= 4.0). False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    peak, rss = _proc_status_bytes("VmHWM"), _proc_status_bytes("VmRSS")
    return peak is not None and rss is not None and peak <= rss + 16 * MIB


CPU_MEMORY_METHOD = (
    "peak RSS during the call minus RSS just before it (VmHWM reset via /proc/self/clear_refs), "
    "on one untimed call after malloc_trim"
)
CPU_MEMORY_FALLBACK = "lifetime peak RSS (ru_maxrss) minus RSS after the inputs were created (peak not resettable)"


def measure_cpu(case: Case, repeats: int, warmup: int) -> dict:
    """Median and 20/80 % quantiles of ``perf_counter`` times, and peak extra RSS (one more call), of a CPU case."""
    rss_after_inputs = rss_bytes()
    first_call_s = None
    for _ in range(max(1, warmup)):  # at least one: the first call pays one-off costs (compile, page faults)
        state = case.setup() if case.setup is not None else None
        t0 = time.perf_counter()
        out = case.run(state)
        dt = time.perf_counter() - t0
        first_call_s = dt if first_call_s is None else first_call_s
        del out, state
    times = []
    for _ in range(repeats):
        state = case.setup() if case.setup is not None else None
        gc.collect()
        t0 = time.perf_counter()
        out = case.run(state)
        t1 = time.perf_counter()
        del out, state
        times.append((t1 - t0) * 1e3)
    # Memory: one untimed call with the free heap returned to the OS first (see the module docstring).
    state = case.setup() if case.setup is not None else None
    gc.collect()
    _malloc_trim()
    resettable = reset_peak_rss()
    before = rss_bytes()
    out = case.run(state)
    peak = _proc_status_bytes("VmHWM") if resettable else None
    del out, state
    if peak is not None:
        peak_extra, method = peak - before, CPU_MEMORY_METHOD
    else:
        peak_extra, method = lifetime_peak_rss_bytes() - rss_after_inputs, CPU_MEMORY_FALLBACK
    return {
        **summarize_times(times),
        "first_call_s": first_call_s,
        "peak_extra_mib": max(peak_extra, 0) / MIB,
        "memory_method": method,
        "timing_method": f"perf_counter, {max(1, warmup)} warmup call(s)",
    }


def measure_cuda(case: Case, device: torch.device, repeats: int, warmup: int) -> dict:
    """CUDA-event times (do_bench when no setup is needed) and peak extra allocated memory of a CUDA case."""
    import triton.testing

    sync = torch.cuda.synchronize
    # First call, apart: Triton JIT / torch.compile / autotuning. Host clock between two synchronizations.
    state = case.setup() if case.setup is not None else None
    sync(device)
    t0 = time.perf_counter()
    out = case.run(state)
    sync(device)
    first_call_s = time.perf_counter() - t0
    del out, state

    # Peak extra memory of one call.
    state = case.setup() if case.setup is not None else None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = case.run(state)
    sync(device)
    peak_extra = torch.cuda.max_memory_allocated(device) - before
    del out, state

    if case.setup is None:
        median, p20, p80 = triton.testing.do_bench(
            lambda: case.run(None), quantiles=[0.5, 0.2, 0.8], grad_to_none=case.grad_to_none
        )
        timing = {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "repeats": None}
        timing_method = "triton.testing.do_bench (CUDA events, 25 ms warmup, 100 ms of repeats)"
    else:
        times = _cuda_event_times(case, device, repeats, warmup)
        timing = summarize_times(times)
        timing_method = f"CUDA events around each call after an untimed setup, {warmup} warmup call(s)"
    return {
        **timing,
        "first_call_s": first_call_s,
        "peak_extra_mib": peak_extra / MIB,
        "memory_method": "torch.cuda.max_memory_allocated() - memory_allocated() before the call",
        "timing_method": timing_method,
    }


def _cuda_event_times(case: Case, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """do_bench's loop with ``setup()`` enqueued before each run: only the run lies between the events."""
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    for _ in range(warmup):
        state = case.setup()
        out = case.run(state)
        del out, state
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        state = case.setup()
        for t in case.grad_to_none:
            t.grad = None
        flush.zero_()
        starts[i].record()
        out = case.run(state)
        ends[i].record()
        del out, state  # the caching allocator reuses memory in stream order: safe before the sync
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


# -------------------------------------------------------------------------------------- measurements


def _base_result(bench: Benchmark, method: str, shape, dtype: torch.dtype, device: torch.device, mode: str) -> dict:
    return {
        "benchmark": bench.name,
        "method": method,
        "mode": mode,
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "status": "ok",
    }


def _error_text(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300]


def measure(
    bench: Benchmark,
    method_name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    mode: str,
    repeats: int,
    warmup: int,
) -> dict:
    """Measure one (method, mode, shape) in this process. Never raises: failures become ``status: error``."""
    result = _base_result(bench, method_name, shape, dtype, device, mode)
    method = bench.method(method_name)
    inputs = case = None
    try:
        try:
            fn = method.make()
        except ImportError as exc:
            result.update(status="skipped", reason=_error_text(exc))
            return result
        inputs = bench.make_inputs(tuple(shape), dtype, device)
        case = build_case(fn, inputs, bench.grad_inputs, mode, method.overwrites_inputs)
        if device.type == "cuda":
            result.update(measure_cuda(case, device, repeats, warmup))
        else:
            result.update(measure_cpu(case, repeats, warmup))
    except Exception as exc:  # a method that fails (compile error, OOM) is reported, the run goes on
        traceback.print_exc(file=sys.stderr)
        result.update(status="error", reason=_error_text(exc))
    finally:
        del inputs, case
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def measure_isolated(
    bench: Benchmark, method: str, shape, dtype: torch.dtype, mode: str, repeats: int, warmup: int
) -> dict:
    """:func:`measure` on CPU in a fresh ``python -m <bench.module> --worker`` process (clean RSS)."""
    spec = {
        "method": method,
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "mode": mode,
        "repeats": repeats,
        "warmup": warmup,
    }
    cmd = [sys.executable, "-m", module_name(bench.module), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=module_cwd(), capture_output=True, text=True, timeout=_WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc = None
    if proc is not None:
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(_RESULT_MARKER):
                result = json.loads(line[len(_RESULT_MARKER) :])
                if result.get("status") == "error" and proc.stderr.strip():
                    result["traceback_tail"] = proc.stderr.strip().splitlines()[-1][:300]
                result["isolated"] = True
                return result
    result = _base_result(bench, method, shape, dtype, torch.device("cpu"), mode)
    if proc is None:
        reason = f"worker timed out after {_WORKER_TIMEOUT_S} s"
    else:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        reason = f"worker exited with {proc.returncode} (-9: killed, e.g. out of memory) {tail}"[:300]
    result.update(status="error", reason=reason, isolated=True)
    return result


@dataclass
class RunConfig:
    device: torch.device
    dtype: torch.dtype
    shapes: list[tuple[int, ...]]
    modes: list[str]
    methods: list[str]
    repeats: int
    warmup: int
    isolate: bool  # CPU: one subprocess per measurement
    warm: bool = False  # CPU, isolated: also time every case warm, in this one process (see run_benchmark)
    module: str = ""  # for the recorded command line
    argv: tuple[str, ...] = ()


def planned_cases(bench: Benchmark, config: RunConfig) -> tuple[list[tuple], list[dict]]:
    """``(shape, mode, method)`` to measure, and skipped entries (wrong device, peer not installed)."""
    todo, skipped = [], []
    for name in config.methods:
        method = bench.method(name)
        reason = None
        if config.device.type not in method.devices:
            reason = f"{'/'.join(method.devices)} only"
        else:
            missing = [m for m in method.requires if importlib.util.find_spec(m.split(".")[0]) is None]
            if missing:
                reason = f"not installed: {', '.join(missing)}"
        if reason is not None:
            skipped.append({"method": name, "status": "skipped", "reason": reason})
    skipped_names = {s["method"] for s in skipped}
    for shape in config.shapes:
        for mode in config.modes:
            for name in config.methods:
                if name not in skipped_names and mode in bench.method(name).modes:
                    todo.append((shape, mode, name))
    return todo, skipped


def run_benchmark(bench: Benchmark, config: RunConfig, ceilings: dict | None = None) -> list[dict]:
    """Measure every planned case, printing one line per result; adds bandwidth and ratios to baseline."""
    todo, skipped = planned_cases(bench, config)
    results = []
    for i, (shape, mode, name) in enumerate(todo, 1):
        label = f"[{i}/{len(todo)}] {format_shape(shape)} {mode:<8} {name:<26}"
        print(label, end=" ", flush=True)
        if config.device.type == "cpu" and config.isolate:
            r = measure_isolated(bench, name, shape, config.dtype, mode, config.repeats, config.warmup)
        else:
            r = measure(bench, name, shape, config.dtype, config.device, mode, config.repeats, config.warmup)
        add_bandwidth(bench, r, ceilings)
        add_throughput(bench, r, ceilings)
        results.append(r)
        if r["status"] == "ok":
            print(f"{r['median_ms']:10.2f} ms {r['peak_extra_mib']:10.1f} MiB", flush=True)
        else:
            print(f"{r['status']}: {r.get('reason', '')}", flush=True)
    if config.warm and config.device.type == "cpu" and config.isolate:
        add_warm_times(bench, config, results)
    add_ratios(results, bench.baseline)
    return results + skipped


# Untimed calls before the warm repeats: the first pays one-off costs (compile, first-touch page faults of the
# heap), the second finds the allocator and caches as a training loop's later steps do.
WARM_WARMUP = 2


def add_warm_times(bench: Benchmark, config: RunConfig, results: list[dict]) -> None:
    """``warm_median_ms``: each measured case again, all in this one process, after :data:`WARM_WARMUP` calls.

    The isolated (cold) measurement gives each method a fresh process: no heap pages kept from earlier calls,
    which costs a memory-hungry method its page faults on every call. A training loop runs the op thousands
    of times in one process; the warm time is that steady state. Both are reported (the ratios of each).
    """
    for i, r in enumerate([r for r in results if r["status"] == "ok"], 1):
        print(f"[warm {i}] {format_shape(r['shape'])} {r['mode']:<8} {r['method']:<26}", end=" ", flush=True)
        w = measure(bench, r["method"], tuple(r["shape"]), config.dtype, config.device, r["mode"], config.repeats,
                    WARM_WARMUP)  # fmt: skip
        if w["status"] == "ok":
            r.update(warm_median_ms=w["median_ms"], warm_p20_ms=w["p20_ms"], warm_p80_ms=w["p80_ms"])
            if r.get("flops"):
                r["warm_tflops"] = r["flops"] / (w["median_ms"] * 1e-3) / 1e12
                if r.get("matmul_rate_tflops"):
                    r["warm_matmul_fraction"] = r["warm_tflops"] / r["matmul_rate_tflops"]
            print(f"{w['median_ms']:10.2f} ms", flush=True)
        else:
            print(f"{w['status']}: {w.get('reason', '')}", flush=True)


def add_bandwidth(bench: Benchmark, r: dict, ceilings: dict | None) -> None:
    """GB/s against the bytes the op must move (``bench.bytes_moved``), and the fraction of copy bandwidth."""
    if r["status"] != "ok" or bench.bytes_moved is None:
        return
    nbytes = bench.bytes_moved(tuple(r["shape"]), DTYPES[r["dtype"]], r["mode"])
    r["bytes_moved"] = nbytes
    r["gbps"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
    if ceilings and ceilings.get("copy_gbps"):
        r["copy_bw_fraction"] = r["gbps"] / ceilings["copy_gbps"]


def add_throughput(bench: Benchmark, r: dict, ceilings: dict | None) -> None:
    """TFLOP/s from the FLOPs the method performs (``bench.flops``), and the fraction of the bf16 matmul rate."""
    if r["status"] != "ok" or bench.flops is None:
        return
    flops = bench.flops(r)
    if flops is None:
        return
    r["flops"] = flops
    r["tflops"] = flops / (r["median_ms"] * 1e-3) / 1e12
    cpu_rates = (ceilings or {}).get("cpu_matmul_gflops", {}).get(format_shape(r["shape"]))
    if cpu_rates:  # the harmonic mean of the passes' rates: the rate of running each pass once
        r["matmul_rate_tflops"] = len(cpu_rates) / sum(1e3 / g for g in cpu_rates.values())
        r["matmul_fraction"] = r["tflops"] / r["matmul_rate_tflops"]
    elif ceilings and ceilings.get("bf16_matmul_tflops"):
        r["matmul_fraction"] = r["tflops"] / ceilings["bf16_matmul_tflops"]


def add_ratios(results: list[dict], baseline: str) -> None:
    """``time_vs_baseline`` and ``mem_vs_baseline``: this method's value over the baseline's (lower is better)."""
    base = {
        (tuple(r["shape"]), r["mode"]): r for r in results if r["method"] == baseline and r["status"] == "ok"
    }
    for r in results:
        b = base.get((tuple(r["shape"]), r["mode"]))
        if r["status"] != "ok" or b is None:
            continue
        r["time_vs_baseline"] = r["median_ms"] / b["median_ms"]
        r["mem_vs_baseline"] = r["peak_extra_mib"] / b["peak_extra_mib"] if b["peak_extra_mib"] > 0 else None
        if r.get("warm_median_ms") is not None and b.get("warm_median_ms"):
            r["warm_time_vs_baseline"] = r["warm_median_ms"] / b["warm_median_ms"]


# ------------------------------------------------------------------------------ device and metadata


def device_slug(device: torch.device) -> str:
    """``cpu``, or the GPU name as a path-safe slug (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def measure_ceilings(device: torch.device, copy_bytes: int = _COPY_BYTES, matmul_size: int = _MATMUL_SIZE) -> dict:
    """Measured device ceilings: copy bandwidth (bytes read + written per second) and bf16 matmul rate.

    CUDA: do_bench; CPU (the GPU suite's dry run, tiny sizes): the median of a few perf_counter times."""

    def median_ms(fn) -> float:
        if device.type != "cuda":
            fn()
            return summarize_times([_timed_ms(fn) for _ in range(3)])["median_ms"]
        import triton.testing

        ms = triton.testing.do_bench(fn, quantiles=[0.5])
        return ms[0] if isinstance(ms, (list, tuple)) else ms

    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    del src, dst
    n = matmul_size
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    mm_ms = median_ms(lambda: a @ b)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        # a copy of B bytes reads B and writes B
        "copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        "copy_bytes": copy_bytes,
        # an n x n x n matmul is 2 n^3 floating-point operations
        "bf16_matmul_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        "matmul_size": n,
    }


# CPU copy of 256 MiB: far past the last-level cache of any CPU, so it measures DRAM, in well under a second.
_CPU_COPY_BYTES = 256 << 20


def measure_cpu_ceilings(bench: Benchmark, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> dict:
    """The CPU's measured copy bandwidth (bytes read + written per second) and, for a compute-bound op, the
    rate of each of its matmul passes at each shape (``bench.cpu_matmul_rates``), in this process."""
    src = torch.empty(_CPU_COPY_BYTES, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_ms = min(_timed_ms(lambda: dst.copy_(src)) for _ in range(5))
    del src, dst
    out = {"copy_gbps": 2 * _CPU_COPY_BYTES / (copy_ms * 1e-3) / 1e9, "copy_bytes": _CPU_COPY_BYTES,
           "torch_threads": torch.get_num_threads()}  # fmt: skip
    if bench.cpu_matmul_rates is not None:
        out["cpu_matmul_gflops"] = {format_shape(s): bench.cpu_matmul_rates(s, dtype) for s in shapes}
    return out


def matmul_gflops(a: torch.Tensor, b: torch.Tensor, repeats: int = 3) -> float:
    """GFLOP/s of ``a @ b`` (``2·M·K·N`` FLOPs), the best of ``repeats`` timed calls after one untimed."""
    (M, K), N = a.shape, b.shape[1]
    a @ b
    return 2.0 * M * K * N / (min(_timed_ms(lambda: a @ b) for _ in range(repeats)) * 1e-3) / 1e9


def _timed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The checkout's commit, or ``$RLHF_FAST_COMMIT`` where there is no git history (an installed wheel, or a
    copy of the working tree on a GPU machine: set it when launching there)."""
    commit = _git("rev-parse", "HEAD")
    return commit.strip() if commit else os.environ.get("RLHF_FAST_COMMIT") or None


def collect_metadata(device: torch.device, config: RunConfig, ceilings: dict | None) -> dict:
    commit = git_commit()
    # uncommitted changes to the measured code, if any (the numbers are of the working tree)
    dirty = [line[3:] for line in (_git("status", "--porcelain", "--", "rlhf_fast", "kernels") or "").splitlines()]
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m", module_name(config.module), *config.argv]),
        "git_commit": commit,
        "git_dirty_paths": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peers": {d: _version(d) for d in ("trl", "liger-kernel", "cut-cross-entropy", "transformers")},
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # other work on the machine skews CPU timings: the 1-minute load average before the run
        "load_average_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "dtype": str(config.dtype).removeprefix("torch."),
        "shapes": [list(s) for s in config.shapes],
        "modes": config.modes,
        "methods": config.methods,
        "repeats": config.repeats,
        "warmup": config.warmup,
        "ceilings": ceilings,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(
            cuda=torch.version.cuda,
            compute_capability=f"{props.major}.{props.minor}",
            device_memory_gib=props.total_memory / (1 << 30),
            memory_note="peak extra memory: torch.cuda.max_memory_allocated() - memory_allocated() before the call",
        )
    else:
        meta.update(
            isolated_subprocesses=config.isolate,
            memory_note="CPU memory is RSS-based: " + CPU_MEMORY_METHOD
            + (", one fresh subprocess per measurement" if config.isolate else ", all in one process"),
        )
    return meta


# ------------------------------------------------------------------------------------------- reports


def format_shape(shape) -> str:
    return "x".join(str(s) for s in shape)


def _fmt_load(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def _fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _fmt_tflops(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}" if x < 1 else f"{x:.1f}"


def table_rows(bench: Benchmark, results: list[dict], gpu: bool) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per measurement, skipped methods left out) shared by terminal and markdown."""
    has_bytes, has_flops = bench.bytes_moved is not None, bench.flops is not None
    warm = any(r.get("warm_median_ms") is not None for r in results)
    mm_pct = has_flops and (gpu or any(r.get("matmul_rate_tflops") for r in results))
    headers = ["shape", "mode", "method", *(h for h, _ in bench.extra_columns), "median ms (p20–p80)"]
    headers += ["warm ms"] if warm else []
    headers += (["GB/s"] + (["% copy BW"] if gpu else [])) if has_bytes else []
    headers += (["TFLOP/s"] + ((["% bf16 mm"] if gpu else ["% mm"]) if mm_pct else [])) if has_flops else []
    headers += ["peak extra MiB", f"time ÷ {bench.baseline}"] + ([f"warm ÷ {bench.baseline}"] if warm else [])
    headers += [f"mem ÷ {bench.baseline}", "note"]
    rows = []
    for r in results:
        if "mode" not in r:  # a method skipped as a whole
            continue
        method = bench.method(r["method"])
        notes = [method.note] if method.note else []
        extra = [cell(r) for _, cell in bench.extra_columns]
        if r["status"] == "ok":
            if method.first_call_note and r.get("first_call_s") is not None:
                notes.append(f"1st call {r['first_call_s']:.1f} s ({method.first_call_note})")
            cells = [f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}–{r['p80_ms']:.2f})"]
            if warm:
                cells += [f"{r['warm_median_ms']:.2f}" if r.get("warm_median_ms") is not None else "—"]
            if has_bytes:
                cells += [f"{r['gbps']:.1f}" if r.get("gbps") is not None else "—"]
                cells += [f"{100 * r['copy_bw_fraction']:.0f}%" if r.get("copy_bw_fraction") else "—"] if gpu else []
            if has_flops:
                cells += [_fmt_tflops(r.get("tflops"))]
                cells += [f"{100 * r['matmul_fraction']:.0f}%" if r.get("matmul_fraction") else "—"] if mm_pct else []
            cells += [f"{r['peak_extra_mib']:.1f}", _fmt_ratio(r.get("time_vs_baseline"))]
            cells += [_fmt_ratio(r.get("warm_time_vs_baseline"))] if warm else []
            cells += [_fmt_ratio(r.get("mem_vs_baseline"))]
        else:
            notes.append(f"{r['status']}: {r.get('reason', '')}")
            cells = ["—"] * (len(headers) - 4 - len(extra))
        rows.append([format_shape(r["shape"]), r["mode"], r["method"], *extra, *cells, "; ".join(notes)])
    return headers, rows


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table for the terminal."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def skipped_lines(results: list[dict]) -> list[str]:
    return [f"{r['method']}: {r['reason']}" for r in results if "mode" not in r]


def ceiling_text(c: dict) -> str:
    """The measured ceilings in one line: GPU (copy, bf16 matmul) or CPU (copy, the op's matmul passes)."""
    if "bf16_matmul_tflops" in c:
        return (f"copy {c['copy_gbps']:.0f} GB/s ({c['copy_bytes'] >> 20} MiB copy, read + write), "
                f"bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s ({c['matmul_size']}³)")  # fmt: skip
    text = f"copy {c['copy_gbps']:.1f} GB/s ({c['copy_bytes'] >> 20} MiB copy, read + write)"
    for shape, rates in c.get("cpu_matmul_gflops", {}).items():
        passes = ", ".join(f"{name} {g:.0f}" for name, g in rates.items())
        text += f"; fp32 matmul at {shape}, GFLOP/s: {passes}"
    return text + f" ({c.get('torch_threads', '?')} torch threads)"


def print_report(bench: Benchmark, results: list[dict], meta: dict) -> None:
    gpu = meta["device"] == "cuda"
    headers, rows = table_rows(bench, results, gpu)
    print()
    print(f"{bench.name} on {meta['device_name']}, {meta['dtype']}  ({meta['memory_note']})")
    if meta.get("ceilings"):
        print("ceilings (measured): " + ceiling_text(meta["ceilings"]))
    print(format_table(headers, rows))
    for line in skipped_lines(results):
        print(f"not run: {line}")
    for line in bench.summarize(results) if bench.summarize else []:
        print(line)


def write_markdown(bench: Benchmark, results: list[dict], meta: dict, path: Path, png_name: str) -> None:
    gpu = meta["device"] == "cuda"
    headers, rows = table_rows(bench, results, gpu)
    commit = (meta["git_commit"] or "unknown")[:12]
    if meta["git_dirty_paths"]:
        commit += " + uncommitted changes to " + ", ".join(meta["git_dirty_paths"])
    lines = [
        f"# {bench.name}: {meta['device_name']}",
        "",
        bench.title,
        "",
        f"- Device: {meta['device_name']} ({meta['device']}), {meta['dtype']}; "
        f"{meta['cpu_count']} CPU cores, {meta['torch_threads']} torch threads",
        f"- Software: python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["peers"].items() if v),
        f"- Commit: {commit}; date {meta['date']}",
        f"- Load average (1 min) before / after the run: {_fmt_load(meta.get('load_average_start'))} / "
        f"{_fmt_load(meta.get('load_average_end'))} (other work on the machine skews CPU timings)",
        f"- Command: `{meta['command']}`",
        f"- Timing: {'; '.join(sorted({r['timing_method'] for r in results if r.get('timing_method')}))}. "
        "Median of the repeats, (20th–80th percentile).",
        f"- Memory: {meta['memory_note']}.",
    ]
    if bench.bytes_moved is not None:
        lines.append(
            f"- GB/s: bytes the op must move / median time, {bench.bytes_formula}."
            + (" % copy BW: that over the measured device-to-device copy bandwidth." if gpu else "")
        )
    if bench.flops is not None:
        lines.append(
            f"- TFLOP/s: floating-point operations the method performs / median time, {bench.flops_formula}."
            + (" % bf16 mm: that over the measured bf16 matmul rate." if gpu else "")
        )
    lines.append(
        f"- Ratios: this method's time (memory) over {bench.baseline}'s, same shape and mode; below 1 is better."
    )
    if bench.grad_inputs:
        lines.append(
            "- Modes: forward (inputs require grad), backward alone (fresh untimed forward before each repeat), "
            "full = forward + backward; gradients via torch.autograd.grad."
        )
    else:
        lines.append("- Mode: forward only (the op has no gradient; inputs do not require grad).")
    if meta.get("ceilings"):
        lines.append("- Ceilings (measured): " + ceiling_text(meta["ceilings"]))
    if any(r.get("warm_median_ms") is not None for r in results):
        lines.append(
            "- Cold: each (method, shape, mode) in a fresh subprocess after one untimed call; warm: all of them "
            f"again in one process after {WARM_WARMUP} untimed calls each (a training loop's steady state)."
        )
    lines += ["", markdown_table(headers, rows), "", f"![{bench.name}]({png_name})", "", "## Methods", ""]
    lines += [f"- `{m.name}`: {m.description}" for m in bench.methods if m.name in meta["methods"]]
    if skipped_lines(results):
        lines += ["", "## Not run", ""] + [f"- {line}" for line in skipped_lines(results)]
    if bench.summarize:
        lines += ["", "## Summary", ""] + [f"- {line}" for line in bench.summarize(results)]
    path.write_text("\n".join(lines) + "\n")


def plot_results(bench: Benchmark, results: list[dict], meta: dict, path: Path) -> None:
    """One row per shape: time per mode and method (bars p20–p80) on the left, peak extra memory right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in ok)) or [()]
    methods = [m.name for m in bench.methods if any(r["method"] == m.name for r in ok)]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    by_key = {(tuple(r["shape"]), r["mode"], r["method"]): r for r in ok}
    colors = plt.get_cmap("tab10")
    color_of = {m.name: i for i, m in enumerate(bench.methods)}  # the same color for a method in every plot
    mem_label = "peak extra RSS (MiB)" if meta["device"] != "cuda" else "peak extra allocated (MiB)"
    fig, axes = plt.subplots(len(shapes), 2, figsize=(14, 4.6 * len(shapes)), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for row, shape in enumerate(shapes):
        for col, (key, ylabel) in enumerate((("median_ms", "time per call (ms)"), ("peak_extra_mib", mem_label))):
            ax = axes[row][col]
            for j, name in enumerate(methods):
                xs, ys, lo, hi = [], [], [], []
                for i, mode in enumerate(modes):
                    r = by_key.get((shape, mode, name))
                    if r is None:
                        continue
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(r[key])
                    lo.append(r[key] - r["p20_ms"] if key == "median_ms" else 0)
                    hi.append(r["p80_ms"] - r[key] if key == "median_ms" else 0)
                if not xs:
                    continue
                bars = ax.bar(xs, ys, width, color=colors(color_of[name] % 10), label=name,
                              yerr=[lo, hi] if key == "median_ms" else None, capsize=2)  # fmt: skip
                ax.bar_label(bars, fmt="%.0f" if max(ys) >= 100 else "%.2g", fontsize=7, rotation=90, padding=3)
            ax.set_xticks(range(len(modes)), modes)
            ax.set_ylabel(ylabel)
            ax.margins(y=0.2)
            ax.set_title(f"{format_shape(shape)} {meta['dtype']}: {ylabel}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9)
    fig.suptitle(f"{bench.name} on {meta['device_name']} (lower is better)", fontsize=12)
    fig.tight_layout(rect=(0, 0.06 if len(shapes) == 1 else 0.03, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_results(bench: Benchmark, results: list[dict], meta: dict, out_dir: Path) -> list[Path]:
    """``<out_dir>/<name>.json`` (everything), ``.md`` (table and notes) and ``.png`` (plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out_dir / f"{bench.name}.{ext}" for ext in ("json", "md", "png"))
    payload = {"benchmark": bench.name, "title": bench.title, "metadata": meta, "results": results}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    write_markdown(bench, results, meta, md_path, png_path.name)
    plot_results(bench, results, meta, png_path)
    return [json_path, md_path, png_path]


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
        print(_RESULT_MARKER + json.dumps(r), flush=True)
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
    config = RunConfig(
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
