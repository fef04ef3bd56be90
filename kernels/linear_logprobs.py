"""Log-probs and entropy of ``softmax((hidden @ weight.T + bias) / T)`` without the ``[N, V]`` logits.

Forward: a grid of (row block, vocabulary split). Each program computes ``[BLOCK_N, BLOCK_V]`` logit tiles
with ``tl.dot`` (bf16/fp16 operands on the tensor cores, float32 accumulation; float32 operands in IEEE
float32) across its share of the vocabulary, and keeps per-row online statistics exactly as the
``rf.logprobs`` kernel does (running max from ``-inf``, ``s = sum e^(z-m)``, ``u = sum e^(z-m)(z-m)``)
plus the label logit, picked up from the tile that holds it. The splits' partial statistics
(``[SPLITS, N]`` each) are merged exactly afterwards (``merge_partials``): splitting the vocabulary gives
the GPU more programs than ``N / BLOCK_N``. The splits are fixed spans of the vocabulary, chosen without
looking at ``N``, and every tile size is a constant of the dtype: a row's log-prob and entropy are bitwise
the same whatever the batch around it (its size, order, neighbours; see README "Batch invariance").

Backward: per chunk of rows, a kernel recomputes the logit tiles and writes ``dlogits`` (same formula as
``rf.logprobs``) into a bounded ``[chunk, V]`` buffer in the input dtype; cuBLAS then forms
``d_hidden = dlogits @ W``, ``d_weight += dlogits^T @ hidden`` and ``d_bias += sum(dlogits)``. We chose
the bounded buffer over a fully fused backward because ``d_hidden`` needs a reduction over the whole
vocabulary and ``d_weight`` one over all rows: fusing both needs ``[BLOCK_N, H]`` accumulators (too big
at H = 4096) or atomics; two cuBLAS GEMMs run at the card's matmul rate with chunk-sized extra memory.

Both kernels have a log-probs-only specialisation (``WITH_ENTROPY = False``, chosen by passing ``None`` for
the entropy pointers, as ``rf.linear_logprobs`` does without ``return_entropy``): the forward forms no ``u``
(no ``e (z - m)`` products, their row sum or its rescale; one ``[BLOCK_N]`` accumulator fewer), the backward
reads no entropy statistics and writes ``g_logp ([v == y] - p_v) / T`` without the ``g_H p_v (log p_v + H)`` term.
"""

import itertools

import torch
import triton
import triton.language as tl

from . import INTERPRET
from ._common import interpreter_safe_output, inverse_parts, label_term
from ._softmax import logp_dlogits, online_logsumexp_update, online_softmax_update, scale_by_inverse, softmax_dlogits
from ._build import TL_DTYPE, KernelBuild, signature
from ._tuning import matmul_config

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _logit_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok,
    stride_h_n, stride_h_k, stride_w_v, stride_w_k, H, inv_t_hi, inv_t_lo,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``(hidden[rows] @ weight[cols].T + bias[cols]) / T`` as float32; columns past V are ``-inf``."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        k = k0 + ks
        k_ok = k < H
        h = tl.load(hidden_ptr + rows[:, None] * stride_h_n + k[None, :] * stride_h_k,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        w = tl.load(weight_ptr + cols[None, :] * stride_w_v + k[:, None] * stride_w_k,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # fmt: skip
        if UPCAST:  # the interpreter multiplies bf16/fp16 wrongly: give it float32 operands
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    # acc / T by the two-term inverse (kernels/_softmax.py); the matmul result is finite, so the tile needs
    # no infinity guard (which cost registers here), only the bias vector does.
    z = acc * inv_t_hi + acc * inv_t_lo
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        z += scale_by_inverse(bias, inv_t_hi, inv_t_lo)[None, :]
    return tl.where(col_ok[None, :], z, -float("inf"))


@triton.heuristics({
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "WITH_ENTROPY": lambda args: args["part_ent_ptr"] is not None,
})  # fmt: skip
@triton.jit
def _linear_logprobs_fwd_kernel(
    # pointers
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_ent_ptr,
    part_label_ptr,
    # strides
    stride_h_n,
    stride_h_k,
    stride_w_v,
    stride_w_k,
    # sizes
    N,
    V,
    H,
    v_per_split,
    # hyperparameters
    inv_t_hi,
    inv_t_lo,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    v_start = split * v_per_split
    v_end = tl.minimum(V, v_start + v_per_split)

    m = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)  # running max from -inf, never 0
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m) * (z - m); stays 0 without WITH_ENTROPY
    z_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < v_end
        z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok,
                        stride_h_n, stride_h_k, stride_w_v, stride_w_k, H, inv_t_hi, inv_t_lo,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)  # fmt: skip
        if WITH_ENTROPY:
            m, s, u = online_softmax_update(m, s, u, z, AXIS=1)
        else:
            m, s = online_logsumexp_update(m, s, z, AXIS=1)
        z_label += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)

    out = split.to(tl.int64) * N + rows
    tl.store(part_max_ptr + out, m, mask=row_ok)
    tl.store(part_sum_ptr + out, s, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(part_ent_ptr + out, u, mask=row_ok)
    tl.store(part_label_ptr + out, z_label, mask=row_ok)


@triton.heuristics({
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "WITH_ENTROPY": lambda args: args["entropy_ptr"] is not None,
})  # fmt: skip
@triton.jit
def _linear_logprobs_bwd_kernel(
    # pointers
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    row_max_ptr,
    log_norm_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_logits_ptr,
    # strides
    stride_h_n,
    stride_h_k,
    stride_w_v,
    stride_w_k,
    stride_g_n,
    # sizes (the rows of this launch are row_start .. row_start + N of the full batch)
    N,
    V,
    H,
    row_start,
    # hyperparameters
    inv_t_hi,
    inv_t_lo,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    # dL/dx from the saved row statistics (kernels/_softmax.py). grad_logp is 0 on ignored rows (the
    # launcher's caller sees to it).
    local = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = local < N
    col_ok = cols < V
    rows = row_start + local
    z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok,
                    stride_h_n, stride_h_k, stride_w_v, stride_w_k, H, inv_t_hi, inv_t_lo,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)  # fmt: skip
    row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    log_norm = tl.load(log_norm_ptr + rows, mask=row_ok, other=0.0)
    g_logp = tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    is_label = cols[None, :] == labels[:, None]

    if WITH_ENTROPY:
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        g_entropy = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)
        g = softmax_dlogits(z, is_label, row_max[:, None], log_norm[:, None], entropy[:, None], g_logp[:, None],
                            g_entropy[:, None], inv_t_hi)  # fmt: skip
    else:
        g = logp_dlogits(z, is_label, row_max[:, None], log_norm[:, None], g_logp[:, None], inv_t_hi)
    tl.store(grad_logits_ptr + local[:, None] * stride_g_n + cols[None, :],
             g.to(grad_logits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


# ------------------------------------------------------------------------------------------- launchers


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 operands: IEEE float32 products, as an unfused float32 matmul gives (no TF32 rounding)
    return "ieee" if dtype == torch.float32 else "tf32"


# Vocabulary columns per split of the forward on CUDA. A function of nothing but the device type, never of N:
# a row's statistics are merged from the same splits, in the same order, whatever the batch (batch invariance,
# README "Batch invariance"). 8192 gives V = 131072 16 splits: 1024 programs at N = 8192 (bf16 row blocks of
# 128), 128 at N = 1024; the merge is one short elementwise loop per split. Under the interpreter two
# vocabulary tiles a split, so that the tests' small vocabularies still exercise the merge.
_SPLIT_COLUMNS_CUDA = 8192


def _split_columns(V: int, block_v: int, device: torch.device) -> int:
    """Vocabulary columns per split (a multiple of ``block_v``), independent of the number of rows."""
    columns = _SPLIT_COLUMNS_CUDA if device.type == "cuda" else 2 * block_v
    return min(triton.cdiv(V, block_v), triton.cdiv(columns, block_v)) * block_v


def merge_partials(part_max, part_sum, part_ent, part_label):
    """Exact merge of per-split statistics ``[SPLITS, N]`` into ``(logp, entropy, row_max, log_norm)``.

    ``part_ent`` ``None`` (a log-probs-only forward): ``entropy`` is ``None``. The sums over the splits run in
    split order, one elementwise step per split: each row's result is the same whatever ``N`` (a reduction
    kernel over ``dim=0`` may change its order with the number of outputs on CUDA).
    """
    M = part_max.amax(0)  # exact: a maximum does not depend on the order
    M_ref = torch.where(M == -float("inf"), 0.0, M)
    alpha = torch.exp(part_max - M_ref)  # 0 for a split whose entries were all -inf (then s = u = 0)
    scaled_sum = alpha * part_sum
    S, z_label = scaled_sum[0].clone(), part_label[0].clone()
    for i in range(1, part_max.shape[0]):
        S += scaled_sum[i]
        z_label += part_label[i]
    log_norm = torch.log(S)
    logp = (z_label - M_ref) - log_norm
    if part_ent is None:
        return logp, None, M_ref, log_norm
    shift = torch.where(part_max == -float("inf"), 0.0, part_max - M_ref)
    scaled_ent = alpha * (part_ent + shift * part_sum)
    U = scaled_ent[0].clone()
    for i in range(1, part_max.shape[0]):
        U += scaled_ent[i]
    entropy = log_norm - U / S
    return logp, entropy, M_ref, log_norm


def linear_logprobs_forward(hidden, weight, bias, labels, temperature: float, with_entropy: bool = True):
    """``(logp, entropy, row_max, log_norm)`` for ``hidden [N, H]``, ``weight [V, H]``, ``labels [N]``.

    ``labels`` must be in ``[0, V)`` (the caller maps ignored rows to 0 and zeroes their ``logp``). Without
    ``with_entropy`` the kernel's log-probs-only specialisation runs and ``entropy`` is ``None``.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = matmul_config(hidden.dtype)
    v_per_split = _split_columns(V, cfg.BLOCK_V, hidden.device)
    splits = triton.cdiv(V, v_per_split)
    parts = torch.empty((4 if with_entropy else 3, splits, N), dtype=torch.float32, device=hidden.device)
    part_max, part_sum, part_label = parts[0], parts[1], parts[2]
    part_ent = parts[3] if with_entropy else None  # None: WITH_ENTROPY = False
    if N:
        _linear_logprobs_fwd_kernel[(triton.cdiv(N, cfg.BLOCK_N), splits)](
            hidden, weight, bias, labels, part_max, part_sum, part_ent, part_label,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            N, V, H, v_per_split,
            *inverse_parts(temperature),
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H, UPCAST=INTERPRET,
            DOT_PRECISION=_dot_precision(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return merge_partials(part_max, part_sum, part_ent, part_label)


# dlogits buffer of the backward: at most this many bytes (1 GiB: 3532 rows of a 151936-entry bf16 vocab).
_BWD_CHUNK_BYTES = 1 << 30


def linear_logprobs_backward(hidden, weight, bias, labels, row_max, log_norm, entropy, grad_logp, grad_entropy,
                             temperature: float, need_hidden: bool, need_weight: bool, need_bias: bool,
                             label_grad=None):  # fmt: skip
    """``(d_hidden, d_weight, d_bias)`` (``None`` where not needed) through a bounded dlogits buffer.

    ``entropy`` and ``grad_entropy`` ``None``: the gradient of the log-probs alone, by the kernel's
    ``WITH_ENTROPY = False`` specialisation. ``label_grad`` (float32 ``[N]``): what the label term adds at
    the label instead of ``grad_logp`` (kernels/_common.py ``label_term``), as in the PyTorch twin.

    ``d_weight`` accumulates chunk by chunk in the weight's dtype (cuBLAS accumulates each product in
    float32); one chunk covers ``_BWD_CHUNK_BYTES`` of dlogits, so bf16 rounds once per ~3.5k rows.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = matmul_config(hidden.dtype, backward=True)
    rows_per_chunk = max(cfg.BLOCK_N, _BWD_CHUNK_BYTES // (V * hidden.element_size()) // cfg.BLOCK_N * cfg.BLOCK_N)
    d_hidden = torch.empty((N, H), dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    d_weight = torch.zeros_like(weight) if need_weight else None
    d_bias = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_bias else None
    buf = torch.empty((min(rows_per_chunk, N), V), dtype=hidden.dtype, device=hidden.device)
    labels, extra = label_term(labels, grad_logp, label_grad, V, temperature)
    for r0 in range(0, N, rows_per_chunk):
        n = min(rows_per_chunk, N - r0)
        dlogits = buf[:n]
        g = interpreter_safe_output(dlogits)
        _linear_logprobs_bwd_kernel[(triton.cdiv(n, cfg.BLOCK_N), triton.cdiv(V, cfg.BLOCK_V))](
            hidden, weight, bias, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, g,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), g.stride(0),
            n, V, H, r0,
            *inverse_parts(temperature),
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H, UPCAST=INTERPRET,
            DOT_PRECISION=_dot_precision(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if g is not dlogits:
            dlogits.copy_(g)
        if extra is not None:
            columns, values = (t[r0 : r0 + n] for t in extra)
            rows = torch.arange(n, device=dlogits.device)
            dlogits.index_put_((rows, columns), values.to(dlogits.dtype), accumulate=True)
        if need_hidden:
            torch.mm(dlogits, weight, out=d_hidden[r0 : r0 + n])
        if need_weight:
            d_weight.addmm_(dlogits.t(), hidden[r0 : r0 + n])
        if need_bias:
            d_bias += dlogits.sum(0, dtype=torch.float32)
    return d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype)


# ------------------------------------------------------------------------- ahead-of-time build specs


def build_specs():
    """Forward and backward for each operand dtype, with and without bias, with and without entropy (see
    kernels/_aot.py)."""
    specs = []
    for (dtype, t), backward, has_bias, with_entropy in itertools.product(
        TL_DTYPE.items(), (False, True), (True, False), (True, False)
    ):
        cfg = matmul_config(dtype, backward)
        in_dtype = ("hidden_ptr", "weight_ptr", "bias_ptr")
        if backward:
            kernel = _linear_logprobs_bwd_kernel
            in_dtype += ("grad_logits_ptr",)
            entropy_ptrs = ("entropy_ptr", "grad_entropy_ptr")
        else:
            kernel = _linear_logprobs_fwd_kernel
            entropy_ptrs = ("part_ent_ptr",)
        # Contiguous hidden and weight: Triton's launcher specializes their unit inner strides to 1.
        constexprs = {"BLOCK_N": cfg.BLOCK_N, "BLOCK_V": cfg.BLOCK_V, "BLOCK_H": cfg.BLOCK_H, "HAS_BIAS": has_bias,
                      "UPCAST": False, "DOT_PRECISION": _dot_precision(dtype), "WITH_ENTROPY": with_entropy,
                      "stride_h_k": 1, "stride_w_k": 1}  # fmt: skip
        if not has_bias:
            constexprs["bias_ptr"] = None
        if not with_entropy:  # the log-probs-only specialisation gets None entropy pointers, as launched
            constexprs.update(dict.fromkeys(entropy_ptrs))
        sig = signature(kernel, constexprs, labels_ptr="*i64", **dict.fromkeys(in_dtype, f"*{t}"))
        divisible = ("stride_h_n", "stride_w_v", "stride_g_n", "V", "H", "v_per_split")
        specs.append(
            KernelBuild(
                kernel=kernel,
                signature=sig,
                constexprs=constexprs,
                divisible=[n for n, ty in sig.items() if ty.startswith("*") or n in divisible],
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                tensor_cores=dtype != torch.float32,
                label=f"{t} {'bias' if has_bias else 'no bias'} {'entropy' if with_entropy else 'logp only'} "
                f"{cfg.BLOCK_N}x{cfg.BLOCK_V}x{cfg.BLOCK_H}",
            )
        )
    return specs
