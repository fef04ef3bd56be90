"""The fused PPO policy step: per token, from one pass over its logits row, the log-prob, entropy, ratio,
clipped surrogate, KL penalty and entropy bonus, and the derivative of the token's loss with respect to
its log-prob (what backward needs).

Per token ``t`` (``A`` advantage, ``r = exp(logp - old_logp)``, ``lr = logp - ref_logp``)::

    L_clip = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))         ; with dual clip c, where A < 0:
    L_clip = min(L_clip, -A c)
    loss_t = L_clip + kl_coef * k(lr) - entropy_coef * H

    d loss_t / d logp = -A r  where the unclipped branch is active, else 0  (+ kl_coef * k'(lr))
    d loss_t / d H    = -entropy_coef

with ``k1 = lr (k' = 1)``, ``k2 = lr^2 / 2 (k' = lr)``, ``k3 = e^-lr - 1 + lr (k' = 1 - e^-lr)``,
``abs = |lr| (k' = sign lr)``. The aggregation is a weighted sum ``sum_t w_t loss_t`` with per-token
weights computed once from the mask (rlhf_fast/_agg.py), so backward is ``rf.logprobs``' backward kernel
with ``g_logp = g w_t d loss_t / d logp`` and ``g_H = -g w_t entropy_coef``: one more pass over the logits.
"""

import torch
import triton
import triton.language as tl

from ._common import inverse_parts
from ._softmax import row_softmax_stats, scale_by_inverse
from ._tuning import row_config

# KL estimators, as the constexpr KL_ESTIMATOR
KL_ESTIMATORS = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}


@triton.jit
def _kl_and_derivative(lr, KL_ESTIMATOR: tl.constexpr):
    if KL_ESTIMATOR == 0:
        return lr, 1.0
    elif KL_ESTIMATOR == 1:
        return 0.5 * lr * lr, lr
    elif KL_ESTIMATOR == 2:
        e = tl.exp(-lr)
        # e^-lr - 1 + lr cancels for small |lr|: its Taylor series lr^2/2 - lr^3/6 + lr^4/24 is exact to
        # ~1e-7 relative below |lr| = 0.05 (next term lr^5/120).
        series = lr * lr * (0.5 - lr * (1.0 / 6.0 - lr * (1.0 / 24.0)))
        return tl.where(tl.abs(lr) < 0.05, series, e - 1.0 + lr), 1.0 - e
    else:
        return tl.abs(lr), tl.where(lr > 0, 1.0, tl.where(lr < 0, -1.0, 0.0))


@triton.heuristics({"HAS_REF": lambda args: args["ref_logp_ptr"] is not None})
@triton.jit
def _ppo_fwd_kernel(
    # pointers: inputs
    logits_ptr,
    labels_ptr,
    old_logp_ptr,
    adv_ptr,
    weight_ptr,
    ref_logp_ptr,
    # pointers: outputs
    logp_ptr,
    entropy_ptr,
    row_max_ptr,
    log_norm_ptr,
    loss_ptr,
    dloss_dlogp_ptr,
    # strides of the [B, T, V] logits (last stride 1)
    stride_logits_b,
    stride_logits_t,
    # sizes
    T,
    V,
    # hyperparameters
    inv_t_hi,
    inv_t_lo,
    ignore_index,
    clip_low,
    clip_high,
    dual_clip,
    kl_coef,
    entropy_coef,
    # meta-parameters
    HAS_REF: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(weight_ptr + row)
    b = row // T
    t = row - b * T
    row_ptr = logits_ptr + b * stride_logits_b + t * stride_logits_t
    m_ref, log_s, entropy = row_softmax_stats(row_ptr, V, inv_t_hi, inv_t_lo, BLOCK_V)
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    z_label = scale_by_inverse(tl.load(row_ptr + tl.where(ignored, 0, label)).to(tl.float32), inv_t_hi, inv_t_lo)
    logp = tl.where(ignored, 0.0, (z_label - m_ref) - log_s)

    adv = tl.load(adv_ptr + row).to(tl.float32)
    ratio = tl.exp(logp - tl.load(old_logp_ptr + row).to(tl.float32))
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    loss = tl.maximum(unclipped, clipped)
    dloss = tl.where(clipped > unclipped, 0.0, -adv * ratio)  # a tie is the unclipped branch
    if HAS_DUAL_CLIP:
        dual = (adv < 0) & (loss > -adv * dual_clip)
        loss = tl.where(dual, -adv * dual_clip, loss)
        dloss = tl.where(dual, 0.0, dloss)
    if HAS_REF:
        kl, dkl = _kl_and_derivative(logp - tl.load(ref_logp_ptr + row).to(tl.float32), KL_ESTIMATOR)
        loss += kl_coef * kl
        dloss += kl_coef * dkl
    loss -= entropy_coef * entropy

    tl.store(logp_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(row_max_ptr + row, m_ref)
    tl.store(log_norm_ptr + row, log_s)
    # Tokens outside the loss (weight 0) store 0, not whatever padding makes of the ratio (inf, NaN).
    tl.store(loss_ptr + row, tl.where(w != 0, loss, 0.0))
    tl.store(dloss_dlogp_ptr + row, tl.where(w != 0, dloss, 0.0))


def ppo_forward(logits, labels, old_logp, advantages, weights, ref_logp, *, temperature, ignore_index,
                clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef):  # fmt: skip
    """Per-token ``(logp, entropy, row_max, log_norm, loss, dloss_dlogp)``, float32 ``[B*T]``.

    ``logits``: ``[B, T, V]`` with ``stride(-1) == 1``; every per-token input contiguous ``[B*T]``
    (``weights`` are the aggregation weights, 0 outside the mask; ``ref_logp`` may be ``None``).
    """
    B, T, V = logits.shape
    N = B * T
    out = torch.empty((6, N), dtype=torch.float32, device=logits.device)
    if N:
        cfg = row_config(V, logits.element_size())
        _ppo_fwd_kernel[(N,)](
            logits, labels, old_logp, advantages, weights, ref_logp,
            *out,
            logits.stride(0), logits.stride(1),
            T, V,
            *inverse_parts(temperature), ignore_index, clip_low, clip_high, dual_clip or 0.0, kl_coef, entropy_coef,
            HAS_DUAL_CLIP=dual_clip is not None, KL_ESTIMATOR=KL_ESTIMATORS[kl_estimator],
            BLOCK_V=cfg.BLOCK_V, num_warps=cfg.num_warps,
        )  # fmt: skip
    return tuple(out)


def build_specs():
    """The forward for each logits dtype, with and without reference/dual clip (see kernels/_aot.py).

    The backward is ``rf.logprobs``' backward kernel, already in the build check.
    """
    from ._aot import KernelBuild
    from .logprobs import _TL_DTYPE

    specs = []
    for dtype, t in _TL_DTYPE.items():
        cfg = row_config(151936, dtype.itemsize)
        for has_ref, estimator in ((True, "k3"), (True, "k1"), (False, "k3")):
            sig = {
                "logits_ptr": f"*{t}", "labels_ptr": "*i64", "old_logp_ptr": "*fp32", "adv_ptr": "*fp32",
                "weight_ptr": "*fp32", "ref_logp_ptr": "*fp32" if has_ref else "constexpr",
                **{f"{n}_ptr": "*fp32" for n in ("logp", "entropy", "row_max", "log_norm", "loss", "dloss_dlogp")},
                "stride_logits_b": "i32", "stride_logits_t": "i32", "T": "i32", "V": "i32",
                "inv_t_hi": "fp32", "inv_t_lo": "fp32", "ignore_index": "i32", "clip_low": "fp32", "clip_high": "fp32",
                "dual_clip": "fp32", "kl_coef": "fp32", "entropy_coef": "fp32",
                "HAS_REF": "constexpr", "HAS_DUAL_CLIP": "constexpr", "KL_ESTIMATOR": "constexpr",
                "BLOCK_V": "constexpr",
            }  # fmt: skip
            constexprs = {"HAS_REF": has_ref, "HAS_DUAL_CLIP": has_ref, "KL_ESTIMATOR": KL_ESTIMATORS[estimator],
                          "BLOCK_V": cfg.BLOCK_V}  # fmt: skip
            if not has_ref:
                constexprs["ref_logp_ptr"] = None
            specs.append(
                KernelBuild(
                    kernel=_ppo_fwd_kernel,
                    signature=sig,
                    constexprs=constexprs,
                    divisible=[n for n, ty in sig.items() if ty.startswith("*") or n.startswith("stride") or n == "V"],
                    num_warps=cfg.num_warps,
                    streams_rows=True,
                    narrow_loads=1,  # the label logit
                    label=f"{t} {'ref ' + estimator if has_ref else 'no ref'} BLOCK_V={cfg.BLOCK_V}",
                )
            )
    return specs
