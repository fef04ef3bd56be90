"""``python -m benchmarks.bench_ppo`` end to end on a tiny CPU shape, and its inputs: every method computes the
loss the tests' reference computes (logprobs_floor aside), on a batch with padding, clipped ratios and a KL.

The full harness (subprocess isolation, timing) is covered by ``test_bench_harness.py``; this checks what the
PPO benchmark adds, with every measurement in one process to stay fast (torch_compile left out: compile time).
"""

import json

import pytest
from conftest import check_native, run_bench

B, T, V = 2, 32, 500
METHODS = ("rlhf_fast", "eager", "logprobs_floor")
MODES = ("forward", "backward", "full")

_CHECK = """
import torch
from benchmarks.bench_ppo import BENCHMARK
x = BENCHMARK.make_inputs((4, 64, 300), torch.float32, torch.device("cpu"))
assert x["logits"].requires_grad and (x["mask"] == 0).any() and (x["mask"][0] == 1).all()
losses, grads = {}, {}
for name in ("rlhf_fast", "eager"):
    out = BENCHMARK.method(name).make()(**x)
    loss = out[0] if isinstance(out, tuple) else out
    losses[name] = loss.detach()
    (grads[name],) = torch.autograd.grad(loss, x["logits"])
torch.testing.assert_close(losses["rlhf_fast"], losses["eager"], rtol=1e-5, atol=1e-6)
torch.testing.assert_close(grads["rlhf_fast"], grads["eager"], rtol=1e-4, atol=1e-8)
_, metrics = BENCHMARK.method("rlhf_fast").make()(**x)
assert 0.05 < metrics["clipfrac"] < 0.95 and metrics["kl"] > 0, metrics  # some ratios clipped, a KL
print("ok")
"""



def test_methods_agree_on_the_inputs():
    check_native(_CHECK)


def test_bench_ppo(tmp_path):
    pytest.importorskip("matplotlib")  # the results' plot (the "bench" extra)
    run_bench("ppo", ["--device", "cpu", "--shapes", f"{B}x{T}x{V}", "--methods", ",".join(METHODS), "--repeats", "1",
                      "--in-process", "--out", str(tmp_path)])  # fmt: skip

    data = json.loads((tmp_path / "ppo.json").read_text())
    results = [r for r in data["results"] if "mode" in r]
    assert {(r["method"], r["mode"]) for r in results} == {(m, mode) for m in METHODS for mode in MODES}
    N = B * T
    for r in results:
        where = f"{r['method']}/{r['mode']}"
        assert r["status"] == "ok", f"{where}: {r.get('reason')}"
        passes = {"forward": 1, "backward": 2, "full": 3}[r["mode"]]
        per_token = {"forward": 40, "backward": 20, "full": 60}[r["mode"]]
        assert r["bytes_moved"] == passes * N * V * 4 + per_token * N, where
        if r["mode"] != "forward":  # the returned float32 [B, T, V] gradient alone is this big
            assert r["peak_extra_mib"] >= 0.9 * N * V * 4 / 2**20, where

    md = (tmp_path / "ppo.md").read_text()
    assert "| 2x32x500 | full | logprobs_floor |" in md and "GB/s" in md
    assert "rlhf_fast / logprobs_floor" in md and "the CPU bar" in md  # the summary
