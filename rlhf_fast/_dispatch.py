"""The ``impl`` switch every op shares: ``"auto" | "triton" | "torch"``.

Each public function decides once, ``impl = resolve(impl, x.device)``, and hands the answer
(``"triton"`` or ``"torch"``) to its ``autograd.Function``, which branches on it in one place. ``auto``
picks Triton for CUDA tensors and PyTorch otherwise; ``triton`` on CPU tensors needs the Triton
interpreter (``TRITON_INTERPRET=1`` set before ``rlhf_fast`` is imported).
"""

import torch

IMPLS = ("auto", "triton", "torch")


def triton_status() -> tuple[bool, bool, str]:
    """``(available, interpreted, reason)``: can the Triton kernels run, and are they interpreted?"""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # no triton on this platform
        return False, False, f"Triton cannot be imported ({exc}); install triton>=3.6 (Linux)"
    try:
        from .kernels import INTERPRET
    except ImportError as exc:  # Triton imports, our kernel package does not: a broken install, not Triton
        return False, False, f"rlhf_fast.kernels cannot be imported ({exc}); reinstall rlhf_fast"
    return True, INTERPRET, ""


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
