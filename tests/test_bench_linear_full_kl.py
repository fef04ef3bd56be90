"""``python -m benchmarks.bench_linear_full_kl`` end to end on a tiny CPU shape, in one process: every method
measured, the same KL from each, and the memory summary against the materialised logits."""

import json

import pytest
import torch
from conftest import run_bench

from benchmarks import bench_linear_full_kl as bench


def test_methods_agree():
    inputs = bench.make_inputs((24, 16, 301), torch.float32, torch.device("cpu"))
    outs = [m.make()(**inputs) for m in bench.METHODS]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-4, atol=1e-6)
    assert (outs[0] > 0).all()  # the reference is the policy plus noise: a real KL


def test_bench_linear_full_kl_runs(tmp_path):
    pytest.importorskip("matplotlib")
    proc = run_bench("linear_full_kl", ["--device", "cpu", "--shapes", "64x32x1000", "--modes", "full", "--repeats",
                                        "1", "--in-process", "--out", str(tmp_path)], timeout=300)  # fmt: skip
    results = json.loads((tmp_path / "linear_full_kl.json").read_text())["results"]
    assert {r["method"] for r in results} == {"rlhf_fast", "materialised", "eager"}
    assert all(r["status"] == "ok" for r in results)
    assert "x materialised's peak extra memory" in proc.stdout
