"""The pairwise (Bradley-Terry) sigmoid loss, its derivative and the batch statistics in one launch.

Per pair ``i``, with ``d_i = chosen_i - rejected_i`` and ``x_i = beta * d_i - margin_i``::

    loss_i = -log sigmoid(x_i) = softplus(-x_i) = max(-x_i, 0) + log1p(e^(-|x_i|))
    d loss_i / d x_i = -sigmoid(-x_i) = -(x_i >= 0 ? e^(-|x_i|) : 1) / (1 + e^(-|x_i|))

Only ``e^(-|x|) <= 1`` is ever formed, so nothing overflows: a pair 400 logits apart has loss 400 (or 0)
and derivative -1 (or 0), not ``inf`` or NaN. ``log1p`` is written out (the Triton interpreter has no
libdevice) as ``log(u) * e / (u - 1)`` with ``u = 1 + e``, which is exact to a few ulps for small ``e``
where ``log(u)`` alone returns 0 (Goldberg's trick). Both gradients follow from the one derivative:
``d loss / d chosen = beta * dloss/dx``, ``d loss / d rejected = -beta * dloss/dx``,
``d loss / d margin = -dloss/dx``, so the kernel saves that one float32 number per pair and backward
scales it by ``grad_output`` (and ``1 / N`` for a mean).

The same program also sums the losses (for ``mean``/``sum``), the pairs with ``chosen > rejected``
(ranking accuracy) and ``d`` (the mean reward margin). NaN in a pair makes its loss, derivative and both
statistics NaN: nothing hides it.
"""

import torch
import triton
import triton.language as tl

from ._build import TL_DTYPE, kernel_build
from ._tuning import pair_config

# --------------------------------------------------------------------------------------------- kernels


@triton.heuristics({"HAS_MARGIN": lambda args: args["margin_ptr"] is not None})
@triton.jit
def _pairwise_sigmoid_kernel(
    # pointers: inputs (contiguous [N])
    chosen_ptr,
    rejected_ptr,
    margin_ptr,
    # pointers: outputs (float32: [N], [N], one number, two numbers)
    loss_ptr,
    dloss_dx_ptr,
    total_ptr,
    metrics_ptr,
    # sizes
    N,
    # hyperparameters
    beta,
    margin,
    total_scale,
    # meta-parameters
    HAS_MARGIN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program: a preference batch is small, and one program's sums need no second pass (kernels/_tuning.py).
    cols = tl.arange(0, BLOCK)
    acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
    acc_correct = tl.zeros([BLOCK], dtype=tl.float32)
    acc_diff = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + cols
        live = offs < N
        c = tl.load(chosen_ptr + offs, mask=live, other=0.0).to(tl.float32)
        r = tl.load(rejected_ptr + offs, mask=live, other=0.0).to(tl.float32)
        diff = c - r
        x = beta * diff - margin
        if HAS_MARGIN:
            x = x - tl.load(margin_ptr + offs, mask=live, other=0.0).to(tl.float32)
        # the formulas of the module docstring; NaN x gives NaN through e (x < 0 is false for NaN)
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        u_minus_1 = u - 1.0  # 0 where e is below float32 rounding of 1 + e: there log1p(e) = e
        log1p_e = tl.where(u_minus_1 == 0.0, e, tl.log(u) * (e / tl.where(u_minus_1 == 0.0, 1.0, u_minus_1)))
        loss = tl.where(x < 0, -x, 0.0) + log1p_e
        dloss_dx = -tl.where(x < 0, 1.0, e) / u
        tl.store(loss_ptr + offs, loss, mask=live)
        tl.store(dloss_dx_ptr + offs, dloss_dx, mask=live)
        # accuracy counts chosen > rejected; a NaN difference counts NaN
        correct = tl.where(diff != diff, diff, tl.where(diff > 0, 1.0, 0.0))
        acc_loss += tl.where(live, loss, 0.0)
        acc_correct += tl.where(live, correct, 0.0)
        acc_diff += tl.where(live, diff, 0.0)
    n = N.to(tl.float32)
    tl.store(total_ptr, tl.sum(acc_loss, axis=0) * total_scale)
    tl.store(metrics_ptr, tl.sum(acc_correct, axis=0) / n)
    tl.store(metrics_ptr + 1, tl.sum(acc_diff, axis=0) / n)


# ------------------------------------------------------------------------------------------- launchers


def pairwise_sigmoid_forward(chosen, rejected, margin_t, beta: float, margin: float, total_scale: float):
    """``(loss [N], dloss_dx [N], total [], metrics [2])``, float32, for ``[N]`` pairs.

    ``chosen``, ``rejected`` and the optional per-pair ``margin_t`` are ``[N]`` float tensors (any of the
    three float dtypes each; strided ones are copied, ``N`` numbers). ``total`` is ``total_scale`` times
    the sum of the losses; ``metrics`` holds the ranking accuracy and the mean of ``chosen - rejected``
    (NaN, as means of nothing, when ``N == 0``).
    """
    chosen, rejected = chosen.contiguous(), rejected.contiguous()
    margin_t = None if margin_t is None else margin_t.contiguous()
    N = chosen.shape[0]
    loss = torch.empty(N, dtype=torch.float32, device=chosen.device)
    dloss_dx = torch.empty_like(loss)
    total = torch.empty((), dtype=torch.float32, device=chosen.device)
    metrics = torch.empty(2, dtype=torch.float32, device=chosen.device)
    if N == 0:
        return loss, dloss_dx, total.zero_(), metrics.fill_(float("nan"))
    cfg = pair_config(N)
    _pairwise_sigmoid_kernel[(1,)](
        chosen, rejected, margin_t,
        loss, dloss_dx, total, metrics,
        N,
        beta, margin, total_scale,
        BLOCK=cfg.BLOCK, num_warps=cfg.num_warps,
    )  # fmt: skip
    return loss, dloss_dx, total, metrics


# ------------------------------------------------------------------------- ahead-of-time build specs


def build_specs():
    """One build per input dtype, with and without a per-pair margin, at a large and a small batch.

    ``N`` is marked divisible by 16, as Triton's launcher specializes it at the usual batch sizes: then
    the loads and stores are 8- and 16-byte vectors (the build check asserts it).
    """
    specs = []
    for tl_dtype in TL_DTYPE.values():
        for has_margin in (True, False):
            for cfg in sorted({pair_config(N) for N in (4096, 256)}, key=lambda c: c.BLOCK):
                constexprs = {"HAS_MARGIN": has_margin, "BLOCK": cfg.BLOCK}
                types = dict.fromkeys(("chosen_ptr", "rejected_ptr", "margin_ptr"), f"*{tl_dtype}")
                specs.append(kernel_build(_pairwise_sigmoid_kernel, constexprs, types, sizes=("N",),
                                          absent=() if has_margin else ("margin_ptr",), num_warps=cfg.num_warps, streams_rows=True, streams_out=True,
                                          label=f"{tl_dtype} BLOCK={cfg.BLOCK} margin={has_margin}"))  # fmt: skip
    return specs
