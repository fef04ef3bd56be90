"""Online softmax statistics and the log-prob/entropy gradient, shared by every row-softmax kernel.

The helpers broadcast: ``rf.logprobs``' kernel calls them on one row (``z`` of shape ``[BLOCK_V]``,
scalar statistics, ``AXIS=0``), the fused linear kernels on a tile (``z`` of shape ``[BLOCK_N, BLOCK_V]``,
per-row statistics, ``AXIS=1``). ``online_logsumexp_update`` and ``logp_dlogits`` are the log-probs-only
versions (no entropy statistic, no entropy gradient terms) for a kernel specialised to skip the entropy;
``row_softmax_stats(..., WITH_ENTROPY=False)`` streams a row with the former.
"""

import triton
import triton.language as tl


@triton.jit
def scale_by_inverse(x, inv_hi, inv_lo):
    """``x / T`` as ``x * inv_hi + x * inv_lo`` with ``inv_hi + inv_lo = 1 / T`` to ~2^-48 (``inverse_parts``).

    A product by the rounded ``1 / T`` alone scales every logit by the same relative error (up to 6e-8),
    a bias that grows with the spread of the logits (1e-5 in the entropy at spreads of ~200 in a test);
    the two-term product is within an ulp or so of ``x / T``, like PyTorch's division, at the cost of one
    FMA. ``T = 1`` gives ``inv_lo = 0``: exact. Infinite ``x`` (masked vocabulary) stays as ``x * inv_hi``:
    its ``x * inv_lo`` would be ``inf * 0`` or ``-inf + inf``, NaN.
    """
    y = x * inv_hi
    return tl.where(tl.abs(y) == float("inf"), y, y + x * inv_lo)


@triton.jit
def online_softmax_update(m, s, u, z, AXIS: tl.constexpr):
    """Fold a block ``z`` of logits into the running ``(m, s, u)`` of its rows.

    ``m``: running max (starts at -inf, never 0: all-negative rows must come out right);
    ``s = sum exp(z - m)``; ``u = sum exp(z - m) * (z - m)``, both rescaled to the new max:
    ``sum e^(z-m')(z-m') = e^(m-m') (u + (m - m') s)``. Entries whose ``e^(z - m)`` is 0 add exactly 0
    to ``u`` (the limit of ``p log p``): ``-inf`` entries, and finite ones whose ``z - m`` overflows to
    ``-inf`` (``z = -3e38`` beside ``m = 3e38``), where ``0 * -inf`` would be NaN. So NaN can only come
    from NaN in the input.
    """
    m_new = tl.maximum(m, tl.max(z, axis=AXIS))
    # While every entry so far is -inf, shift by 0 instead of -inf (which would give -inf - -inf = NaN).
    m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
    d = z - tl.expand_dims(m_ref, AXIS)
    e = tl.exp(d)
    ed = tl.where(e == 0.0, 0.0, e * d)
    alpha = tl.exp(m - m_ref)  # 0 while m is -inf, and then s == u == 0 too
    shift = tl.where(m == -float("inf"), 0.0, m - m_ref)
    u = alpha * (u + shift * s) + tl.sum(ed, axis=AXIS)
    s = alpha * s + tl.sum(e, axis=AXIS)
    return m_new, s, u


@triton.jit
def online_logsumexp_update(m, s, z, AXIS: tl.constexpr):
    """``online_softmax_update`` without ``u`` (for log-probs only): the same ``(m, s)``, op for op."""
    m_new = tl.maximum(m, tl.max(z, axis=AXIS))
    m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # all -inf so far: shift by 0, not -inf
    e = tl.exp(z - tl.expand_dims(m_ref, AXIS))
    alpha = tl.exp(m - m_ref)  # 0 while m is -inf, and then s == 0 too
    s = alpha * s + tl.sum(e, axis=AXIS)
    return m_new, s


@triton.jit
def softmax_dlogits(z, is_label, row_max, log_norm, entropy, g_logp, g_entropy, inv_t_hi):
    """``dL/dx`` for ``z = x / T``, ``L = g_logp * logp_label + g_entropy * H``.

    With ``p = softmax(z)``, ``log p_v = (z_v - row_max) - log_norm`` and ``H = -sum_w p_w log p_w``::

        d logp_y / d z_v = [v == y] - p_v
        d H / d z_v      = -sum_w (log p_w + 1) p_w ([w == v] - p_v)
                         = -p_v (log p_v + 1) + p_v (1 - H)  =  -p_v (log p_v + H)
        dL/dx_v = ( g_logp ([v == y] - p_v) - g_H p_v (log p_v + H) ) / T

    Entries with ``p_v = 0`` (masked ones, ``z_v = -inf``, or finite ones whose ``log p_v`` overflows to
    ``-inf``) get exactly 0, not ``0 * -inf``. ``g_logp`` must be 0 for rows whose label is ignored.
    """
    logp_v = (z - row_max) - log_norm
    p = tl.exp(logp_v)
    g = -p * (g_logp + g_entropy * (logp_v + entropy))
    g = tl.where(p == 0.0, 0.0, g)
    g = tl.where(is_label, g + g_logp, g)
    return g * inv_t_hi  # the gradient scales by 1/T: a relative 6e-8 here is no bias worth a second term


@triton.jit
def logp_dlogits(z, is_label, row_max, log_norm, g_logp, inv_t_hi):
    """``softmax_dlogits`` with ``g_H = 0``: ``dL/dx_v = g_logp ([v == y] - p_v) / T``.

    A masked entry (``z_v = -inf``) has ``p_v = e^-inf = 0`` and gets 0 with no ``tl.where``: no entropy
    term multiplies ``log p_v = -inf`` here.
    """
    p = tl.exp((z - row_max) - log_norm)
    g = -p * g_logp
    g = tl.where(is_label, g + g_logp, g)
    return g * inv_t_hi


@triton.jit
def row_softmax_stats(row_ptr, V, inv_t_hi, inv_t_lo, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr = True):
    """Stream one contiguous row of ``V`` logits once: ``(row_max, log_norm, entropy)`` of ``softmax(x / T)``.

    ``log p_v = (z_v - row_max) - log_norm``, kept as two numbers: their rounded sum (the log-sum-exp)
    would lose up to half an ulp of the max, 5e-4 at logits near 1e4, which log_softmax does not lose.
    ``row_max`` is 0, not -inf, for a row with no finite entry (then ``log_norm = -inf``, entropy NaN).
    ``WITH_ENTROPY = False`` (log-probs only) streams ``online_logsumexp_update`` instead: the same
    ``row_max`` and ``log_norm`` with no ``u``; the third value is then no entropy and must not be used.
    """
    return row_softmax_stats_above(row_ptr, V, inv_t_hi, inv_t_lo, 0.0, BLOCK_V, WITH_ENTROPY, False)


@triton.jit
def row_softmax_stats_above(row_ptr, V, inv_t_hi, inv_t_lo, tau, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                            TRUNCATED: tl.constexpr):  # fmt: skip
    """``row_softmax_stats`` of the row's entries with ``z >= tau`` only (``TRUNCATED``; the others count as
    ``-inf``: truncated sampling, kernels/truncation.py); without ``TRUNCATED``, ``tau`` is unused and the
    code is ``row_softmax_stats``' own. ``z < tau`` rather than ``z >= tau`` decides, so NaN stays NaN."""
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")
    s = 0.0
    u = 0.0  # stays 0 without WITH_ENTROPY
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = scale_by_inverse(tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32), inv_t_hi, inv_t_lo)
        if TRUNCATED:
            z = tl.where(z < tau, -float("inf"), z)
        if WITH_ENTROPY:
            m, s, u = online_softmax_update(m, s, u, z, AXIS=0)
        else:
            m, s = online_logsumexp_update(m, s, z, AXIS=0)
    log_s = tl.log(s)
    return tl.where(m == -float("inf"), 0.0, m), log_s, log_s - u / s
