"""The autocast policy of every op (one rule, both implementations, CPU and CUDA).

- The linear ops (``rf.linear_logprobs`` and everything built on it, ``rf.linear_dpo_loss``) treat their
  matmul operands as ``F.linear`` does under ``torch.autocast``: ``hidden``, ``weight`` and ``bias`` are
  cast to the autocast dtype (bf16 or fp16) before the op, the products accumulate in float32, and the
  logits and every softmax statistic stay float32: the logits are never rounded to the autocast dtype.
  The casts are ordinary autograd ops, so each input's gradient comes back in its own dtype (an fp32
  ``weight`` gets an fp32 gradient), with the autocast dtype's precision, as through ``F.linear``.
- Every other op computes in float32 whatever autocast says (inputs are upcast inside the op).

Inside every op, forward and backward, autocast is switched off (``no_autocast``): otherwise the PyTorch
implementations' own float32 matmuls (the linear ops' chunk logits, GAE's triangular products) would be
autocast to bf16 behind their back.
"""

import contextlib
import functools

import torch

_DEVICE_TYPES = ("cpu", "cuda")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives matmuls on ``device``'s type right now, or ``None`` when autocast is off."""
    if device.type not in _DEVICE_TYPES or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


@contextlib.contextmanager
def no_autocast():
    """Autocast off for the device types where it is on (a no-op, and no warning, where it is off)."""
    with contextlib.ExitStack() as stack:
        for device_type in _DEVICE_TYPES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def float32_op(fn):
    """Decorator: run ``fn`` (an op, or an autograd ``forward``/``backward``) with autocast off."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return fn(*args, **kwargs)
        with no_autocast():
            return fn(*args, **kwargs)

    return wrapper


def cast_matmul_operands(device: torch.device, *tensors):
    """``tensors`` (``None`` kept) cast to the autocast dtype of ``device`` when autocast is on, as
    ``F.linear`` casts its input, weight and bias; unchanged otherwise."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return tensors
    return tuple(None if t is None else t.to(dtype) for t in tensors)
