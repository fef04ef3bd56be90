"""Block sizes and warp counts for every kernel, in one place.

Nothing here has been measured on a GPU yet (no GPU was lent to the session that wrote it); the values
come from the reasoning next to each one and from the Hopper build check (no spills, vectorized loads).
When a value is tuned on a card, write the card and the measurement next to it.
"""

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class RowConfig:
    """Launch configuration of a kernel that streams one row of a ``[N, V]`` tensor per program."""

    BLOCK_V: int
    num_warps: int


# One row-streaming iteration should move 8 KiB: 4096 bf16/fp16 or 2048 fp32 elements. With 8 warps that
# is 32 bytes per thread (two 16-byte vector loads), few enough registers for several CTAs per SM to keep
# memory requests in flight, and large enough that the two block reductions per iteration stay cheap next
# to the loads.
_ROW_BYTES = 8192
# 16 bytes per thread and load: the widest global load (LDG.E.128).
_BYTES_PER_THREAD = 16
_MAX_WARPS = 8


def row_config(V: int, element_size: int) -> RowConfig:
    """Config for streaming rows of ``V`` elements of ``element_size`` bytes (forward and backward)."""
    block = min(_ROW_BYTES // element_size, triton.next_power_of_2(V))
    block = max(block, 16)
    threads = max(32, block * element_size // _BYTES_PER_THREAD)
    num_warps = max(1, min(_MAX_WARPS, threads // 32))
    return RowConfig(BLOCK_V=block, num_warps=num_warps)
