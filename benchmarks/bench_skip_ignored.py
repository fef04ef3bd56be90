"""``rf.linear_logprobs(..., skip_ignored=True)`` against ``skip_ignored=False`` with half the rows ignored: what
dropping the prompt rows before the lm_head matmul buys.

    python -m benchmarks.bench_skip_ignored                  # CPU: 4096x256x50000 float32; CUDA: 8192x4096x131072 bf16
    python -m benchmarks.bench_skip_ignored --shapes 512x128x8000 --modes full --no-save

Methods: ``rlhf_fast`` (``skip_ignored=True``) and ``all_rows`` (``skip_ignored=False``). Shapes are
``NxHxV``; the inputs are ``bench_linear_logprobs``' (same seed, same scale) with the labels of alternating
runs of 256 rows set to ``-100`` (prompt-like blocks: exactly half the rows when ``N`` is a multiple of 512). Both methods return log-probs and entropy; backward differentiates both with respect to
``hidden`` and ``weight``. TFLOP/s counts the matmul passes over the rows each method computes (the labeled
rows for ``rlhf_fast``, all of them otherwise): four passes of ``2·rows·H·V`` (the forward's logits; in
backward the recomputed logits, ``d_hidden`` and ``d_weight``), one in forward mode, three in backward mode.
"""

import dataclasses
import functools
from collections.abc import Iterator

import torch

import rlhf_fast as rf

from . import bench_linear_logprobs, harness

PROMPT_RUN = 256  # rows per ignored (prompt-like) run; the labeled runs between them are as long
_PASSES = {"forward": 1, "backward": 3, "full": 4}
_CPU_BAR = 0.6  # issue 16: skip_ignored=True at most this share of skip_ignored=False's time, forward + backward


def _linear_logprobs(skip_ignored: bool):
    return lambda hidden, weight, labels: rf.linear_logprobs(hidden, weight, labels, return_entropy=True,
                                                             skip_ignored=skip_ignored)  # fmt: skip


METHODS = (
    harness.Method(
        "rlhf_fast",
        lambda: _linear_logprobs(True),
        "`rf.linear_logprobs(hidden, weight, labels, return_entropy=True, skip_ignored=True)`: the labeled rows "
        "are gathered (`index_select`) before any matmul, the results scattered back.",
    ),
    harness.Method(
        "all_rows",
        lambda: _linear_logprobs(False),
        "`rf.linear_logprobs(hidden, weight, labels, return_entropy=True)`: every row through the lm_head, "
        "the ignored ones' log-probs zeroed afterwards.",
    ),
)


def ignored(n: int, device=None) -> torch.Tensor:
    """The ignored rows of a batch of ``n``: alternating runs of :data:`PROMPT_RUN` rows (``n // 2`` when
    shorter, for the tests' tiny shapes), starting ignored."""
    return (torch.arange(n, device=device) // max(1, min(PROMPT_RUN, n // 2))) % 2 == 0


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    inputs = bench_linear_logprobs.make_inputs(shape, dtype, device)
    inputs["labels"] = inputs["labels"].masked_fill(ignored(shape[0], device), -100)
    return inputs


def flops(r: dict) -> float:
    N, H, V = r["shape"]
    rows = int((~ignored(N)).sum()) if r["method"] == "rlhf_fast" else N
    return _PASSES[r["mode"]] * 2.0 * rows * H * V


def summarize(results: list[dict]) -> Iterator[str]:
    """rlhf_fast's (skip_ignored=True) time over all_rows', per shape and mode; on CPU forward + backward, against
    the bar."""
    ok = {(tuple(r["shape"]), r["mode"], r["method"]): r for r in results if r["status"] == "ok"}
    for (shape, mode, method), r in ok.items():
        base = ok.get((shape, mode, "all_rows"))
        if method != "rlhf_fast" or base is None or not base["median_ms"]:
            continue
        x = r["median_ms"] / base["median_ms"]
        N = shape[0]
        line = (f"{harness.format_shape(shape)} {r['dtype']} {mode}, {int(ignored(N).sum())} of {N} rows ignored: "
                f"skip_ignored=True takes {x:.2f}x the time of all_rows ({r['median_ms']:.0f} vs {base['median_ms']:.0f} ms)")  # fmt: skip
        if r["device"] == "cpu" and mode == "full":
            line += ": " + harness.verdict(x <= _CPU_BAR, f"the CPU bar (<= {_CPU_BAR}x)")
        yield line


# bench_linear_logprobs' benchmark with these methods, inputs and work counts: the same gradients, dtypes,
# shape format and CPU matmul rates ("% mm" column), no "passes" column (its cells are per method name).
BENCHMARK = dataclasses.replace(
    bench_linear_logprobs.BENCHMARK, name="skip_ignored", module="benchmarks.bench_skip_ignored",
    title="`rf.linear_logprobs(hidden [N, H], weight [V, H], labels [N], return_entropy=True)` with half the "
    "labels `-100` (prompt-like runs of 256 rows): `skip_ignored=True` (labeled rows only) against `False`.",
    methods=METHODS, make_inputs=make_inputs, baseline="all_rows", summarize=summarize, flops=flops,
    default_shapes={"cpu": ((4096, 256, 50000),), "cuda": ((8192, 4096, 131072),)}, extra_columns=(),
    flops_formula="matmul passes (forward 1, backward 3: recomputed logits, d_hidden, d_weight) x 2·rows·H·V, "
    "rows = the rows the method computes (the labeled ones for rlhf_fast, which skips the others)",
)  # fmt: skip

main = functools.partial(harness.main, BENCHMARK)  # main(argv=None), as every bench module has

if __name__ == "__main__":
    main(None)
