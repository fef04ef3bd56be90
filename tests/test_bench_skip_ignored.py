"""``python -m benchmarks.bench_skip_ignored`` end to end on a tiny CPU shape, in one process: both methods
measured, the same outputs from both on the labeled rows, the FLOP count of the rows each computes, the ratio
line of the summary."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import native_env

from benchmarks import bench_skip_ignored as bench

REPO = Path(__file__).resolve().parents[1]
N, H, V = 64, 32, 1000


def test_half_the_rows_ignored_and_methods_agree():
    inputs = bench.make_inputs((N, H, V), torch.float32, torch.device("cpu"))
    on = inputs["labels"] != -100
    assert int(on.sum()) == N // 2 and not on[0]  # prompt-like runs, half the rows
    (lp, ent), (lp0, ent0) = (m.make()(**inputs) for m in bench.METHODS)
    torch.testing.assert_close(lp, lp0)
    torch.testing.assert_close(ent[on], ent0[on])
    assert not ent[~on].any() and ent0[~on].all()  # skipped rows: nothing computed


def test_bench_skip_ignored_runs(tmp_path):
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, "-m", "benchmarks.bench_skip_ignored", "--device", "cpu", "--shapes", f"{N}x{H}x{V}",
           "--modes", "full", "--repeats", "1", "--in-process", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=native_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "skip_ignored.json").read_text())["results"]
    assert {r["method"] for r in results} == {"rlhf_fast", "all_rows"}
    assert all(r["status"] == "ok" for r in results)
    rows = {"rlhf_fast": N // 2, "all_rows": N}
    assert all(r["flops"] == 4 * 2 * rows[r["method"]] * H * V for r in results)
    assert "32 of 64 rows ignored: skip_ignored=True takes" in proc.stdout and "the CPU bar (<= 0.6x)" in proc.stdout
