"""The fused PPO policy step: per token, from one pass over its logits row, the log-prob, entropy, ratio,
policy loss, KL penalty and entropy bonus, and the derivative of the token's loss with respect to
its log-prob (what backward needs).

Per token ``t`` (``A`` advantage, ``r = exp(logp - old_logp)`` at most ``RATIO_MAX``, ``lr = logp - ref_logp``), for the
token-level loss modes of rlhf_fast/_policy.py (``LOSS_MODE``)::

    vanilla: L = max(-A r', -A clip(r, 1 - clip_low, 1 + clip_high)), r' = min(r, delta) (HAS_DELTA) or r
             ; with dual clip c, where A < 0: L = min(L, -A c)
             dL/dlogp = -A r  where the unclipped branch is active (and r <= delta), else 0
    cispo:   L = -sg(clip(r, 1 - clip_low, 1 + clip_high)) A logp,   dL/dlogp = -clip(r) A
    sapo:    L = -A (4 / tau) sigmoid(tau (r - 1)),  tau = tau_pos (A > 0) or tau_neg,
             dL/dlogp = -4 A s (1 - s) r  with s = sigmoid(tau (r - 1))
    L *= w_rollout                                        (HAS_ROLLOUT: a constant per token)
    loss_t = L + kl_coef * k(lr) [* r  with KL_BIAS] - entropy_coef * H

    d loss_t / d logp = dL/dlogp  (+ kl_coef * k'(lr), or kl_coef * (k'(lr) + k(lr)) r with KL_BIAS)
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
from ._build import TL_DTYPE, kernel_build
from ._tuning import row_config

# The largest float32, the cap of the importance ratio (see _ppo_fwd_kernel)
RATIO_MAX = tl.constexpr(3.4028234663852886e38)
# KL estimators, as the constexpr KL_ESTIMATOR
KL_ESTIMATORS = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
# the token-level loss modes this kernel computes, as the constexpr LOSS_MODE
LOSS_MODES = {"vanilla": 0, "cispo": 1, "sapo": 2}


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


@triton.heuristics({
    "HAS_REF": lambda args: args["ref_logp_ptr"] is not None,
    "HAS_ROLLOUT": lambda args: args["rollout_w_ptr"] is not None,
})  # fmt: skip
@triton.jit
def _ppo_fwd_kernel(
    # pointers: inputs
    logits_ptr,
    labels_ptr,
    old_logp_ptr,
    adv_ptr,
    weight_ptr,
    ref_logp_ptr,
    rollout_w_ptr,
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
    delta,
    tau_pos,
    tau_neg,
    # meta-parameters
    HAS_REF: tl.constexpr,
    HAS_ROLLOUT: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    LOSS_MODE: tl.constexpr,
    KL_BIAS: tl.constexpr,
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
    # Saturated at the largest float32 rather than inf (lr > ~88.72), as the PyTorch twin's ratio_exp
    # (rlhf_fast/_policy.py): a branch that does not use an overflowed ratio then makes 0 * RATIO_MAX = 0
    # (A = 0, SAPO's saturated gate, the KL's bias correction with k = 0) where inf made 0 * inf = NaN.
    # (where(), not minimum(): a NaN ratio stays NaN, which the GPU's fminf would replace by RATIO_MAX)
    ratio = tl.exp(logp - tl.load(old_logp_ptr + row).to(tl.float32))
    ratio = tl.where(ratio > RATIO_MAX, RATIO_MAX, ratio)
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    if LOSS_MODE == 0:
        r1 = ratio
        dr1 = ratio
        if HAS_DELTA:
            r1 = tl.minimum(ratio, delta)
            dr1 = tl.where(ratio <= delta, ratio, 0.0)
        unclipped = -adv * r1
        clipped = -adv * clipped_ratio
        loss = tl.maximum(unclipped, clipped)
        dloss = tl.where(clipped > unclipped, 0.0, -adv * dr1)  # a tie is the unclipped branch
        if HAS_DUAL_CLIP:
            dual = (adv < 0) & (loss > -adv * dual_clip)
            loss = tl.where(dual, -adv * dual_clip, loss)
            dloss = tl.where(dual, 0.0, dloss)
    elif LOSS_MODE == 1:
        loss = -clipped_ratio * adv * logp
        dloss = -clipped_ratio * adv
    else:
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        sig = 1.0 / (1.0 + tl.exp(-tau * (ratio - 1.0)))
        loss = -adv * (4.0 / tau) * sig
        dloss = -adv * 4.0 * sig * (1.0 - sig) * ratio
    if HAS_ROLLOUT:
        w_rollout = tl.load(rollout_w_ptr + row).to(tl.float32)
        loss *= w_rollout
        dloss *= w_rollout
    if HAS_REF:
        kl, dkl = _kl_and_derivative(logp - tl.load(ref_logp_ptr + row).to(tl.float32), KL_ESTIMATOR)
        if KL_BIAS:
            dkl = (dkl + kl) * ratio
            kl = kl * ratio
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
                clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, rollout_w=None,
                loss_mode="vanilla", delta=None, tau_pos=1.0, tau_neg=1.05, kl_bias=False):  # fmt: skip
    """Per-token ``(logp, entropy, row_max, log_norm, loss, dloss_dlogp)``, float32 ``[B*T]``.

    ``logits``: ``[B, T, V]`` with ``stride(-1) == 1``; every per-token input contiguous ``[B*T]``
    (``weights`` are the aggregation weights, 0 outside the mask; ``ref_logp`` and ``rollout_w`` may be
    ``None``); ``loss_mode`` one of :data:`LOSS_MODES`.
    """
    B, T, V = logits.shape
    N = B * T
    out = torch.empty((6, N), dtype=torch.float32, device=logits.device)
    if N:
        cfg = row_config(V, logits.element_size())
        _ppo_fwd_kernel[(N,)](
            logits, labels, old_logp, advantages, weights, ref_logp, rollout_w,
            *out,
            logits.stride(0), logits.stride(1),
            T, V,
            *inverse_parts(temperature), ignore_index, clip_low, clip_high, dual_clip or 0.0, kl_coef, entropy_coef,
            delta or 0.0, tau_pos, tau_neg,
            HAS_DUAL_CLIP=dual_clip is not None, HAS_DELTA=delta is not None, LOSS_MODE=LOSS_MODES[loss_mode],
            KL_BIAS=bool(kl_bias), KL_ESTIMATOR=KL_ESTIMATORS[kl_estimator],
            BLOCK_V=cfg.BLOCK_V, num_warps=cfg.num_warps,
        )  # fmt: skip
    return tuple(out)


def build_specs():
    """The forward for each logits dtype: vanilla with and without reference (and every option with it),
    cispo and sapo with a reference (see kernels/_aot.py).

    The backward is ``rf.logprobs``' backward kernel, already in the build check.
    """
    specs = []
    for dtype, t in TL_DTYPE.items():
        cfg = row_config(151936, dtype.itemsize)
        for has_ref, estimator, mode in ((True, "k3", "vanilla"), (True, "k1", "vanilla"), (False, "k3", "vanilla"),
                                         (True, "k3", "cispo"), (True, "k3", "sapo")):  # fmt: skip
            clip_options = has_ref and mode == "vanilla"
            # with a reference: every option on (rollout weights, dual clip, delta, the KL's bias correction)
            constexprs = {"HAS_REF": has_ref, "HAS_ROLLOUT": has_ref, "HAS_DUAL_CLIP": clip_options,
                          "HAS_DELTA": clip_options, "LOSS_MODE": LOSS_MODES[mode], "KL_BIAS": has_ref,
                          "KL_ESTIMATOR": KL_ESTIMATORS[estimator], "BLOCK_V": cfg.BLOCK_V}  # fmt: skip
            specs.append(kernel_build(_ppo_fwd_kernel, constexprs, {"logits_ptr": f"*{t}", "labels_ptr": "*i64"},
                                      sizes=("V",), absent=() if has_ref else ("ref_logp_ptr", "rollout_w_ptr"),
                                      num_warps=cfg.num_warps, streams_rows=True,
                                      narrow_loads=1,  # the label logit
                                      label=f"{t} {mode} {'ref ' + estimator if has_ref else 'no ref'} BLOCK_V={cfg.BLOCK_V}"))  # fmt: skip
    return specs
