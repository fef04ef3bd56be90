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


def label_term(labels: torch.Tensor, grad_logp: torch.Tensor, label_grad: torch.Tensor | None, V: int,
               temperature: float, ignore_index: int | None = None):  # fmt: skip
    """The backward kernels add ``grad_logp`` at each row's label (the ``[v == y]`` term of ``d logp_y / dz``);
    ``label_grad [N]`` (the PyTorch twins' argument of that name) asks for another value there: a vocabulary
    shard passes 0 for the rows whose label another rank owns (rlhf_fast/_vocab_parallel.py).

    Returns ``(kernel_labels, extra)``. A row whose ``label_grad`` differs from its ``grad_logp`` (and whose
    label is not ``ignore_index``: such rows take no label term) gets the label ``V``, which no column
    matches, so the kernel adds no label term to it; ``extra = (columns, values)`` is what the launcher then
    adds to each row (``index_put_``, accumulating, in the gradient's dtype): ``label_grad / T`` at those rows'
    labels, 0 on the others. So the rows with ``label_grad == grad_logp``, and those with ``label_grad`` 0 (a
    shard's rows owned elsewhere), get bitwise the gradient the kernel writes without ``label_grad`` (with
    their label, or with ``V``), up to the sign of a zero; other values are rounded once more than the
    kernel's own label term. ``label_grad`` ``None``: ``(labels, None)``, the kernel alone."""
    if label_grad is None:
        return labels, None
    moved = label_grad != grad_logp
    if ignore_index is not None:
        moved &= labels != ignore_index
    kernel_labels = labels.masked_fill(moved, V)
    at = labels.masked_fill(~moved, 0)  # a valid column on every row (the value added there is 0)
    return kernel_labels, (at, torch.where(moved, label_grad, 0.0) / temperature)
