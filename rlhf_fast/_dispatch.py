"""The ``impl`` switch every op shares: ``"auto" | "triton" | "torch"``.

Each op registers its two implementations once::

    @register("logprobs", "torch")
    def _logprobs_torch(...): ...

and its public function calls ``dispatch("logprobs", impl, logits)(...)``. ``auto`` picks Triton for CUDA
tensors and PyTorch otherwise; ``triton`` on CPU tensors needs the Triton interpreter
(``TRITON_INTERPRET=1`` set before ``rlhf_fast`` is imported).
"""

from typing import Callable

import torch

IMPLS = ("auto", "triton", "torch")

_REGISTRY: dict[str, dict[str, Callable]] = {}


def register(op: str, impl: str) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` as implementation ``impl`` ("triton" or "torch") of ``op``."""
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be 'triton' or 'torch' to register, got {impl!r}")

    def decorator(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[impl] = fn
        return fn

    return decorator


def triton_status() -> tuple[bool, bool, str]:
    """``(available, interpreted, reason)``: can the Triton kernels run, and are they interpreted?"""
    try:
        import triton  # noqa: F401

        from . import kernels
    except ImportError as exc:  # no triton on this platform
        return False, False, f"Triton cannot be imported ({exc}); install triton>=3.2 (Linux)"
    return True, kernels.INTERPRET, ""


def resolve(impl: str, device: torch.device) -> str:
    """The concrete implementation ("triton" or "torch") that ``impl`` means for tensors on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    available, interpreted, reason = triton_status()
    if impl == "auto":
        return "triton" if device.type == "cuda" and available else "torch"
    if impl == "torch":
        return "torch"
    if not available:
        raise ValueError(f"impl='triton' is not available: {reason}")
    if device.type != "cuda" and not interpreted:
        raise ValueError(
            f"impl='triton' got tensors on {device}: the Triton kernels run on CUDA devices, or on CPU under "
            "the Triton interpreter (set TRITON_INTERPRET=1 before importing rlhf_fast); use impl='torch' "
            "or impl='auto' for CPU tensors"
        )
    return "triton"


def dispatch(op: str, impl: str, device: torch.device) -> Callable:
    """The registered implementation of ``op`` that ``impl`` selects for tensors on ``device``."""
    return _REGISTRY[op][resolve(impl, device)]
