"""Gumbel-max sampling from counter-based noise: one read of the ``[B, V]`` logits, one token per row.

Row ``b`` draws ``argmax_v(logits[b, v] / T + g(key_b, v))``, an exact sample of ``softmax(logits / T)``,
where ``g`` is standard Gumbel noise made from a splitmix64 hash of ``key_b + (v + 1) * golden`` (the top
24 bits, centred: a float32-exact uniform ``u`` in (0, 1), then ``-log(-log(u))``). ``key_b`` already mixes
the row's seed and the response position (``rlhf_fast.train.rollout``), so the draw depends on nothing
else: not on the other rows, the batch size or the number of processes. The integer stream is the one
``rlhf_fast.train.rollout.gumbel_noise`` forms with torch ops, bit for bit; the two ``log``s may differ in
the last bits, which only matters between tokens whose perturbed logits tie to float32 precision.

The torch path forms the noise with some fifteen elementwise passes over ``[B, V]`` int64 temporaries; here
each program streams one row once, keeping the running maximum per lane (the first index on ties, like
``torch.argmax``).
"""

import itertools

import torch
import triton
import triton.language as tl

from ._build import TL_DTYPE, kernel_build
from ._common import inverse_parts
from ._softmax import scale_by_inverse
from ._tuning import row_config

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _mix64(z):
    """splitmix64's finaliser on uint64 (wrapping multiplications, logical shifts)."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.heuristics({"TRUNCATED": lambda args: args["tau_ptr"] is not None})
@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr,  # [B, V], rows `stride_row` elements apart
    keys_ptr,  # [B] int64: each row's mixed (seed, position) key
    out_ptr,  # [B] int64: the sampled token of each row
    tau_ptr,  # [B] float32 kept-set thresholds (truncated sampling, kernels/truncation.py), or None
    V,
    stride_row,
    temperature,
    inv_t_hi,  # 1 / T in two parts: the threshold compares z as kernels/truncation.py scaled it
    inv_t_lo,
    BLOCK: tl.constexpr,
    TRUNCATED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    key = tl.load(keys_ptr + row).to(tl.uint64, bitcast=True)
    cols = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_at = tl.zeros([BLOCK], dtype=tl.int32)
    if TRUNCATED:
        tau = tl.load(tau_ptr + row)
    for start in range(0, V, BLOCK):
        v = start + cols
        live = v < V
        x = tl.load(logits_ptr + row * stride_row + v, mask=live, other=float("-inf")).to(tl.float32)
        z = _mix64(key + (v + 1).to(tl.uint64) * 0x9E3779B97F4A7C15)
        u = (((z >> 40) & 0xFFFFFF).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        score = x / temperature - tl.log(-tl.log(u))
        score = tl.where(live, score, float("-inf"))
        if TRUNCATED:  # tokens outside the kept set are never drawn
            score = tl.where(scale_by_inverse(x, inv_t_hi, inv_t_lo) < tau, float("-inf"), score)
        better = score > best  # strictly: each lane keeps its first maximum
        best = tl.where(better, score, best)
        best_at = tl.where(better, v, best_at)
    top = tl.max(best, axis=0)
    token = tl.min(tl.where(best == top, best_at, V), axis=0)  # the first maximum over the lanes
    tl.store(out_ptr + row, tl.minimum(token, V - 1).to(tl.int64))


# ------------------------------------------------------------------------------------------- launchers


def gumbel_argmax(logits: torch.Tensor, keys: torch.Tensor, temperature: float,
                  tau: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``[B]`` int64 tokens drawn from ``softmax(logits / temperature)`` for ``logits [B, V]`` (float32,
    bf16 or fp16, rows contiguous) with the per-row int64 ``keys [B]``; with ``tau`` (float32 ``[B]``), from
    the tokens with ``logits / T >= tau`` only."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    cfg = row_config(V, logits.element_size())
    _gumbel_argmax_kernel[(B,)](
        logits, keys.to(device=logits.device, dtype=torch.int64).contiguous(), out, tau,
        V, logits.stride(0), float(temperature), *inverse_parts(temperature),
        BLOCK=cfg.BLOCK_V, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------- ahead-of-time build specs


def build_specs():
    """One build per logits dtype and truncation (a ``tau``, or none) at a 152k vocabulary (the row's block and
    warps from ``row_config``)."""
    specs = []
    for (torch_dtype, tl_dtype), truncated in itertools.product(TL_DTYPE.items(), (False, True)):
        cfg = row_config(151936, torch.empty((), dtype=torch_dtype).element_size())
        constexprs = {"BLOCK": cfg.BLOCK_V, "TRUNCATED": truncated}
        types = {"logits_ptr": f"*{tl_dtype}", "keys_ptr": "*i64", "out_ptr": "*i64"}
        specs.append(kernel_build(_gumbel_argmax_kernel, constexprs, types, sizes=("V",), num_warps=cfg.num_warps,
                                  absent=() if truncated else ("tau_ptr",), streams_rows=True,
                                  label=f"{tl_dtype} BLOCK={cfg.BLOCK_V}" + (" truncated" if truncated else "")))  # fmt: skip
    return specs
