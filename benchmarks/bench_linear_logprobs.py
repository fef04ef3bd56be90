"""``rf.linear_logprobs`` (per-token log-probs and entropy of ``softmax(hidden @ weight.T)`` without the
``[N, V]`` logits) against the lm_head + log-softmax trainers write, ``torch.compile`` of it, and the fused
linear + cross-entropy ops of Liger-Kernel, cut-cross-entropy (CCE) and TRL.

    python -m benchmarks.bench_linear_logprobs           # CPU: 4096x256x50000 float32; CUDA: bf16, V = 151936 and 32000
    python -m benchmarks.bench_linear_logprobs --shapes 512x128x8000 --modes full --methods rlhf_fast,naive --no-save

Shapes are ``NxHxV``. Every method gets the same ``hidden [N, H]`` and ``weight [V, H]`` (both requiring grad)
and ``[N]`` int64 labels (none ignored); backward differentiates every output that requires grad with respect to
``hidden`` and ``weight``. Methods without an entropy output (Liger, CCE) compute the log-probs only, as ``-``
their per-token cross-entropy (``reduction="none"``, no label shift): a smaller backward (one output gradient).

Work is counted in matmul passes of ``2·N·H·V`` FLOPs each: the forward needs one (the logits), the backward
two (``d_hidden = dlogits @ W`` and ``d_weight = dlogits^T @ hidden``); methods that do not keep the ``[N, V]``
logits recompute them in backward (a third pass). TFLOP/s counts the passes the method performs
(:data:`MATMUL_PASSES`), so it says how fast its matmuls run; ``time ÷ naive`` compares the methods' total cost.
Results go to ``benchmarks/results/<device>/linear_logprobs.{json,md,png}``; the harness
(``benchmarks/harness.py``) describes how time and memory are measured.
"""

import functools
from collections.abc import Iterator

import torch

import rlhf_fast as rf
from rlhf_fast.reference import logprobs_reference

from . import harness

# TRL's default vocabulary tile (``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE``, what its fused lm_head uses).
_TRL_CHUNK_SIZE = 32768

# ------------------------------------------------------------------------------------------- methods


def _rlhf_fast(return_entropy=True):
    return lambda hidden, weight, labels: rf.linear_logprobs(hidden, weight, labels, return_entropy=return_entropy)


def _naive(hidden, weight, labels):
    # The trainer's composition: the lm_head matmul in the input dtype, then the tests' baseline
    # (log_softmax(x.float()).gather, entropy from its exp), every [N, V] intermediate kept for backward.
    return logprobs_reference(hidden @ weight.t(), labels, mask_zero_probs=False)


def _make_naive():
    return _naive


def _naive_logp(hidden, weight, labels):
    # Log-probs only, as SFT and DPO trainers write it: log_softmax of the lm_head's logits, gathered.
    return torch.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _make_liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    # reduction="none": per-token NLL = -log p(label). With inputs requiring grad, Liger (>= 0.6) defers the
    # gradient to backward, recomputing the chunked logits there (its mean/sum path computes it in forward).
    return lambda hidden, weight, labels: -liger_fused_linear_cross_entropy(hidden, weight, labels, reduction="none")


def _make_cce(filter_eps="high"):
    from cut_cross_entropy import linear_cross_entropy

    # shift=False: the loss at position i is for labels[i] (as here), not labels[i + 1]. On CUDA CCE's own
    # Triton kernels; elsewhere its torch.compile fallback (which builds the [N, V] logits).
    def cce(hidden, weight, labels):
        impl = "cce" if hidden.is_cuda else "torch_compile"
        return -linear_cross_entropy(
            hidden, weight, labels, reduction="none", shift=False, filter_eps=filter_eps, impl=impl
        )

    return cce


def _make_trl_chunked():
    from trl.kernels import ChunkedLogProbFunction

    def trl_chunked(hidden, weight, labels):
        # forward(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale,
        # outputs) -> (logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1); only entropy asked for.
        logp, entropy, *_ = ChunkedLogProbFunction.apply(
            hidden, weight, None, labels, 1.0, _TRL_CHUNK_SIZE, None, 1.0, ("entropy",)
        )
        return logp, entropy

    return trl_chunked


METHODS = (
    harness.Method(
        "rlhf_fast",
        _rlhf_fast,
        "`rf.linear_logprobs(hidden, weight, labels, return_entropy=True)`, impl auto: Triton on CUDA (fused "
        "forward; backward recomputes logit tiles into a bounded dlogits buffer, then two cuBLAS products), "
        "chunked PyTorch on CPU (the same three passes per chunk of rows). Log-probs and entropy.",
    ),
    harness.Method(
        "rlhf_fast_logp",
        lambda: _rlhf_fast(return_entropy=False),
        "`rf.linear_logprobs(hidden, weight, labels)`: log-probs only (no entropy work forward or backward), "
        "as SFT and DPO call it.",
        note="logp only, no entropy",
    ),
    harness.Method(
        "naive_logp",
        lambda: _naive_logp,
        "`log_softmax((hidden @ weight.T).float()).gather(labels)`: log-probs only, the [N, V] logits and "
        "log-softmax kept for backward.",
        note="logp only, no entropy",
    ),
    harness.Method(
        "naive",
        _make_naive,
        "`logprobs_reference(hidden @ weight.T, labels, mask_zero_probs=False)`: the lm_head matmul, then "
        "`log_softmax(logits.float()).gather` and entropy from `exp(logp) * logp` (the tests' baseline). Log-probs "
        "and entropy; keeps the [N, V] logits and their float32 intermediates for backward.",
    ),
    harness.torch_compile_method(_naive, of="naive", more=" Log-probs and entropy."),
    harness.Method(
        "liger_flce",
        _make_liger,
        "`-liger_kernel.transformers.functional.liger_fused_linear_cross_entropy(hidden, weight, labels, "
        "reduction='none')`: log-probs only. Chunks of rows: cuBLAS logits, a Triton cross-entropy kernel; with "
        "reduction='none' the backward reruns the chunked forward with gradients (logits recomputed). Triton "
        "only, so CUDA only; its weight gradient accumulates in the weight's dtype.",
        devices=("cuda",),
        requires=("liger_kernel", "triton"),
        note="logp only, no entropy",
    ),
    harness.Method(
        "cce",
        _make_cce,
        "`-cut_cross_entropy.linear_cross_entropy(hidden, weight, labels, reduction='none', shift=False, "
        "filter_eps='high')` (its defaults, with the label shift off so that position i scores labels[i]): "
        "log-probs only. CUDA: `impl='cce'` (Triton: fused log-sum-exp forward; the backward recomputes logit "
        "tiles and skips the gradient products of tiles whose gradient is all below filter_eps = bf16 eps/32, "
        "so its work depends on the data; backward needs bf16/fp16 hidden). CPU: `impl='torch_compile'`, "
        "which compiles `hidden @ weight.T` + `cross_entropy` and keeps the [N, V] logits (no recompute).",
        requires=("cut_cross_entropy",),
        note="logp only, no entropy",
        first_call_note="compile",
    ),
    harness.Method(
        "cce_exact",
        lambda: _make_cce(filter_eps=None),
        "the same CCE kernels with `filter_eps=None`: every gradient tile computed (exact gradient, fixed work).",
        devices=("cuda",),
        requires=("cut_cross_entropy", "triton"),
        note="logp only, no entropy",
        first_call_note="compile",
    ),
    harness.Method(
        "trl_chunked",
        _make_trl_chunked,
        f"`trl.kernels.ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, {_TRL_CHUNK_SIZE}, None, "
        "1.0, ('entropy',))`: log-probs and entropy, the function behind TRL's fused lm_head. Tiles of 4096 "
        f"tokens x {_TRL_CHUNK_SIZE} vocabulary entries: cuBLAS products, folded by a Triton kernel on CUDA and by "
        "torch ops on CPU; backward recomputes each tile and accumulates both gradients in float32.",
        requires=("trl",),
    ),
)

# --------------------------------------------------------------------------------- inputs, work


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    if len(shape) != 3:
        raise ValueError(f"linear_logprobs shapes are NxHxV, got {harness.format_shape(shape)}")
    N, H, V = shape
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn((N, H), generator=gen, dtype=dtype, device=device).requires_grad_(True)
    # Weight scaled by 1/sqrt(H): logits of unit variance, as an initialized lm_head gives.
    weight = torch.randn((V, H), generator=gen, dtype=dtype, device=device).mul_(H**-0.5).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    return {"hidden": hidden, "weight": weight, "labels": labels}


# Matmul passes (2·N·H·V FLOPs each) per method: (forward, backward); full is the sum. The op needs (1, 2).
MATMUL_PASSES = {
    "rlhf_fast": (1, 3),  # backward: recompute the logits, d_hidden, d_weight
    "rlhf_fast_logp": (1, 3),
    "naive": (1, 2),  # the logits are kept: backward is d_hidden, d_weight
    "naive_logp": (1, 2),
    "torch_compile": (1, 2),  # Inductor's partitioner saves matmul outputs rather than recomputing them
    "liger_flce": (1, 3),  # reduction="none": backward reruns the chunked forward (recompute) with gradients
    "cce": (1, 3),  # CUDA: recompute + 2, minus filtered tiles (an upper bound); CPU (torch_compile): see below
    "cce_exact": (1, 3),
    "trl_chunked": (1, 3),
}
_CPU_PASSES = {"cce": (1, 2)}  # CCE's torch.compile fallback keeps the logits like naive


def matmul_passes(r: dict) -> int:
    forward, backward = (_CPU_PASSES if r["device"] == "cpu" else {}).get(r["method"], MATMUL_PASSES[r["method"]])
    return {"forward": forward, "backward": backward, "full": forward + backward}[r["mode"]]


def flops(r: dict) -> float:
    N, H, V = r["shape"]
    return matmul_passes(r) * 2.0 * N * H * V


def cpu_matmul_rates(shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, float]:
    """The machine's rate for the op's three products at full size, in the layouts every method uses:
    logits ``hidden @ weight.T``, ``d_hidden = dlogits @ weight``, ``d_weight = dlogits.T @ hidden``."""
    N, H, V = shape
    hidden, weight = torch.randn(N, H, dtype=dtype), torch.randn(V, H, dtype=dtype)
    dlogits = torch.randn(N, V, dtype=dtype)
    return {
        "logits": harness.matmul_gflops(hidden, weight.t()),
        "d_hidden": harness.matmul_gflops(dlogits, weight),
        "d_weight": harness.matmul_gflops(dlogits.t(), hidden),
    }


def _passes_cell(r: dict) -> str:
    n = matmul_passes(r)
    return f"≤{n}" if r["method"] == "cce" and r["device"] == "cuda" and r["mode"] != "forward" else str(n)


# ----------------------------------------------------------------------------------------- summary


# The CPU bars of the PyTorch implementation (issue 17), forward + backward: (ours, theirs, the most of their
# time ours may take, cold and warm; the most of their peak extra memory, or None).
_CPU_BARS = (
    ("rlhf_fast", "naive", 0.7, 0.2),  # with entropy
    ("rlhf_fast_logp", "naive_logp", 1.0, 0.2),  # log-probs only
    ("rlhf_fast_logp", "cce", 1.3, 0.35),  # log-probs only, against cut-cross-entropy's compiled CPU path
)


def _ratio_text(r: dict, p: dict, key: str) -> tuple[float | None, str]:
    if r.get(key) is None or not p.get(key):
        return None, "—"
    x = r[key] / p[key]
    return x, f"{x:.2f}x"


def summarize(results: list[dict]) -> Iterator[str]:
    """Each rlhf_fast method against naive and every peer, forward + backward, cold and warm; on CPU, the bars
    (issue 17)."""
    ok = {(tuple(r["shape"]), r["method"]): r for r in results if r.get("mode") == "full" and r["status"] == "ok"}
    for (shape, method), r in ok.items():
        if not method.startswith("rlhf_fast"):
            continue
        for (shape2, peer), p in ok.items():
            if shape2 != shape or peer.startswith("rlhf_fast") or (peer.endswith("_logp") != method.endswith("_logp")
                                                                       and peer != "cce"):  # fmt: skip
                continue
            t, t_text = _ratio_text(r, p, "median_ms")
            w, w_text = _ratio_text(r, p, "warm_median_ms")
            m, m_text = _ratio_text(r, p, "peak_extra_mib")
            line = (f"{harness.format_shape(shape)} {r['dtype']} {method} vs {peer}, forward+backward: {t_text} its time cold, {w_text} "
                    f"warm, {m_text} its peak extra memory ({r['median_ms']:.0f} vs {p['median_ms']:.0f} ms, "
                    f"{r['peak_extra_mib']:.0f} vs {p['peak_extra_mib']:.0f} MiB)")  # fmt: skip
            bar = next((b for b in _CPU_BARS if b[:2] == (method, peer)), None) if r["device"] == "cpu" else None
            if bar is not None:
                met = t is not None and t <= bar[2] and (w is None or w <= bar[2]) and (m is None or m <= bar[3])
                line += ": " + harness.verdict(met, f"the CPU bar (<= {bar[2]}x time cold and warm, "
                                                    f"<= {bar[3]}x memory)")  # fmt: skip
            yield line


BENCHMARK = harness.declare(
    globals(),
    name="linear_logprobs",
    title="`rf.linear_logprobs(hidden [N, H], weight [V, H], labels [N], return_entropy=True)`: per-token "
    "log-probs and entropy of the lm_head's softmax without the [N, V] logits, against the naive lm_head + "
    "log-softmax, torch.compile, Liger-Kernel, cut-cross-entropy and TRL.",
    grad_inputs=("hidden", "weight"),
    default_shapes={
        "cpu": ((4096, 256, 50000),),
        "cuda": ((8192, 4096, 151936), (8192, 4096, 32000)),
    },
    shape_format="NxHxV",
    baseline="naive",
    flops_formula="passes x 2·N·H·V, with the method's matmul passes in the `passes` column (the op needs "
    "forward 1, backward 2: d_hidden and d_weight; a method that does not keep the logits recomputes them in "
    "backward, 3); cce on CUDA: an upper bound, its backward skips the products of filtered tiles",
    extra_columns=(("passes", _passes_cell),),
    cpu_matmul_rates=cpu_matmul_rates,
)


main = functools.partial(harness.main, BENCHMARK)  # main(argv=None): the command line (python -m, rlhf-fast bench)


if __name__ == "__main__":
    main()
