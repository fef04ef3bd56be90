"""Per-token log-probs and entropy of ``softmax(logits / T)``, forward and backward, one pass over each row.

Layout: the launchers take the logits as a ``[B, T, V]`` view whose last dimension is contiguous and whose
two leading strides are free, so that the common ``logits[:, :-1, :]`` slice is read in place instead of
copied. Row ``r`` of the flattened ``[B*T]`` outputs is ``(b, t) = divmod(r, T)``.

Forward, per row (``z = x / T``), with a running max ``m`` started at ``-inf``::

    s = sum_v exp(z_v - m)                      (rescaled by exp(m_old - m_new) when m grows)
    u = sum_v exp(z_v - m) * (z_v - m)          (rescaled likewise, plus (m_old - m_new) * s)
    log p_v = (z_v - m) - log(s)
    H   = -sum_v p_v log p_v = log(s) - u / s

Keeping ``u`` relative to the running max (instead of ``sum p_v z_v``) avoids the cancellation
``lse - E[z]`` for large logits. Entries equal to ``-inf`` (masked vocabulary) have ``p_v = 0`` and add
nothing to ``s`` or ``u``; the ``0 * -inf`` products they would create are replaced by 0 explicitly, so
NaN can only come from NaN in the input. Backward needs only ``m``, ``log(s)`` and ``H`` per row
(12 bytes), never the softmax.

Both kernels have a log-probs-only specialisation (``WITH_ENTROPY = False``, chosen by passing ``None`` for
the entropy pointers, as ``rf.logprobs`` does without ``return_entropy``): the forward forms no ``u`` (no
``e (z - m)`` products or their sum), the backward reads no entropy statistics and writes
``g_logp ([v == y] - p_v) / T`` without the ``g_H p_v (log p_v + H)`` term.

Truncated sampling (``TRUNCATED``, chosen by passing a ``tau`` pointer): each row's threshold ``tau``
(kernels/truncation.py) makes every entry with ``z < tau`` count as ``-inf``: the statistics, log-probs and
gradient are those of the renormalised kept set; a label below ``tau`` gets log-prob ``-inf`` and its row no
log-prob gradient (its ``g_logp`` is taken as 0), so no NaN.
"""

import itertools

import torch
import triton
import triton.language as tl

from ._build import TL_DTYPE, kernel_build
from ._common import interpreter_safe_output, inverse_parts, label_term
from ._softmax import logp_dlogits, row_softmax_stats_above, scale_by_inverse, softmax_dlogits
from ._tuning import row_config

# --------------------------------------------------------------------------------------------- kernels


@triton.heuristics({"WITH_ENTROPY": lambda args: args["entropy_ptr"] is not None})
@triton.heuristics({"TRUNCATED": lambda args: args["tau_ptr"] is not None})
@triton.jit
def _logprobs_fwd_kernel(
    # pointers
    logits_ptr,
    labels_ptr,
    logp_ptr,
    entropy_ptr,
    row_max_ptr,
    log_norm_ptr,
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
    ignore_index,
    # meta-parameters
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    TRUNCATED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    row_ptr = logits_ptr + b * stride_logits_b + t * stride_logits_t
    if TRUNCATED:
        tau = tl.load(tau_ptr + row)
    else:
        tau = 0.0  # unused
    m_ref, log_s, entropy = row_softmax_stats_above(row_ptr, V, inv_t_hi, inv_t_lo, tau, BLOCK_V, WITH_ENTROPY, TRUNCATED)

    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    safe_label = tl.where(ignored, 0, label)
    z_label = scale_by_inverse(tl.load(row_ptr + safe_label).to(tl.float32), inv_t_hi, inv_t_lo)
    logp = (z_label - m_ref) - log_s
    if TRUNCATED:
        logp = tl.where(z_label < tau, -float("inf"), logp)  # the label is outside the kept set
    logp = tl.where(ignored, 0.0, logp)

    tl.store(logp_ptr + row, logp)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)
    tl.store(row_max_ptr + row, m_ref)
    tl.store(log_norm_ptr + row, log_s)


@triton.heuristics({"WITH_ENTROPY": lambda args: args["entropy_ptr"] is not None})
@triton.heuristics({"TRUNCATED": lambda args: args["tau_ptr"] is not None})
@triton.jit
def _logprobs_bwd_kernel(
    # pointers
    logits_ptr,
    labels_ptr,
    row_max_ptr,
    log_norm_ptr,
    entropy_ptr,
    tau_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_logits_ptr,
    # strides of the [B, T, V] logits and of the [B, T, V] gradient (last strides are 1)
    stride_logits_b,
    stride_logits_t,
    stride_grad_b,
    stride_grad_t,
    # sizes
    T,
    V,
    # hyperparameters
    inv_t_hi,
    inv_t_lo,
    ignore_index,
    # meta-parameters
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    TRUNCATED: tl.constexpr,
):
    # dL/dx from the saved row statistics: formula and derivation in kernels/_softmax.py.
    # The gradient may alias the logits (in-place backward): each element is read before it is written.
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    row_ptr = logits_ptr + b * stride_logits_b + t * stride_logits_t
    grad_row_ptr = grad_logits_ptr + b * stride_grad_b + t * stride_grad_t
    cols = tl.arange(0, BLOCK_V)

    row_max = tl.load(row_max_ptr + row)
    log_norm = tl.load(log_norm_ptr + row)
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    g_logp = tl.where(ignored, 0.0, tl.load(grad_logp_ptr + row).to(tl.float32))
    if TRUNCATED:
        tau = tl.load(tau_ptr + row)
        # label V: a row whose label term label_term moved out of the kernel (a vocabulary slice that does not
        # own the label): no column to read; the caller drops the gradient of a label outside the kept set
        moved = label >= V
        z_label = scale_by_inverse(tl.load(row_ptr + tl.where(ignored | moved, 0, label)).to(tl.float32), inv_t_hi, inv_t_lo)
        g_logp = tl.where((z_label < tau) & ~moved, 0.0, g_logp)  # a missed label: log-prob -inf, a constant
    if WITH_ENTROPY:
        entropy = tl.load(entropy_ptr + row)
        g_entropy = tl.load(grad_entropy_ptr + row).to(tl.float32)

    for start in range(0, V, BLOCK_V):
        offs = start + cols
        in_row = offs < V
        z = scale_by_inverse(tl.load(row_ptr + offs, mask=in_row, other=-float("inf")).to(tl.float32), inv_t_hi, inv_t_lo)
        if TRUNCATED:
            z = tl.where(z < tau, -float("inf"), z)
        if WITH_ENTROPY:
            g = softmax_dlogits(z, offs == label, row_max, log_norm, entropy, g_logp, g_entropy, inv_t_hi)
        else:
            g = logp_dlogits(z, offs == label, row_max, log_norm, g_logp, inv_t_hi)
        tl.store(grad_row_ptr + offs, g.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


# ------------------------------------------------------------------------------------------- launchers


def logprobs_forward(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                     with_entropy: bool = True, tau: torch.Tensor | None = None):  # fmt: skip
    """Log-probs, entropy and log-sum-exp of ``logits / temperature``.

    ``logits``: ``[B, T, V]`` with ``stride(-1) == 1``; ``labels``: ``[B*T]`` contiguous integers.
    Returns four contiguous float32 ``[B*T]`` tensors ``(logp, entropy, row_max, log_norm)``: the
    log-sum-exp of ``logits / temperature`` is ``row_max + log_norm``, kept as two numbers so that
    :func:`logprobs_backward` can form ``log p = (z - row_max) - log_norm`` without rounding the sum.
    Without ``with_entropy`` the kernel's log-probs-only specialisation runs and ``entropy`` is ``None``.
    ``tau`` (contiguous float32 ``[B*T]``, kernels/truncation.py): the truncated specialisation.
    """
    B, T, V = logits.shape
    N = B * T
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp) if with_entropy else None  # None: WITH_ENTROPY = False
    row_max = torch.empty_like(logp)
    log_norm = torch.empty_like(logp)
    if N == 0:
        return logp, entropy, row_max, log_norm
    cfg = row_config(V, logits.element_size())
    _logprobs_fwd_kernel[(N,)](
        logits, labels, logp, entropy, row_max, log_norm, tau,
        logits.stride(0), logits.stride(1),
        T, V,
        *inverse_parts(temperature), ignore_index,
        BLOCK_V=cfg.BLOCK_V, num_warps=cfg.num_warps,
    )  # fmt: skip
    return logp, entropy, row_max, log_norm


def logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_norm: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    grad_logits: torch.Tensor | None = None,
    label_grad: torch.Tensor | None = None,
    tau: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient with respect to ``logits`` (``[B, T, V]``) of ``sum(grad_logp * logp + grad_entropy * H)``.

    ``grad_logp``/``grad_entropy``: contiguous float32 ``[B*T]``. ``entropy`` and ``grad_entropy`` both
    ``None``: the gradient of the log-probs alone, by the kernel's ``WITH_ENTROPY = False`` specialisation.
    The gradient is written into ``grad_logits`` when given (any ``[B, T, V]`` tensor with
    ``stride(-1) == 1``; it may be ``logits`` itself for an in-place backward), else into a new contiguous
    tensor of the logits' dtype. ``label_grad`` (float32 ``[B*T]``): what the label term adds at the label
    instead of ``grad_logp`` (kernels/_common.py ``label_term``), as in the PyTorch twin. ``tau``: as in :func:`logprobs_forward`.
    """
    B, T, V = logits.shape
    if grad_logits is None:
        grad_logits = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    if B * T == 0:
        return grad_logits
    labels, extra = label_term(labels, grad_logp, label_grad, V, temperature, ignore_index)
    out = interpreter_safe_output(grad_logits)
    cfg = row_config(V, logits.element_size())
    _logprobs_bwd_kernel[(B * T,)](
        logits, labels, row_max, log_norm, entropy, tau, grad_logp, grad_entropy, out,
        logits.stride(0), logits.stride(1), out.stride(0), out.stride(1),
        T, V,
        *inverse_parts(temperature), ignore_index,
        BLOCK_V=cfg.BLOCK_V, num_warps=cfg.num_warps,
    )  # fmt: skip
    if out is not grad_logits:
        grad_logits.copy_(out)
    if extra is not None:
        rows = torch.arange(B * T, device=labels.device)
        columns, values = extra
        grad_logits.index_put_((rows // T, rows % T, columns), values.to(grad_logits.dtype), accumulate=True)
    return grad_logits


# ------------------------------------------------------------------------- ahead-of-time build specs

def build_specs():
    """What the launchers compile, for the Hopper build check: one entry per kernel, dtype, config and
    entropy specialisation (with the entropy, and log-probs only) and truncation (with a ``tau``, or none).

    Sizes are typical (V a multiple of 16, 16-byte aligned rows), which is how Triton's launcher
    specializes them at real shapes: pointers and 16-divisible integers get ``tt.divisibility=16``.
    """
    specs = []
    for (dtype, tl_dtype), with_entropy, truncated in itertools.product(TL_DTYPE.items(), (True, False), (False, True)):
        configs = {row_config(V, dtype.itemsize) for V in (151936, 1024, 128)}
        for cfg in sorted(configs, key=lambda c: c.BLOCK_V):
            # The forward's one narrow load is the label logit (the truncated backward's too); the backward
            # streams dlogits out.
            for kernel, in_dtype, narrow, streams_out in (
                (_logprobs_fwd_kernel, ("logits_ptr",), 1, False),
                (_logprobs_bwd_kernel, ("logits_ptr", "grad_logits_ptr"), int(truncated), True),
            ):
                constexprs = {"BLOCK_V": cfg.BLOCK_V, "WITH_ENTROPY": with_entropy, "TRUNCATED": truncated}
                # as launched: untruncated, a None tau pointer; log-probs only, None entropy pointers
                absent = () if truncated else ("tau_ptr",)
                if not with_entropy:
                    absent += tuple(n for n in ("entropy_ptr", "grad_entropy_ptr") if n in kernel.arg_names)
                types = {"labels_ptr": "*i64", **dict.fromkeys(in_dtype, f"*{tl_dtype}")}
                label = f"{tl_dtype} {'entropy' if with_entropy else 'logp only'} BLOCK_V={cfg.BLOCK_V}"
                specs.append(kernel_build(kernel, constexprs, types, sizes=("V",), absent=absent, num_warps=cfg.num_warps,
                                          streams_rows=cfg.BLOCK_V >= 1024, narrow_loads=narrow,
                                          streams_out=streams_out and cfg.BLOCK_V >= 1024,
                                          label=label + (" truncated" if truncated else "")))  # fmt: skip
    return specs
