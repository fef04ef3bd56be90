"""Gradient accumulation of the chunked PyTorch linear ops (``logits = hidden @ weight.T + bias``, by chunks of
rows): given a chunk's ``dL/dlogits`` (float32 ``[rows, V]``), ``d_hidden[rows] = g @ weight``,
``d_weight += g.T @ hidden[rows]`` and ``d_bias += sum_rows g``, with the weight and bias gradients
accumulated in float32 and cast to their dtypes once at the end."""

import torch


class LinearGrads:
    def __init__(self, hidden, weight, bias, need_hidden: bool, need_weight: bool, need_bias: bool):
        self.weight_dtype = weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype
        self.d_hidden = torch.empty_like(hidden) if need_hidden else None
        self.d_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        self.d_b32 = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None

    def add(self, rows: slice, g: torch.Tensor, h32: torch.Tensor, w32: torch.Tensor, scale: float | None = None):
        """Accumulate a chunk's ``g = dL/dlogits`` (``h32``: its float32 hidden rows, ``w32``: the float32
        weight); ``scale`` multiplies ``g`` first (in place) when given."""
        if scale is not None:
            g = g.mul_(scale)
        if self.d_hidden is not None:
            self.d_hidden[rows] = g @ w32
        if self.d_w32 is not None:
            self.d_w32.addmm_(g.t(), h32)
        if self.d_b32 is not None:
            self.d_b32 += g.sum(0)

    def result(self):
        """``(d_hidden, d_weight, d_bias)`` in the inputs' dtypes (``None`` where not needed)."""
        d_weight = None if self.d_w32 is None else self.d_w32.to(self.weight_dtype)
        d_bias = None if self.d_b32 is None else self.d_b32.to(self.bias_dtype)
        return self.d_hidden, d_weight, d_bias
