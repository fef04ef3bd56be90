"""``rf.logprobs`` with truncated sampling (``top_k=50, top_p=0.95``) against the composition users write today:
transformers' ``TopKLogitsWarper`` and ``TopPLogitsWarper`` on the logits, then ``log_softmax`` and ``gather``.

    python -m benchmarks.bench_truncation                 # CPU: 4096x50000 float32, forward + backward
    python -m benchmarks.bench_truncation --shapes 256x8000 --in-process --no-save

Issue 24's bar: at most 0.5x the composition's time and 0.25x its peak extra memory, forward + backward.
Log-probs only on both sides (what the composition gives). ``sampler="hf"`` (top-k then top-p, the warpers'
order). The harness (``benchmarks/harness.py``) describes how time and memory are measured.
"""

import functools
from collections.abc import Iterator

import torch

import rlhf_fast as rf

from . import harness
from .bench_logprobs import bytes_moved, make_inputs

TOP_K, TOP_P = 50, 0.95


def _make_rlhf_fast():
    return lambda logits, labels: rf.logprobs(logits, labels, top_k=TOP_K, top_p=TOP_P, sampler="hf")


def _warpers(logits, labels):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = TopPLogitsWarper(TOP_P)(None, TopKLogitsWarper(TOP_K)(None, logits.float()))
    return torch.log_softmax(scores, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _make_warpers():
    return _warpers


METHODS = (
    harness.Method("rlhf_fast", _make_rlhf_fast, f"`rf.logprobs(logits, labels, top_k={TOP_K}, top_p={TOP_P}, "
                   "sampler='hf')`, impl auto: Triton on CUDA, chunked PyTorch on CPU (log-probs only)."),  # fmt: skip
    harness.Method("hf_warpers", _make_warpers, f"transformers' `TopKLogitsWarper({TOP_K})` then "
                   f"`TopPLogitsWarper({TOP_P})` on `logits.float()`, `log_softmax`, `gather`.", requires=("transformers",)),  # fmt: skip
)


def summarize(results: list[dict]) -> Iterator[str]:
    for r, t, m in harness.versus_baseline(results, "rlhf_fast"):
        if m is None:
            continue
        yield (f"{harness.format_shape(r['shape'])} {r['dtype']} forward+backward: rlhf_fast takes {t:.2f}x the "
               f"warpers' time and {m:.2f}x their peak extra memory: "
               + harness.verdict(t <= 0.5 and m <= 0.25, "issue 24's bar (<= 0.5x time, <= 0.25x memory)"))  # fmt: skip


BENCHMARK = harness.declare(
    globals(),
    name="truncation",
    title=f"`rf.logprobs(logits [N, V], labels [N], top_k={TOP_K}, top_p={TOP_P})`: log-probs of the truncated "
    "distribution, against transformers' warpers + log_softmax + gather.",
    grad_inputs=("logits",),
    bytes_formula="as benchmarks/bench_logprobs.py (the untruncated op's least traffic; the thresholds read the "
    "logits again)",
    default_shapes={"cpu": ((4096, 50000),), "cuda": ((8192, 151936),)},
    baseline="hf_warpers",
    modes=("full",),
)

main = functools.partial(harness.main, BENCHMARK)

if __name__ == "__main__":
    main()
