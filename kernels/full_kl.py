"""Exact ``KL(p || q)`` over the vocabulary, ``p = softmax(x / T)``, ``q = softmax(x_ref / T)``, one pass
over both rows forward and one backward.

Forward, per row, online over vocabulary blocks (running maxima from ``-inf``)::

    s_p = sum e^(zp - m_p),   s_q = sum e^(zq - m_q),   w = sum e^(zp - m_p) ((zp - m_p) - (zq - m_q))
    KL  = sum_v p_v (log p_v - log q_v) = w / s_p - log s_p + log s_q

When a block raises the maxima to ``m_p'``, ``m_q'``, the sums are rescaled exactly:
``w' = e^(m_p - m_p') (w + s_p ((m_p - m_p') - (m_q - m_q')))``. Accumulating ``(zp - m_p) - (zq - m_q)``
rather than ``zp - zq`` keeps the terms as small as the log-ratio itself: two distributions whose
logits differ by a constant have KL 0 to float32 rounding, not to rounding of that constant.

Entries with ``zp = -inf`` have ``p_v = 0`` and add exactly 0 (whatever ``zq`` is); an entry with
``zq = -inf`` where ``p_v > 0`` makes the KL ``+inf``, as it mathematically is.

Backward (the reference logits are a constant)::

    d KL / d zp_v = sum_w p_w (d_v[w] - p_v) (log p_w - log q_w) + sum_w p_w (d_v[w] - p_v)
                  = p_v (log p_v - log q_v) - p_v KL + 0  =  p_v (log p_v - log q_v - KL),   dx = dz / T
"""

import torch
import triton
import triton.language as tl

from ._common import interpreter_safe_output, inverse_parts
from ._softmax import scale_by_inverse
from ._build import TL_DTYPE, kernel_build
from ._tuning import row_config

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _full_kl_fwd_kernel(
    # pointers
    logits_ptr,
    ref_ptr,
    kl_ptr,
    stats_ptr,
    # strides of the [B, T, V] logits and reference logits (last strides are 1)
    stride_x_b,
    stride_x_t,
    stride_r_b,
    stride_r_t,
    # sizes
    T,
    V,
    N,
    # hyperparameters
    inv_t_hi,
    inv_t_lo,
    # meta-parameters
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    x_row = logits_ptr + b * stride_x_b + t * stride_x_t
    r_row = ref_ptr + b * stride_r_b + t * stride_r_t
    cols = tl.arange(0, BLOCK_V)

    m_p = -float("inf")  # running maxima start at -inf, never 0
    m_q = -float("inf")
    s_p = 0.0
    s_q = 0.0
    w = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        in_row = offs < V
        zp = scale_by_inverse(tl.load(x_row + offs, mask=in_row, other=-float("inf")).to(tl.float32), inv_t_hi, inv_t_lo)
        zq = scale_by_inverse(tl.load(r_row + offs, mask=in_row, other=-float("inf")).to(tl.float32), inv_t_hi, inv_t_lo)
        # new maxima; shift by 0 while a row has seen only -inf (not by -inf: -inf - -inf = NaN)
        mp_new = tl.maximum(m_p, tl.max(zp, axis=0))
        mq_new = tl.maximum(m_q, tl.max(zq, axis=0))
        mp_ref = tl.where(mp_new == -float("inf"), 0.0, mp_new)
        mq_ref = tl.where(mq_new == -float("inf"), 0.0, mq_new)
        e_p = tl.exp(zp - mp_ref)
        alpha_p = tl.exp(m_p - mp_ref)  # 0 while m_p is -inf, and then s_p == w == 0
        shift = tl.where(m_p == -float("inf"), 0.0, m_p - mp_ref) - tl.where(m_q == -float("inf"), 0.0, m_q - mq_ref)
        # p_v = 0 adds exactly 0 (zp = -inf, or a finite zp whose zp - m_p overflows to -inf: 0 * -inf would
        # be NaN); zq = -inf where p_v > 0 adds +inf
        term = tl.where(e_p == 0.0, 0.0, e_p * ((zp - mp_ref) - (zq - mq_ref)))
        w = alpha_p * (w + shift * s_p) + tl.sum(term, axis=0)
        s_p = alpha_p * s_p + tl.sum(e_p, axis=0)
        s_q = tl.exp(m_q - mq_ref) * s_q + tl.sum(tl.exp(zq - mq_ref), axis=0)
        m_p = mp_new
        m_q = mq_new

    m_p = tl.where(m_p == -float("inf"), 0.0, m_p)
    m_q = tl.where(m_q == -float("inf"), 0.0, m_q)
    log_sp = tl.log(s_p)
    log_sq = tl.log(s_q)
    kl = w / s_p - log_sp + log_sq
    tl.store(kl_ptr + row, kl)
    tl.store(stats_ptr + row, m_p)
    tl.store(stats_ptr + N + row, log_sp)
    tl.store(stats_ptr + 2 * N + row, m_q)
    tl.store(stats_ptr + 3 * N + row, log_sq)


@triton.jit
def _full_kl_bwd_kernel(
    # pointers
    logits_ptr,
    ref_ptr,
    kl_ptr,
    stats_ptr,
    grad_kl_ptr,
    grad_logits_ptr,
    # strides of the [B, T, V] logits, reference logits and gradient (last strides are 1)
    stride_x_b,
    stride_x_t,
    stride_r_b,
    stride_r_t,
    stride_g_b,
    stride_g_t,
    # sizes
    T,
    V,
    N,
    # hyperparameters
    inv_t_hi,
    inv_t_lo,
    # meta-parameters
    BLOCK_V: tl.constexpr,
):
    # dKL/dx_v = p_v (log p_v - log q_v - KL) / T  (derivation in the module docstring)
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    x_row = logits_ptr + b * stride_x_b + t * stride_x_t
    r_row = ref_ptr + b * stride_r_b + t * stride_r_t
    g_row = grad_logits_ptr + b * stride_g_b + t * stride_g_t
    cols = tl.arange(0, BLOCK_V)
    kl = tl.load(kl_ptr + row)
    m_p = tl.load(stats_ptr + row)
    log_sp = tl.load(stats_ptr + N + row)
    m_q = tl.load(stats_ptr + 2 * N + row)
    log_sq = tl.load(stats_ptr + 3 * N + row)
    g_kl = scale_by_inverse(tl.load(grad_kl_ptr + row).to(tl.float32), inv_t_hi, inv_t_lo)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        in_row = offs < V
        zp = scale_by_inverse(tl.load(x_row + offs, mask=in_row, other=-float("inf")).to(tl.float32), inv_t_hi, inv_t_lo)
        zq = scale_by_inverse(tl.load(r_row + offs, mask=in_row, other=-float("inf")).to(tl.float32), inv_t_hi, inv_t_lo)
        log_p = (zp - m_p) - log_sp
        log_q = (zq - m_q) - log_sq
        p = tl.exp(log_p)
        g = p * (((zp - m_p) - (zq - m_q)) - (log_sp - log_sq) - kl) * g_kl
        g = tl.where(p == 0.0, 0.0, g)  # p_v = 0: exactly 0, as in the forward
        tl.store(g_row + offs, g.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


# ------------------------------------------------------------------------------------------- launchers


def _block_config(logits: torch.Tensor, ref: torch.Tensor):
    # Two rows stream together: size the block for the wider of the two dtypes.
    return row_config(logits.shape[-1], max(logits.element_size(), ref.element_size()))


def full_kl_forward(logits: torch.Tensor, ref: torch.Tensor, temperature: float):
    """``(kl [B*T], stats [4, B*T])`` for ``[B, T, V]`` logits and reference logits (``stride(-1) == 1``).

    ``stats`` holds ``(m_p, log s_p, m_q, log s_q)`` per row, what :func:`full_kl_backward` needs.
    """
    B, T, V = logits.shape
    N = B * T
    kl = torch.empty(N, dtype=torch.float32, device=logits.device)
    stats = torch.empty((4, N), dtype=torch.float32, device=logits.device)
    if N:
        cfg = _block_config(logits, ref)
        _full_kl_fwd_kernel[(N,)](
            logits, ref, kl, stats,
            logits.stride(0), logits.stride(1), ref.stride(0), ref.stride(1),
            T, V, N,
            *inverse_parts(temperature),
            BLOCK_V=cfg.BLOCK_V, num_warps=cfg.num_warps,
        )  # fmt: skip
    return kl, stats


def full_kl_backward(logits, ref, kl, stats, grad_kl, temperature: float) -> torch.Tensor:
    """Gradient of ``sum(grad_kl * kl)`` with respect to the ``[B, T, V]`` logits (a new tensor)."""
    B, T, V = logits.shape
    grad = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    if B * T == 0:
        return grad
    out = interpreter_safe_output(grad)
    cfg = _block_config(logits, ref)
    _full_kl_bwd_kernel[(B * T,)](
        logits, ref, kl, stats, grad_kl, out,
        logits.stride(0), logits.stride(1), ref.stride(0), ref.stride(1), out.stride(0), out.stride(1),
        T, V, B * T,
        *inverse_parts(temperature),
        BLOCK_V=cfg.BLOCK_V, num_warps=cfg.num_warps,
    )  # fmt: skip
    if out is not grad:
        grad.copy_(out)
    return grad


# ------------------------------------------------------------------------- ahead-of-time build specs


def build_specs():
    """Forward and backward for each logits dtype (reference in the same dtype), see kernels/_aot.py."""
    specs = []
    for dtype, t in TL_DTYPE.items():
        cfg = row_config(151936, dtype.itemsize)
        constexprs = {"BLOCK_V": cfg.BLOCK_V}
        for kernel, in_dtype, streams_out in (
            (_full_kl_fwd_kernel, ("logits_ptr", "ref_ptr"), False),
            (_full_kl_bwd_kernel, ("logits_ptr", "ref_ptr", "grad_logits_ptr"), True),
        ):
            specs.append(kernel_build(kernel, constexprs, dict.fromkeys(in_dtype, f"*{t}"), sizes=("V", "N"),
                                      num_warps=cfg.num_warps, streams_rows=True, streams_out=streams_out,
                                      label=f"{t} BLOCK_V={cfg.BLOCK_V}"))  # fmt: skip
    return specs
