"""``python -m benchmarks.bench_linear_logprobs`` end to end on a tiny CPU shape: a TFLOP/s column from each
method's matmul passes instead of GB/s, and results files that hold it.

The full harness (subprocess isolation, GB/s) is covered by ``test_bench_harness.py``; this checks what the
FLOP-based benchmark adds, with every measurement in one process to stay fast.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import native_env, run_bench

REPO = Path(__file__).resolve().parents[1]
N, H, V = 64, 32, 1000
METHODS = ("rlhf_fast", "naive")
MODES = ("forward", "backward", "full")
# matmul passes of 2*N*H*V FLOPs: rlhf_fast recomputes the logits in backward, naive keeps them
PASSES = {("rlhf_fast", "forward"): 1, ("rlhf_fast", "backward"): 3, ("rlhf_fast", "full"): 4,
          ("naive", "forward"): 1, ("naive", "backward"): 2, ("naive", "full"): 3}  # fmt: skip


def test_bench_linear_logprobs_tflops(tmp_path):
    pytest.importorskip("matplotlib")  # the results' plot (the "bench" extra)
    env = native_env()
    cmd = [sys.executable, "-m", "benchmarks.bench_linear_logprobs", "--device", "cpu", "--shapes", f"{N}x{H}x{V}",
           "--methods", ",".join(METHODS), "--repeats", "1", "--in-process", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    data = json.loads((tmp_path / "linear_logprobs.json").read_text())
    results = data["results"]
    assert {(r["method"], r["mode"]) for r in results} == set(PASSES)
    for r in results:
        where = f"{r['method']}/{r['mode']}"
        assert r["status"] == "ok", f"{where}: {r.get('reason')}"
        assert r["flops"] == PASSES[r["method"], r["mode"]] * 2 * N * H * V, where
        assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12), where
        assert "gbps" not in r, where
        if r["mode"] != "forward":  # d_weight [V, H] float32 is returned
            assert r["peak_extra_mib"] >= 0.9 * V * H * 4 / 2**20, where

        # the fraction of the machine's measured rate for the same passes (the harmonic mean of the three)
        rates = data["metadata"]["ceilings"]["cpu_matmul_gflops"][f"{N}x{H}x{V}"]
        assert set(rates) == {"logits", "d_hidden", "d_weight"} and all(g > 0 for g in rates.values())
        assert r["matmul_rate_tflops"] == pytest.approx(3 / sum(1e3 / g for g in rates.values())), where
        assert r["matmul_fraction"] == pytest.approx(r["tflops"] / r["matmul_rate_tflops"]), where

    md = (tmp_path / "linear_logprobs.md").read_text()
    assert "| passes |" in md and "TFLOP/s" in md and "| % mm |" in md and "| GB/s |" not in md
    assert f"fp32 matmul at {N}x{H}x{V}, GFLOP/s: logits" in md
    assert "| 64x32x1000 | full | rlhf_fast | 4 |" in md
    assert "rlhf_fast vs naive" in proc.stdout and "forward+backward" in proc.stdout  # the summary line


def test_cold_and_warm_timings(tmp_path):
    """Isolated (cold: a fresh subprocess per case) timings, then warm ones in one process, with their ratios."""
    pytest.importorskip("matplotlib")
    methods = ("rlhf_fast_logp", "naive_logp")
    proc = run_bench("linear_logprobs", ["--device", "cpu", "--shapes", f"{N}x{H}x{V}", "--methods", ",".join(methods),
                                         "--modes", "full", "--repeats", "1", "--out", str(tmp_path)],
                     timeout=300)  # fmt: skip
    results = {r["method"]: r for r in json.loads((tmp_path / "linear_logprobs.json").read_text())["results"]}
    assert set(results) == set(methods)
    for r in results.values():
        assert r.get("isolated") and r["warm_median_ms"] > 0 and r["warm_tflops"] > 0
    ours, naive = results["rlhf_fast_logp"], results["naive_logp"]
    md = (tmp_path / "linear_logprobs.md").read_text()
    assert "| warm ms |" in md and "warm: all of them again in one process" in md
    line = next(x for x in proc.stdout.splitlines() if x.startswith(f"{N}x{H}x{V} float32 rlhf_fast_logp vs naive_logp,"))
    assert f"{ours['median_ms'] / naive['median_ms']:.2f}x its time cold" in line
    assert f"{ours['warm_median_ms'] / naive['warm_median_ms']:.2f}x warm" in line and "CPU bar" in line
