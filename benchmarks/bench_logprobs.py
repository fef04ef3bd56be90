"""``rf.logprobs`` (per-token log-probs and entropy of ``[N, V]`` logits) against eager PyTorch,
``torch.compile`` and TRL.

    python -m benchmarks.bench_logprobs                      # CPU: 4096x50000 float32; CUDA: bf16, 3 vocab sizes
    python -m benchmarks.bench_logprobs --shapes 1024x32000 --modes full --methods rlhf_fast,eager --no-save

Every method gets the same ``[N, V]`` logits (requiring grad) and ``[N]`` int64 labels. Results go to
``benchmarks/results/<device>/logprobs.{json,md,png}``; the harness (``benchmarks/harness.py``) describes
how time and memory are measured.
"""

import functools
from collections.abc import Iterator

import torch

import rlhf_fast as rf
from rlhf_fast.reference import logprobs_reference

from . import harness

# ------------------------------------------------------------------------------------------- methods


def _rlhf_fast():
    return lambda logits, labels: rf.logprobs(logits, labels, return_entropy=True)


def _rlhf_fast_inplace():
    return lambda logits, labels: rf.logprobs(logits, labels, return_entropy=True, inplace_backward=True)


def _eager(logits, labels):
    # The trainer's composition, and the baseline the tests use: log_softmax(x.float()).gather, entropy
    # from its exp (no masking of 0 * -inf: the usual trainer code).
    return logprobs_reference(logits, labels, mask_zero_probs=False)


def _make_eager():
    return _eager


def _make_trl_selective_log_softmax():
    from trl.trainer.utils import selective_log_softmax

    # Log-probs only. On CUDA (trl >= 1.x) this dispatches to the same Triton kernel as trl_triton;
    # on CPU, float32 takes a per-row logsumexp loop over the first dimension (here: the N rows).
    return lambda logits, labels: selective_log_softmax(logits, labels)


def _make_trl_triton():
    from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

    return lambda logits, labels: selective_log_softmax_and_entropy(logits, labels)


METHODS = (
    harness.Method(
        "rlhf_fast",
        _rlhf_fast,
        "`rf.logprobs(logits, labels, return_entropy=True)`, impl auto: Triton on CUDA, chunked PyTorch on CPU.",
    ),
    harness.Method(
        "rlhf_fast_inplace",
        _rlhf_fast_inplace,
        "the same with `inplace_backward=True`: the gradient overwrites the logits buffer. The harness restores "
        "the logits from a copy before every repeat (untimed), so each forward reads real logits.",
        modes=("backward", "full"),
        overwrites_inputs=True,
        note="grad in logits buffer",
    ),
    harness.Method(
        "eager",
        _make_eager,
        "`rlhf_fast.reference.logprobs_reference(logits, labels, mask_zero_probs=False)`: "
        "`log_softmax(x.float()).gather` and entropy from `exp(logp) * logp` (the tests' baseline).",
    ),
    harness.torch_compile_method(_eager),
    harness.Method(
        "trl_selective_log_softmax",
        _make_trl_selective_log_softmax,
        "`trl.trainer.utils.selective_log_softmax`: log-probs only, no entropy (less work). On CUDA it runs "
        "TRL's Triton kernel; on CPU a per-row logsumexp loop.",
        requires=("trl",),
        note="logp only, no entropy",
    ),
    harness.Method(
        "trl_triton",
        _make_trl_triton,
        "`trl.kernels.selective_log_softmax_and_entropy`: TRL's fused Triton kernel (log-probs and entropy).",
        devices=("cuda",),
        requires=("trl", "triton"),
    ),
)

# ------------------------------------------------------------------------------------- inputs, bytes


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    N, V = shape
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn((N, V), generator=gen, dtype=dtype, device=device).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    return {"logits": logits, "labels": labels}


def bytes_moved(shape: tuple[int, ...], dtype: torch.dtype, mode: str) -> int:
    """The least traffic ``logprobs`` needs, with ``s`` the logits' element size.

    forward:  read the logits once (N*V*s) and the int64 labels (8 B/row); write logp, entropy and lse
              (3 float32 per row).
    backward: read the logits (N*V*s) and per row the label, lse, entropy, grad_logp and grad_entropy
              (8 + 4*4 B); write dlogits (N*V*s).
    full:     forward + backward.
    """
    N, V = shape
    s = dtype.itemsize
    forward = N * V * s + N * 8 + N * 3 * 4
    backward = 2 * N * V * s + N * (8 + 4 * 4)
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def summarize(results: list[dict]) -> Iterator[str]:
    """rlhf_fast against eager, forward + backward.

    On CPU this is the PyTorch implementation's bar: at most 0.5x eager's peak extra memory, and no more time.
    """
    for r, t, m in harness.versus_baseline(results, "rlhf_fast"):
        if m is None:
            continue
        line = (
            f"{harness.format_shape(r['shape'])} {r['dtype']} forward+backward: rlhf_fast takes {t:.2f}x eager's "
            f"time and {m:.2f}x its peak extra memory ({r['median_ms']:.0f} ms, {r['peak_extra_mib']:.0f} MiB)"
        )
        if r["device"] == "cpu":
            met = m <= 0.5 and t <= 1.0
            line += ": " + harness.verdict(met, "the bar of the PyTorch implementation (<= 0.5x memory, <= 1x time)")
        yield line


BENCHMARK = harness.declare(
    globals(),
    name="logprobs",
    title="`rf.logprobs(logits [N, V], labels [N], return_entropy=True)`: per-token log-probs and entropy, "
    "against eager PyTorch, torch.compile and TRL.",
    grad_inputs=("logits",),
    bytes_formula="forward N·V·s + 20·N (logits, labels; logp, entropy, lse), backward 2·N·V·s + 24·N "
    "(logits and dlogits; per-row label, lse, entropy, two output grads), full the sum; s = element size",
    default_shapes={
        "cpu": ((4096, 50000),),
        "cuda": ((8192, 32000), (8192, 128256), (8192, 151936)),
    },
    summarize=summarize,
)


main = functools.partial(harness.main, BENCHMARK)  # main(argv=None): the command line (python -m, rlhf-fast bench)


if __name__ == "__main__":
    main()
