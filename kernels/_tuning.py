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


# One row-streaming iteration moves 16 KiB: 8192 bf16/fp16 or 4096 fp32 elements. The forward does three
# block reductions per iteration (max, sum e, sum e*d), each a shared-memory round trip and a barrier;
# 16 KiB per iteration keeps that to ~19 iterations for a 151936-entry bf16 row. With 16 warps each
# thread loads 32 bytes (two 16-byte vector loads) and holds few registers (see the build check), so two
# CTAs per SM keep 64 KiB of loads in flight. Liger-Kernel's cross entropy streams in similar blocks.
_ROW_BYTES = 16384
# 16 bytes per thread and load: the widest global load (LDG.E.128).
_BYTES_PER_THREAD = 16
_MAX_WARPS = 16


def row_config(V: int, element_size: int) -> RowConfig:
    """Config for streaming rows of ``V`` elements of ``element_size`` bytes (forward and backward)."""
    block = min(_ROW_BYTES // element_size, triton.next_power_of_2(V))
    block = max(block, 16)
    threads = max(32, block * element_size // _BYTES_PER_THREAD)
    num_warps = max(1, min(_MAX_WARPS, threads // 32))
    return RowConfig(BLOCK_V=block, num_warps=num_warps)
