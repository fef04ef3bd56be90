"""Each row's kept-set threshold of truncated sampling (top-k / top-p / min-p), without sorting the vocabulary.

Semantics: rlhf_fast/truncation.py. Every rule keeps the tokens whose ``z = x / T`` is at least some value,
so a row's kept set is ``{v : z_v >= tau}``; this kernel finds ``tau`` (``-inf``: nothing cut) and the
launchers of the row-softmax kernels (kernels/logprobs.py, kernels/sampling.py) then treat ``z < tau`` as
``-inf``.

Method, per row (one program): float32 values map to int32 keys that order like the floats
(``_float_key``); each rule is "the smallest key ``kappa`` with ``F(kappa) < target``", for a ``F``
non-increasing in ``kappa``:

- top-k: ``F(kappa)`` = number of entries with key ``> kappa``, target ``k``: a token is kept iff fewer than
  ``k`` entries are strictly larger (ties at the k-th value kept);
- top-p over the set ``S = {key >= floor}``: ``F(kappa)`` = sum of ``e^(z - max)`` over ``S`` with key
  ``> kappa``, target ``p * F(floor - 1)``: a token is kept iff the mass strictly above it is ``< p``;
- min-p is a value: ``max z + log(min_p)``.

``_bisect`` finds ``kappa`` exactly by a ``PROBES``-way search over the integer keys: each pass over the row
evaluates ``F`` at ``PROBES`` evenly spaced keys at once and keeps the bracket ``(lo, hi]``, so the 2^32 keys
take at most ``ceil(32 / log2(PROBES))`` passes (11 with 8 probes), each a read of the row (from L2 at real
sizes: one row is V * 2 bytes). Float sums of non-negative terms are monotone in each term, so ``F`` stays
non-increasing in float32 and the bracket is always valid. Nothing is sorted and nothing but the row is
read; the threshold costs ``2 + passes`` reads of the row per active rule.
"""

import torch
import triton
import triton.language as tl

from ._build import TL_DTYPE, kernel_build
from ._common import inverse_parts
from ._softmax import scale_by_inverse
from ._tuning import threshold_config

# Key of -inf (bits 0xFF800000, magnitude bits flipped): the smallest key of a non-NaN float32.
NEG_INF_KEY = tl.constexpr(-2139095041)

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _float_key(z):
    """int32 key that orders like float32 ``z`` (non-NaN): negative floats get their magnitude bits flipped.
    ``-0.0`` maps to ``+0.0``'s key 0 (the two are equal values: a tie, not two values)."""
    bits = tl.where(z == 0.0, 0, z.to(tl.int32, bitcast=True))
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _key_float(key):
    """The float32 whose ``_float_key`` is ``key`` (inverse of ``_float_key`` on int32 keys)."""
    k32 = key.to(tl.int32)
    return tl.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _load_z(row_ptr, offs, V, inv_t_hi, inv_t_lo):
    return scale_by_inverse(tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32), inv_t_hi, inv_t_lo)


@triton.jit
def _bisect(row_ptr, V, inv_t_hi, inv_t_lo, m, lo, hi, floor_key, target, MASS: tl.constexpr, BLOCK_V: tl.constexpr,
            PROBES: tl.constexpr):  # fmt: skip
    """Smallest int64 key ``kappa`` in ``(lo, hi]`` with ``F(kappa) < target``, where ``F(kappa)`` sums, over
    the row's entries with key ``> kappa`` and ``>= floor_key``, 1 (``MASS`` False: a count) or
    ``e^(z - m)``. Needs ``F(lo) >= target > F(hi)``."""
    cols = tl.arange(0, BLOCK_V)
    j = (tl.arange(0, PROBES) + 1).to(tl.int64)
    while hi - lo > 1:
        step = (hi - lo + PROBES - 1) // PROBES
        probes = tl.minimum(lo + j * step, hi)  # the last probe is hi: F(hi) < target is known
        f = tl.zeros([PROBES], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = _load_z(row_ptr, offs, V, inv_t_hi, inv_t_lo)
            key = _float_key(z)
            live = (offs < V) & (key >= floor_key)
            if MASS:
                w = tl.where(live, tl.exp(z - m), 0.0)
            else:
                w = tl.where(live, 1.0, 0.0)
            above = key.to(tl.int64)[None, :] > probes[:, None]
            f += tl.sum(tl.where(above, w[None, :], 0.0), axis=1)
        lo = tl.max(tl.where(f >= target, probes, lo), axis=0)
        hi = tl.min(tl.where(f < target, probes, hi), axis=0)
    return hi


@triton.jit
def _row_threshold_kernel(
    # pointers
    logits_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    tau_ptr,
    # strides of the [B, T, V] logits (the last stride is 1)
    stride_logits_b,
    stride_logits_t,
    # sizes
    T,
    V,
    # hyperparameters
    inv_t_hi,
    inv_t_lo,
    # meta-parameters
    HF: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PROBES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    row_ptr = logits_ptr + b * stride_logits_b + t * stride_logits_t
    k = tl.load(top_k_ptr + row)
    p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    cols = tl.arange(0, BLOCK_V)

    m = -float("inf")
    for start in range(0, V, BLOCK_V):
        m = tl.maximum(m, tl.max(_load_z(row_ptr, start + cols, V, inv_t_hi, inv_t_lo), axis=0))
    neg_inf_key = tl.full([], NEG_INF_KEY, dtype=tl.int64)
    max_key = _float_key(m).to(tl.int64)
    # min-p: p_v >= min_p * p_max  <=>  z_v >= m + log(min_p)
    log_min_p = tl.log(tl.where(min_p > 0.0, min_p, 1.0))  # no log(0) where min-p is off
    min_key = _float_key(tl.where(min_p > 0.0, m + log_min_p, -float("inf"))).to(tl.int64)
    k_key = neg_inf_key
    if k > 0:
        k_key = _bisect(row_ptr, V, inv_t_hi, inv_t_lo, m, neg_inf_key - 1, max_key, neg_inf_key, k.to(tl.float32),
                        False, BLOCK_V, PROBES)  # fmt: skip
    kappa = tl.maximum(k_key, min_key)
    if p < 1.0:
        if HF:  # transformers: top-p on what top-k kept (min-p comes after)
            floor_key = k_key
        else:  # vLLM: top-p on what min-p and top-k kept
            floor_key = kappa
        mass = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = _load_z(row_ptr, offs, V, inv_t_hi, inv_t_lo)
            mass += tl.sum(tl.where((offs < V) & (_float_key(z) >= floor_key), tl.exp(z - m), 0.0), axis=0)
        p_key = _bisect(row_ptr, V, inv_t_hi, inv_t_lo, m, floor_key - 1, max_key, floor_key, p * mass, True,
                        BLOCK_V, PROBES)  # fmt: skip
        kappa = tl.maximum(kappa, p_key)
    tau = tl.where(kappa <= neg_inf_key, -float("inf"), _key_float(kappa))
    tl.store(tau_ptr + row, tau)


# ------------------------------------------------------------------------------------------- launchers


def row_thresholds(logits: torch.Tensor, trunc, temperature: float) -> torch.Tensor:
    """``[B*T]`` float32 threshold of each row of ``[B, T, V]`` logits (``stride(-1) == 1``): the row keeps
    ``{v : logits_v / T >= tau}`` (``z`` scaled as the row-softmax kernels scale it). ``trunc``: a
    ``rlhf_fast.truncation.RowTruncation`` of ``B*T`` rows."""
    B, T, V = logits.shape
    tau = torch.empty(B * T, dtype=torch.float32, device=logits.device)
    if B * T == 0:
        return tau
    cfg = threshold_config(V, logits.element_size())
    _row_threshold_kernel[(B * T,)](
        logits, trunc.top_k, trunc.top_p, trunc.min_p, tau,
        logits.stride(0), logits.stride(1),
        T, V,
        *inverse_parts(temperature),
        HF=trunc.sampler == "hf", BLOCK_V=cfg.BLOCK_V, PROBES=cfg.PROBES, num_warps=cfg.num_warps,
    )  # fmt: skip
    return tau


# ------------------------------------------------------------------------- ahead-of-time build specs


def build_specs():
    """The threshold kernel per logits dtype and sampler order, at a 152k vocabulary."""
    specs = []
    for torch_dtype, tl_dtype in TL_DTYPE.items():
        cfg = threshold_config(151936, torch_dtype.itemsize)
        for hf in (False, True):
            constexprs = {"HF": hf, "BLOCK_V": cfg.BLOCK_V, "PROBES": cfg.PROBES}
            types = {"logits_ptr": f"*{tl_dtype}", "top_k_ptr": "*i32"}
            specs.append(kernel_build(_row_threshold_kernel, constexprs, types, sizes=("V",), num_warps=cfg.num_warps,
                                      streams_rows=True,
                                      label=f"{tl_dtype} {'hf' if hf else 'vllm'} BLOCK_V={cfg.BLOCK_V} PROBES={cfg.PROBES}"))  # fmt: skip
    return specs
