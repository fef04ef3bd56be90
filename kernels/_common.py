"""Helpers shared by the launchers."""

import torch

from . import INTERPRET


def interpreter_safe_output(out: torch.Tensor) -> torch.Tensor:
    """The buffer a kernel should store ``out``'s values into.

    The Triton interpreter (3.x) converts float32 to bfloat16 by truncation instead of round-to-nearest,
    which doubles the rounding error of bfloat16 gradients. Under the interpreter a bfloat16 output is
    therefore computed into a float32 buffer that the launcher copies (rounding correctly) into ``out``.
    Compiled kernels round to nearest and store into ``out`` directly.
    """
    if INTERPRET and out.dtype == torch.bfloat16:
        return torch.empty(out.shape, dtype=torch.float32, device=out.device)
    return out


def inverse_parts(temperature: float) -> tuple[float, float]:
    """``(hi, lo)``: float32 numbers with ``hi + lo = 1 / temperature`` to ~2^-48 (kernels scale by both)."""
    inverse = 1.0 / temperature  # float64
    hi = float(torch.tensor(inverse, dtype=torch.float32))
    return hi, float(torch.tensor(inverse - hi, dtype=torch.float32))
