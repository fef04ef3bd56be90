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


@dataclass(frozen=True)
class MatmulConfig:
    """Tiles of a kernel that computes ``[BLOCK_N, BLOCK_V]`` logit tiles as ``hidden x weight^T``."""

    BLOCK_N: int
    BLOCK_V: int
    BLOCK_H: int
    num_warps: int
    num_stages: int


def matmul_config(dtype, backward: bool = False) -> MatmulConfig:
    """Tiles for the fused linear kernels, by operand dtype and direction.

    bf16/fp16: 128-row tiles with 64-deep K steps and 8 warps (two warpgroups) is a shape Triton lowers
    to Hopper wgmma (HGMMA in the SASS, see the build check); 3 stages of pipelining fit in shared memory.
    The forward keeps its [128, BLOCK_V] float32 tile alive through the online-softmax epilogue (max,
    exp, two sums and the label pick), so its tile is 128 x 64: at 128 x 128 it needed all 255 registers
    and spilled on sm_80. The backward's epilogue is elementwise, so it affords 128 x 128.
    float32 operands use IEEE FMA products (no tensor cores): small tiles keep the register count down.
    """
    import torch

    if dtype == torch.float32:
        return MatmulConfig(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, num_warps=4, num_stages=2)
    return MatmulConfig(BLOCK_N=128, BLOCK_V=128 if backward else 64, BLOCK_H=64, num_warps=8, num_stages=3)


@dataclass(frozen=True)
class ScanConfig:
    """Launch configuration of a kernel that scans one ``[T]`` row per program in tiles of ``BLOCK_T``."""

    BLOCK_T: int
    num_warps: int


def gae_config(T: int) -> ScanConfig:
    """Tile of the GAE reverse scan (kernels/gae.py).

    A row is read once (rewards, values, mask) and written once (advantages, returns), so the kernel is
    memory bound like the row-streaming ones; its extra cost is a log-depth scan of five floats per
    tile. 1024 positions over 4 warps is 8 elements per thread: two 16-byte loads of float32, one of
    bf16/fp16, and a whole 2048-token response in two tiles. A shorter row gets one tile of its own
    (power-of-two) size, at least 16, with one warp per 256 positions (8 elements per thread from 256
    positions up; shorter rows take one warp).
    """
    block = max(16, min(1024, triton.next_power_of_2(T)))
    return ScanConfig(BLOCK_T=block, num_warps=max(1, min(4, block // 256)))


@dataclass(frozen=True)
class PairConfig:
    """Launch configuration of the pairwise preference kernel: one program looping over ``[N]`` pairs."""

    BLOCK: int
    num_warps: int


def pair_config(N: int) -> PairConfig:
    """Block of the pairwise sigmoid loss (kernels/preference.py).

    A preference batch holds hundreds to a few thousand pairs, 2-3 numbers each: the kernel is one
    program that loops over blocks of pairs, so its sums (loss, accuracy, margin) need no second pass and
    are deterministic. 1024 pairs over 4 warps is 8 per thread: two 16-byte loads of float32, one of
    bf16/fp16. A smaller batch gets one block of its own (power-of-two) size, at least 16, one warp per
    256 pairs.
    """
    block = max(16, min(1024, triton.next_power_of_2(max(N, 1))))
    return PairConfig(BLOCK=block, num_warps=max(1, min(4, block // 256)))


@dataclass(frozen=True)
class ThresholdConfig:
    """Launch configuration of the truncation threshold kernel (kernels/truncation.py): one row per program."""

    BLOCK_V: int
    PROBES: int
    num_warps: int


def threshold_config(V: int, element_size: int) -> ThresholdConfig:
    """Block and probe count of the threshold search (not measured on a GPU yet).

    Each pass compares every entry of a block with ``PROBES`` keys, a ``[PROBES, BLOCK_V]`` tile: 8 probes
    over 2048 bf16/fp16 entries with 8 warps (or 1024 float32 ones with 4) is 8 entries and 64
    compare-selects per thread per block, few enough to stay in registers, and each thread loads 16 (32)
    bytes: vector loads. 8 probes resolve 3 bits per pass, 11 passes for the 2^32 keys; more
    probes mean fewer passes over the (L2-resident) row but proportionally more compares per pass.
    """
    block = max(16, min(8192 // element_size // 2, triton.next_power_of_2(V)))
    return ThresholdConfig(BLOCK_V=block, PROBES=8, num_warps=max(1, min(8, block // 256)))
