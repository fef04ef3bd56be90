"""The machine a benchmark ran on: device slug, measured ceilings (copy bandwidth, matmul rate), versions,
CPU model, git commit: the metadata next to every result. Part of the harness (benchmarks/harness.py)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import time

import torch

from .measure import CPU_MEMORY_METHOD, summarize_times
from .spec import _COPY_BYTES, _MATMUL_SIZE, REPO_ROOT, Benchmark, BenchRun, format_shape, module_name

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


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
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


def collect_metadata(device: torch.device, config: BenchRun, ceilings: dict | None) -> dict:
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
        "triton": package_version("triton"),
        "peers": {d: package_version(d) for d in ("trl", "liger-kernel", "cut-cross-entropy", "transformers")},
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # other work on the machine skews CPU timings: the 1-minute load average before the run
        "load_average_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
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


