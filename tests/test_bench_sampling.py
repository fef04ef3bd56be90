"""``python -m benchmarks.bench_sampling`` end to end on tiny CPU shapes: every method runs, the bytes are the
logits', and the methods it times draw from the same distribution (the sampler's own tests are in
tests/test_rollout.py)."""

import json

import pytest
from conftest import run_bench

METHODS = ("rlhf_fast", "rlhf_fast_torch", "multinomial")


def test_bench_methods_sample_the_same_law():
    """The timed methods' draws over 3000 rows of the same logits: within a chi-square bar of softmax(logits / T).
    (``rlhf_fast`` is the torch implementation on CPU; the Triton kernel is checked in test_rollout.py.)"""
    import torch

    from benchmarks.bench_sampling import TEMPERATURE, _rlhf_fast, multinomial
    from rlhf_fast.train.rollout import row_seeds

    row = torch.tensor([0.5, -1.0, 1.5, 0.0, 1.0])
    logits = row.expand(3000, 5).contiguous()
    expected = torch.softmax(row.double() / TEMPERATURE, -1) * 3000
    for name, fn in (("rlhf_fast_torch", _rlhf_fast("torch")), ("multinomial", multinomial)):
        observed = torch.bincount(fn(logits, row_seeds(3, 0, range(3000))), minlength=5).double()
        assert float(((observed - expected) ** 2 / expected).sum()) < 18.5, name  # the 0.999 quantile, 4 df


def test_bench_sampling_forward_only(tmp_path):
    pytest.importorskip("matplotlib")  # the results' plot (the "bench" extra)
    run_bench("sampling", ["--device", "cpu", "--shapes", "4x1000,8x3000", "--repeats", "2", "--warmup", "1",
                           "--in-process", "--out", str(tmp_path)])  # fmt: skip
    data = json.loads((tmp_path / "sampling.json").read_text())
    results = data["results"]
    assert {(tuple(r["shape"]), r["method"]) for r in results} == {(s, m) for s in ((4, 1000), (8, 3000)) for m in METHODS}
    for r in results:
        assert r["status"] == "ok", r.get("reason")
        assert r["bytes_moved"] == r["shape"][0] * r["shape"][1] * 4 and r["median_ms"] > 0
