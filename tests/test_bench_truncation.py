"""``python -m benchmarks.bench_truncation`` and ``bench_truncation_linear`` end to end on tiny CPU shapes: every
method runs, the baseline is the one the issue names, and the summary states the bar."""

import json

import pytest
from conftest import run_bench


@pytest.mark.parametrize("name, shape, methods, baseline", [
    ("truncation", "64x500", {"rlhf_fast", "hf_warpers"}, "hf_warpers"),
    ("truncation_linear", "32x16x500", {"truncated", "untruncated"}, "untruncated"),
])  # fmt: skip
def test_bench_truncation_dry_run(tmp_path, name, shape, methods, baseline):
    pytest.importorskip("matplotlib")  # the results' plot (the "bench" extra)
    proc = run_bench(name, ["--device", "cpu", "--shapes", shape, "--repeats", "1", "--in-process", "--no-warm",
                            "--out", str(tmp_path)])  # fmt: skip
    data = json.loads((tmp_path / f"{name}.json").read_text())
    results = data["results"]
    assert {r["method"] for r in results} == methods and {r["mode"] for r in results} == {"full"}
    assert all(r["status"] == "ok" for r in results), [r.get("reason") for r in results]
    base = next(r for r in results if r["method"] == baseline)
    assert base["time_vs_baseline"] == pytest.approx(1.0)
    assert "issue 24's bar" in proc.stdout
