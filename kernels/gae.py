"""Generalized advantage estimation over ``[B, T]``: one program per row, a reverse scan over T in tiles.

The recursion (response tokens ``t`` where ``mask != 0``; ``n(t)`` is the next response token after
``t`` in the row, and ``A``, ``V`` beyond the last one are 0)::

    A_t = r_t + gamma * V_{n(t)} - V_t + gamma * lam * A_{n(t)}

is sequential in T. Written over the state ``x_t = (P_t, Q_t)`` = (``A``, ``V``) at the first response
token at or after ``t``, each position is an affine map of the state that follows it::

    response token:  x_t = [[gamma*lam, gamma], [0, 0]] x_{t+1} + (r_t - V_t, V_t)
    anything else:   x_t = x_{t+1}                       (the identity: holes and padding are skipped)

The maps compose associatively, so a tile of ``BLOCK_T`` positions is solved by one
``tl.associative_scan`` (log-depth, contiguous vector loads) instead of ``BLOCK_T`` dependent steps.
The matrices stay upper triangular, so a map is five floats ``(a, b, d, c1, c2)``::

    x -> [[a, b], [0, d]] x + (c1, c2)

The tiles are visited from the end of the row; the state at a tile's first position is the carry into
the tile before it. Every product is of factors in ``[0, 1]`` (gamma, lam and the 0/1 entries) and
there is no division, so nothing overflows or loses precision beyond float32 rounding of the sums.
"""

import torch
import triton
import triton.language as tl

from ._build import TL_DTYPE, kernel_build
from ._tuning import gae_config

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _compose(a_g, b_g, d_g, c1_g, c2_g, a_f, b_f, d_f, c1_f, c2_f):
    """``f o g`` for the reverse scan: ``g`` is the composite of the later positions, ``f`` the earlier one.

    (A reverse ``tl.associative_scan`` calls ``combine(accumulated, current)`` with the accumulated
    maps of the positions after the current one, so this returns ``current o accumulated``.)
    ``[[a_f, b_f], [0, d_f]] ([[a_g, b_g], [0, d_g]] x + c_g) + c_f``, multiplied out.
    """
    a = a_f * a_g
    b = a_f * b_g + b_f * d_g
    d = d_f * d_g
    c1 = a_f * c1_g + b_f * c2_g + c1_f
    c2 = d_f * c2_g + c2_f
    return a, b, d, c1, c2


@triton.heuristics({"HAS_MASK": lambda args: args["mask_ptr"] is not None})
@triton.jit
def _gae_kernel(
    # pointers
    rewards_ptr,
    values_ptr,
    mask_ptr,
    advantages_ptr,
    returns_ptr,
    # row strides of the [B, T] inputs (their last stride is 1) and of the contiguous outputs
    stride_r_b,
    stride_v_b,
    stride_m_b,
    stride_out_b,
    # sizes
    T,
    # hyperparameters
    gamma,
    lam,
    # meta-parameters
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    r_row = rewards_ptr + row * stride_r_b
    v_row = values_ptr + row * stride_v_b
    adv_row = advantages_ptr + row * stride_out_b
    ret_row = returns_ptr + row * stride_out_b
    cols = tl.arange(0, BLOCK_T)
    gamma_lam = gamma * lam

    # (A, V) at the first response token after the current tile: 0 past the end of the row
    carry_p = 0.0
    carry_q = 0.0
    n_tiles = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_tiles):
        offs = (n_tiles - 1 - i) * BLOCK_T + cols
        in_row = offs < T
        r = tl.load(r_row + offs, mask=in_row, other=0.0).to(tl.float32)
        v = tl.load(v_row + offs, mask=in_row, other=0.0).to(tl.float32)
        if HAS_MASK:
            m = (tl.load(mask_ptr + row * stride_m_b + offs, mask=in_row, other=0) != 0) & in_row
        else:
            m = in_row
        # the map of each position (module docstring); where(), so padding values never enter
        a = tl.where(m, gamma_lam, 1.0)
        b = tl.where(m, gamma, 0.0)
        d = tl.where(m, 0.0, 1.0)
        c1 = tl.where(m, r - v, 0.0)
        c2 = tl.where(m, v, 0.0)
        a, b, d, c1, c2 = tl.associative_scan((a, b, d, c1, c2), 0, _compose, reverse=True)
        # x_t = (composite of t .. tile end) applied to the carry
        p = a * carry_p + b * carry_q + c1
        q = d * carry_q + c2
        tl.store(adv_row + offs, tl.where(m, p, 0.0), mask=in_row)
        tl.store(ret_row + offs, tl.where(m, p + v, 0.0), mask=in_row)
        first = cols == 0
        carry_p = tl.sum(tl.where(first, p, 0.0), axis=0)
        carry_q = tl.sum(tl.where(first, q, 0.0), axis=0)


# ------------------------------------------------------------------------------------------- launchers


def gae_forward(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, gamma: float, lam: float):
    """``(advantages, returns)``, two new contiguous float32 ``[B, T]`` tensors.

    ``rewards``, ``values``: ``[B, T]`` float tensors with ``stride(-1) == 1`` (any row strides, any
    float dtypes); ``mask``: ``None`` (every position is a response token) or ``[B, T]`` with
    ``stride(-1) == 1``, nonzero on response tokens (bool tensors are read as uint8).
    """
    B, T = rewards.shape
    advantages = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    returns = torch.empty_like(advantages)
    if B * T == 0:
        return advantages, returns
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    cfg = gae_config(T)
    _gae_kernel[(B,)](
        rewards, values, mask, advantages, returns,
        rewards.stride(0), values.stride(0), 0 if mask is None else mask.stride(0), advantages.stride(0),
        T,
        gamma, lam,
        BLOCK_T=cfg.BLOCK_T, num_warps=cfg.num_warps,
    )  # fmt: skip
    return advantages, returns


# ------------------------------------------------------------------------- ahead-of-time build specs


def build_specs():
    """One build per input dtype, with and without a mask, at a long and a short row (kernels/_aot.py).

    ``T`` and the row strides are marked divisible by 16, as Triton's launcher specializes them at the
    usual lengths (a multiple of 16 tokens): then the loads and stores are 8- and 16-byte vectors (the
    build check asserts it). At other lengths the row tail mask keeps them scalar, still coalesced.
    """
    specs = []
    for tl_dtype in TL_DTYPE.values():
        for has_mask in (True, False):
            for cfg in sorted({gae_config(T) for T in (4096, 128)}, key=lambda c: c.BLOCK_T):
                constexprs = {"HAS_MASK": has_mask, "BLOCK_T": cfg.BLOCK_T}
                types = {"rewards_ptr": f"*{tl_dtype}", "values_ptr": f"*{tl_dtype}", "mask_ptr": "*u8"}
                specs.append(kernel_build(_gae_kernel, constexprs, types, sizes=("T",),
                                          absent=() if has_mask else ("mask_ptr",), num_warps=cfg.num_warps,
                                          streams_rows=True, streams_out=True,
                                          label=f"{tl_dtype} BLOCK_T={cfg.BLOCK_T} mask={has_mask}"))  # fmt: skip
    return specs
