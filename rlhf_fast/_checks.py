"""Input validation shared by the public ops: every failure is a ``ValueError`` naming the argument."""

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float_tensor(x, name: str, *, min_dim: int = 0) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")


def check_int_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")


def as_labels(labels, name: str = "labels") -> torch.Tensor:
    """Integer ``labels`` of any integer dtype (int8 ... int64, uint8 ...) as int64, the index dtype that
    ``gather`` needs (no copy for int64). Converted before any comparison with ``ignore_index``: a uint8
    tensor compared with -100 would compare with -100 wrapped to 156."""
    check_int_tensor(labels, name)
    return labels if labels.dtype == torch.int64 else labels.to(torch.int64)


def has_values(x: torch.Tensor) -> bool:
    """Whether ``x``'s values can be read for a check (not on the ``meta`` device, which has shapes only)."""
    return x.device.type != "meta"


def check_same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def check_shape(name: str, x: torch.Tensor, shape, what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(x.shape)}")


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


def check_labels_in_range(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """Labels must lie in ``[0, V)`` or equal ``ignore_index`` (one reduction, one host sync)."""
    if not has_values(labels):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if labels.numel() and bool(bad.any()):
        value = labels[bad].flatten()[0].item()
        raise ValueError(f"labels must be in [0, {V}) or equal ignore_index={ignore_index}, found {value}")


def check_mask(mask, ref: torch.Tensor, ref_name: str, name: str = "mask") -> None:
    """A response mask: a bool, integer or float tensor of ``ref``'s shape and device.

    One semantics for every op: each entry is the token's non-negative weight (``0`` = not a token, a
    bool or 0/1 mask = plain token selection), so the masked mean is ``sum(m * L) / sum(m)``. Negative,
    NaN or infinite entries raise ``ValueError`` (one reduction, one host sync; skipped for bool and
    unsigned dtypes, which cannot hold them, and on the meta device).
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise ValueError(f"{name} must be a bool, integer or float tensor, got {mask.dtype}")
    check_shape(name, mask, ref.shape, f"the shape of {ref_name}")
    check_same_device(name, mask, ref_name, ref)
    if mask.dtype == torch.bool or not mask.is_signed() or not has_values(mask) or mask.numel() == 0:
        return
    bad = ~(mask >= 0) if not mask.dtype.is_floating_point else ~(mask >= 0) | (mask == float("inf"))
    if bool(bad.any()):
        value = mask[bad].flatten()[0].item()
        raise ValueError(f"{name} must hold finite weights >= 0 (0 = not a token), found {value}")
