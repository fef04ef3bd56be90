"""Where and how a trainer runs: the seeds (``seed_everything``, and ``seed_for`` for the loop's own random
streams), the device, autocast and the attention implementation, and peak memory (CUDA allocator, or the
process's resident set on CPU)."""

import contextlib
import importlib.util
import random

import numpy as np
import torch

PRECISIONS = ("auto", "fp32", "bf16")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seeding takes 32 bits only
    torch.manual_seed(seed)  # also seeds all CUDA devices


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when there is a GPU, else the CPU; any other name is checked and returned."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"device {name!r} is not a device name (use 'auto', 'cpu', 'cuda', 'cuda:1')") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but this torch sees no CUDA device")
    return device


def autocast_context(device: str | torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """The mixed precision of a trainer's forward passes and losses:

    - ``"bf16"``: ``torch.autocast(device.type, torch.bfloat16)`` on any device, the CPU included, so that a
      CPU run (CI) takes the code path a GPU run takes. The weights, their gradients and the optimizer state
      stay float32; matmuls and linear layers run in bf16 with float32 accumulation; rlhf_fast's ops keep
      logits statistics (log-sum-exp, log-probs, entropy) and losses in float32.
    - ``"fp32"``: a context that does nothing: everything in float32.
    - ``"auto"``: ``"bf16"`` on CUDA, ``"fp32"`` elsewhere (CPU bf16 autocast is slower than float32 there).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pick_attn_implementation(device: str | torch.device) -> str:
    """``"flash_attention_2"`` on CUDA when ``flash_attn`` is installed (it needs bf16/fp16 weights),
    else ``"sdpa"`` (torch's fused attention), or ``"eager"`` where torch has no SDPA."""
    device = torch.device(device)
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return "sdpa"
    return "eager"



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
