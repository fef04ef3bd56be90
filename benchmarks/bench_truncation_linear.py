"""``rf.linear_logprobs`` with truncated sampling (``top_k=50, top_p=0.95``) against the same op untruncated.

    python -m benchmarks.bench_truncation_linear          # CPU: 4096x256x50000 float32, forward + backward
    python -m benchmarks.bench_truncation_linear --shapes 64x32x1000 --in-process --no-save

Issue 24's bar: at most 1.5x the untruncated op's time, forward + backward. The truncated route
(rlhf_fast/linear_logprobs_op.py) adds per chunk the thresholds (``torch.topk`` and a sort of the top-k values on
CPU; the sort-free kernel on GPU) and, on GPU, gives up the fused matmul-and-statistics forward kernel.
"""

import functools
from collections.abc import Iterator

import rlhf_fast as rf

from . import harness
from .bench_linear_logprobs import cpu_matmul_rates, make_inputs

TOP_K, TOP_P = 50, 0.95


def _make(truncated: bool):
    kw = dict(top_k=TOP_K, top_p=TOP_P) if truncated else {}
    return lambda: (lambda hidden, weight, labels: rf.linear_logprobs(hidden, weight, labels, return_entropy=True, **kw))


METHODS = (
    harness.Method("truncated", _make(True), f"`rf.linear_logprobs(hidden, weight, labels, return_entropy=True, "
                   f"top_k={TOP_K}, top_p={TOP_P})`, impl auto."),  # fmt: skip
    harness.Method("untruncated", _make(False), "`rf.linear_logprobs(hidden, weight, labels, return_entropy=True)`."),
)


def flops(r: dict) -> float:
    N, H, V = r["shape"]
    return {"forward": 1, "backward": 3, "full": 4}[r["mode"]] * 2 * N * H * V  # both recompute in backward


def summarize(results: list[dict]) -> Iterator[str]:
    for r, t, _ in harness.versus_baseline(results, "truncated"):
        yield (f"{harness.format_shape(r['shape'])} {r['dtype']} forward+backward: truncated takes {t:.2f}x "
               "the untruncated op's time: " + harness.verdict(t <= 1.5, "issue 24's bar (<= 1.5x)"))  # fmt: skip


BENCHMARK = harness.declare(
    globals(),
    name="truncation_linear",
    title=f"`rf.linear_logprobs(hidden [N, H], weight [V, H], labels [N], top_k={TOP_K}, top_p={TOP_P})` against "
    "the untruncated op.",
    grad_inputs=("hidden", "weight"),
    default_shapes={"cpu": ((4096, 256, 50000),), "cuda": ((8192, 4096, 151936),)},
    shape_format="NxHxV",
    baseline="untruncated",
    flops_formula="passes x 2·N·H·V (1 forward, 3 backward: the logits recomputed, two gradient products)",
    modes=("full",),
)

main = functools.partial(harness.main, BENCHMARK)

if __name__ == "__main__":
    main()
