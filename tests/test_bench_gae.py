"""``python -m benchmarks.bench_gae`` end to end on a tiny CPU shape: a forward-only benchmark (no gradient) on
the shared harness, and loops that compute what ``rf.gae`` computes.

The full harness (subprocess isolation, backward modes) is covered by ``test_bench_harness.py``; this checks
what the forward-only option adds, with every measurement in one process to stay fast.
"""

import json

import pytest
from conftest import check_native, run_bench, run_native

METHODS = ("rlhf_fast", "rlhf_fast_torch", "python_loop", "verl_loop")
SHAPES = ((8, 64), (8, 96, 2))  # right padding; 2 holes per row

# The loops give rf.gae's numbers: python_loop with right padding only, verl_loop with holes too.
_CHECK = """
import torch, rlhf_fast as rf
from benchmarks.bench_gae import make_inputs, python_loop, verl_loop
for shape, loops in (((8, 64), (python_loop, verl_loop)), ((8, 96, 2), (verl_loop,))):
    x = make_inputs(shape, torch.float32, torch.device("cpu"))
    assert (x["mask"] == 0).any() and x["mask"][0, -1] == 1, shape  # padding, and one full row
    assert ((x["rewards"] != 0).sum(1) == 1).all(), shape  # one score per row
    if len(shape) == 3:  # holes: a masked position before a response token
        assert ((x["mask"][:, :-1] == 0) & (x["mask"][:, 1:] == 1)).any(), shape
    adv, ret = rf.gae(x["rewards"], x["values"], x["mask"], gamma=1.0, lam=0.95)
    for loop in loops:
        a, r = loop(**x)
        torch.testing.assert_close(a, adv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r, ret, rtol=1e-5, atol=1e-5)
print("ok")
"""



def test_loops_match_rf_gae():
    check_native(_CHECK)


def test_bench_gae_forward_only(tmp_path):
    pytest.importorskip("matplotlib")  # the results' plot (the "bench" extra)
    shapes = ",".join("x".join(map(str, s)) for s in SHAPES)
    proc = run_bench("gae", ["--device", "cpu", "--shapes", shapes, "--repeats", "2", "--warmup", "1", "--in-process",
                             "--out", str(tmp_path)])  # fmt: skip

    data = json.loads((tmp_path / "gae.json").read_text())
    assert data["metadata"]["modes"] == ["forward"] and data["metadata"]["repeats"] == 2
    results = data["results"]
    assert {(tuple(r["shape"]), r["method"], r["mode"]) for r in results} == {
        (s, m, "forward") for s in SHAPES for m in METHODS
    }
    for r in results:
        where = f"{r['shape']}/{r['method']}"
        assert r["status"] == "ok", f"{where}: {r.get('reason')}"
        B, T = r["shape"][:2]
        assert r["bytes_moved"] == B * T * (2 * 4 + 4) + B * T * 8, where
        assert r["median_ms"] > 0 and r["time_vs_baseline"] > 0, where

    md = (tmp_path / "gae.md").read_text()
    assert "Mode: forward only" in md and "backward" not in md
    assert "| 8x96x2 | forward | verl_loop |" in md
    assert "faster than python_loop" in proc.stdout  # the summary


def test_bench_gae_rejects_backward():
    proc = run_native(["-m", "benchmarks.bench_gae", "--modes", "full", "--no-save"], timeout=60)
    assert proc.returncode == 2 and "choose from forward" in proc.stderr
