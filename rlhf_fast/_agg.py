"""Loss aggregation over per-token values ``L [B, T]`` and a response mask, shared by the RL ops.

The mask holds non-negative token weights (0 = not a token; a 0/1 or bool mask selects tokens): every
mode below is linear in ``mask * L``, and "tokens" of a row is ``sum_t(mask)``.

``agg`` modes (docs/API.md):

- ``"token-mean"``: ``sum(mask * L) / sum(mask)``
- ``"seq-mean-token-mean"``: mean over rows with at least one token of ``sum_t(mask * L) / sum_t(mask)``
- ``"seq-mean-token-sum"``: mean over rows with at least one token of ``sum_t(mask * L)``
- ``"seq-mean-token-sum-norm"``: ``sum(mask * L) / (B * T)``

Every denominator is the true sum of the weights, however small (a mask of weights 0.1 is a mean, not
a tenth of one). A batch (or, for ``"seq-mean-token-mean"``, a row) with no token at all aggregates to 0
(with zero gradient) rather than NaN: an all-zero denominator is replaced by 1, where the numerator's
weights are all 0 anyway.

``agg_norm`` (``norm`` here), when given, is the denominator in place of the batch's own count, for
losses summed over micro-batches or processes (each computes its share of one global mean):

- ``"token-mean"``: ``sum(mask * L) / agg_norm`` (agg_norm = the global token count: DAPO's token-mean
  across processes and gradient-accumulation steps; TRL's ``dapo`` / ``cispo`` normaliser)
- ``"seq-mean-token-mean"``: ``sum over rows of [sum_t(mask * L) / sum_t(mask)] / agg_norm``
  (agg_norm = the global number of sequences)
- ``"seq-mean-token-sum"``: ``sum(mask * L) / agg_norm`` (agg_norm = the global number of sequences)
- ``"seq-mean-token-sum-norm"``: ``sum(mask * L) / (B * agg_norm)`` (agg_norm replaces ``T``: Dr. GRPO's
  ``max_completion_length``)
"""

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def check_agg(agg) -> str:
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    return agg


def row_weights(mask: torch.Tensor, agg: str, norm: float | None = None) -> torch.Tensor:
    """``w [B, T]`` float32 with ``aggregate(L, mask, agg) == sum(w * L)``: the per-token weight of each mode.

    Computing the weights once (per-row token counts, number of non-empty rows) is what lets a fused
    kernel apply any mode token by token, and gives every mode's gradient as ``dloss/dL = w``.
    """
    m = mask.to(torch.float32)
    B, T = m.shape
    if norm is not None:
        if agg == "seq-mean-token-mean":
            return m / _nonzero(m.sum(1, keepdim=True)) / norm
        return m / (norm * B if agg == "seq-mean-token-sum-norm" else norm)
    if agg == "token-mean":
        return m / _nonzero(m.sum())
    if agg == "seq-mean-token-sum-norm":
        return m / float(max(B * T, 1))
    tokens = m.sum(1, keepdim=True)
    rows = (tokens > 0).sum().clamp(min=1).to(torch.float32)  # a count of rows: at least 1 is exact
    if agg == "seq-mean-token-mean":
        return m / _nonzero(tokens) / rows
    return m / rows  # seq-mean-token-sum


def _nonzero(total: torch.Tensor) -> torch.Tensor:
    """A sum of weights as a denominator: itself, however small, and 1 where it is 0 (no token: the weights
    it divides are all 0, so the result is 0 either way, without 0 / 0)."""
    return torch.where(total > 0, total, 1.0)


def aggregate(values: torch.Tensor, mask: torch.Tensor | None, agg: str, norm: float | None = None) -> torch.Tensor:
    """``agg`` of ``values [B, T]`` over ``mask [B, T]`` (``None``: all ones), as a float32 scalar."""
    if mask is None:
        mask = torch.ones(values.shape, dtype=torch.float32, device=values.device)
    w = row_weights(mask, agg, norm)
    # where(), not w * values alone: padding may hold inf/NaN (say, a ratio of garbage log-probs), and
    # 0 * inf would leak NaN into the loss. (The gradient of ``values`` there is 0 * 0 either way; callers
    # keep garbage out of ``values``' own inputs so that nothing upstream multiplies it by inf.)
    return torch.where(w != 0, w * values.to(torch.float32), 0.0).sum()
