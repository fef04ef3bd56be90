"""Run bookkeeping the trainers share: peak memory (CUDA allocator, or the process's resident set on CPU)
and atomic JSON summaries."""

import json
import os
from pathlib import Path

import torch

def seed_for(seed: int, *stream: int) -> int:
    """The seed of one random stream of a run (a data order, a minibatch order): ``seed * 100003`` plus the
    stream's coordinates read as digits in base 1009 (``seed_for(s, epoch)``, ``seed_for(s, step, epoch)``).

    Why: every random choice of a loop is a function of the run's seed and of where the loop is, never of a
    generator's history, so a resumed run and a run on any number of processes draw the same; and the primes
    keep the streams apart: two coordinates give distinct seeds while the later one stays below 1009 (PPO's
    epochs per step) and the stream below 100003 (the steps or epochs of a run). Sampling has its own
    counter-based keys (``rollout.row_seeds``), best-of-n's round order its own seeds (``round_prompts``).
    """
    offset = 0
    for coordinate in stream:
        offset = offset * 1009 + coordinate
    return seed * 100003 + offset


_MIB = 1 << 20
_rss_at_reset: dict[str, int] = {}


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a peak-memory window: CUDA's allocator peak, or on Linux the kernel's peak-RSS mark
    (``/proc/self/clear_refs``; where that cannot be reset the window is the process's lifetime)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _rss_at_reset["cuda"] = torch.cuda.memory_allocated(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    _rss_at_reset["cpu"] = _status_bytes("VmRSS") or 0


def peak_memory_mib(device: torch.device) -> dict:
    """``{"peak_mib", "peak_extra_mib", "kind"}`` since ``reset_peak_memory``: the peak, and the peak above
    what was in use at the reset (models, optimizer state created before it count in the first only)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        kind = "torch.cuda.max_memory_allocated"
        base = _rss_at_reset.get("cuda", 0)
    else:
        peak = _status_bytes("VmHWM") or 0
        kind = "peak resident set size (VmHWM)"
        base = _rss_at_reset.get("cpu", 0)
    return {"peak_mib": peak / _MIB, "peak_extra_mib": max(peak - base, 0) / _MIB, "kind": kind}


def write_json(path, data) -> None:
    """Write ``data`` as indented JSON atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)
