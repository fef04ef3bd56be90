"""pytest-benchmark runs of ``rf.logprobs`` against eager PyTorch on CPU, forward + backward.

    pytest benchmarks/ --benchmark-json=out.json

Not part of the test suite (CI runs ``pytest tests``, which does not collect this folder). The timing is
pytest-benchmark's (CPU ops are synchronous); the peak extra memory, RSS-based and measured in this
process by the harness, and the GB/s go in each benchmark's ``extra_info``. The full comparison, with
every method and mode in fresh processes, is ``python -m benchmarks.bench_logprobs``.
"""

import pytest
import torch

from benchmarks import harness
from benchmarks.bench_logprobs import BENCHMARK

pytest.importorskip("pytest_benchmark")

# Moderate: 125 MiB of float32 logits, about a second per eager call on a 2-core CPU.
SHAPE = (1024, 32000)
MODE = "full"


@pytest.mark.parametrize("method", ["rlhf_fast", "eager"])
def test_logprobs_cpu(benchmark, method):
    device = torch.device("cpu")
    fn = BENCHMARK.method(method).make()
    inputs = BENCHMARK.make_inputs(SHAPE, torch.float32, device)
    case = harness.build_case(fn, inputs, BENCHMARK.grad_inputs, MODE, BENCHMARK.method(method).overwrites_inputs)
    memory = harness.measure_cpu(case, repeats=1, warmup=1)  # also the warmup for the timed rounds

    benchmark.group = f"logprobs {MODE} {harness.format_shape(SHAPE)} float32 cpu"
    setup = (lambda: ((case.setup(),), {})) if case.setup is not None else (lambda: ((None,), {}))
    benchmark.pedantic(case.run, setup=setup, rounds=3, iterations=1)

    nbytes = BENCHMARK.bytes_moved(SHAPE, torch.float32, MODE)
    benchmark.extra_info.update(
        shape=list(SHAPE),
        mode=MODE,
        peak_extra_mib=memory["peak_extra_mib"],
        memory_method=memory["memory_method"],
        bytes_moved=nbytes,
        gbps=nbytes / benchmark.stats.stats.median / 1e9,
    )
    assert memory["peak_extra_mib"] > 0
