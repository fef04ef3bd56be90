"""Timing and memory of one case (CPU and CUDA), in-process or in a fresh worker process, and the derived
numbers (bandwidth, throughput, ratios to a baseline). Part of the harness (benchmarks/harness.py), whose
docstring says how time and memory are measured."""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import resource
import subprocess
import sys
import time
import traceback

import torch

from .spec import (DTYPES, MIB, RESULT_MARKER, WARM_WARMUP, _L2_FLUSH_BYTES, _WORKER_TIMEOUT_S, Benchmark, BenchRun,
                   Case, build_case, format_shape, module_cwd, module_name)  # fmt: skip

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


def error_text(exc: BaseException) -> str:
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
            result.update(status="skipped", reason=error_text(exc))
            return result
        inputs = bench.make_inputs(tuple(shape), dtype, device)
        case = build_case(fn, inputs, bench.grad_inputs, mode, method.overwrites_inputs)
        if device.type == "cuda":
            result.update(measure_cuda(case, device, repeats, warmup))
        else:
            result.update(measure_cpu(case, repeats, warmup))
    except Exception as exc:  # a method that fails (compile error, OOM) is reported, the run goes on
        traceback.print_exc(file=sys.stderr)
        result.update(status="error", reason=error_text(exc))
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
            if line.startswith(RESULT_MARKER):
                result = json.loads(line[len(RESULT_MARKER) :])
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


def planned_cases(bench: Benchmark, config: BenchRun) -> tuple[list[tuple], list[dict]]:
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


def run_benchmark(bench: Benchmark, config: BenchRun, ceilings: dict | None = None) -> list[dict]:
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



def add_warm_times(bench: Benchmark, config: BenchRun, results: list[dict]) -> None:
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


