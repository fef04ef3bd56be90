"""benchmarks/bench_first_call.py end to end on a tiny shape: every method runs in its own process and reports
two calls' seconds and peak-memory rise; the report names the ratio to naive's."""

import json

from conftest import run_bench


def test_first_call_benchmark_runs(tmp_path):
    run_bench("first_call", ["--shape", "8x4x300", "--out", str(tmp_path)], timeout=300)
    saved = json.loads((tmp_path / "first_call.json").read_text())
    assert [r["method"] for r in saved["results"]] == ["naive", "rlhf_fast", "rlhf_fast_eager"]
    for r in saved["results"]:
        assert r["status"] == "ok", r
        assert len(r["calls"]) == 2 and all(c["seconds"] > 0 and c["peak_rise_mib"] >= 0 for c in r["calls"])
    table = (tmp_path / "first_call.md").read_text()
    assert "| rlhf_fast |" in table and "x naive's" in table and saved["meta"]["cpu"] in table
