"""``skip_ignored=True`` of the linear ops: compute nothing for rows whose label is ``ignore_index``.

RL and SFT score only response tokens, yet ``hidden`` holds a row for every position (prompt, tool output,
padding). With ``skip_ignored`` the linear ops gather the labeled rows (``index_select`` on ``hidden``, the
labels and any per-token input) *before* any matmul, run on those alone, and scatter the results back:
log-prob 0 and entropy 0 on the skipped rows, and no gradient to their hidden states (``index_select``'s
backward writes zeros there). The lm_head work then scales with the labeled rows, not with all of them.

When to use it: when a sizeable share of the rows is ignored (prompts, padding). The compaction costs a
gather of the labeled rows of ``hidden`` (``N_kept x H`` elements, once forward and once backward as a
scatter) and finding them (``nonzero``: on CUDA a device-to-host synchronisation); against the lm_head's
``2 * H * V`` FLOPs per row these are small, but with nearly every row labeled they buy nothing. When no row
is ignored the ops skip the gather (one ``nonzero`` is still paid).
"""

import torch


def check_skip_ignored(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"skip_ignored must be a bool, got {value!r}")
    return value


def labeled_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices (int64) of the entries of the flat ``labels`` that are not ``ignore_index``; ``None`` when
    every entry is labeled (nothing to skip)."""
    keep = (labels != ignore_index).nonzero().squeeze(1)
    return None if keep.numel() == labels.numel() else keep


def ignored_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Indices of the entries of the flat ``labels`` equal to ``ignore_index``."""
    return (labels == ignore_index).nonzero().squeeze(1)


def scatter_rows(values: torch.Tensor | None, keep: torch.Tensor, n: int) -> torch.Tensor | None:
    """``values`` (one per kept row) placed at ``keep`` in a zero ``[n]`` tensor; differentiable (the
    gradient of ``values`` is the incoming gradient at ``keep``)."""
    if values is None:
        return None
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_copy(0, keep, values)
