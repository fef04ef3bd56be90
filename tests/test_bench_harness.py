"""The benchmark harness end to end on a small CPU shape: the results files exist and hold sane numbers.

Runs ``python -m benchmarks.bench_logprobs`` as the README does (from the repository root: ``benchmarks``
is not an installed package), once with every measurement in one process (all modes) and once with one
fresh subprocess for a measurement (the default on CPU, where memory is RSS-based).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import native_env

REPO = Path(__file__).resolve().parents[1]
N, V = 128, 4096
# float32 [N, V] gradient, in MiB: backward and full must allocate at least this much
GRAD_MIB = N * V * 4 / 2**20
METHODS = ("rlhf_fast", "eager")
MODES = ("forward", "backward", "full")


def _run_bench(out_dir: Path, *args: str, methods: tuple[str, ...] = METHODS) -> subprocess.CompletedProcess:
    env = native_env()
    cmd = [sys.executable, "-m", "benchmarks.bench_logprobs", "--device", "cpu", "--shapes", f"{N}x{V}",
           "--methods", ",".join(methods), "--repeats", "1", "--out", str(out_dir), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _check_results(out_dir: Path, modes: tuple[str, ...], isolated: bool, methods: tuple[str, ...] = METHODS) -> dict:
    data = json.loads((out_dir / "logprobs.json").read_text())
    assert data["benchmark"] == "logprobs"
    meta = data["metadata"]
    assert meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["torch"] and meta["python"] and "RSS" in meta["memory_note"]
    assert meta["shapes"] == [[N, V]]

    results = data["results"]
    got = {(r["method"], r["mode"]) for r in results}
    assert got == {(m, mode) for m in methods for mode in modes}
    for r in results:
        where = f"{r['method']}/{r['mode']}"
        assert r["status"] == "ok", f"{where}: {r.get('reason')}"
        assert r["shape"] == [N, V] and r["repeats"] == 1
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], where
        assert r["gbps"] > 0 and r["bytes_moved"] >= N * V * 4, where
        assert isinstance(r["peak_extra_mib"], float) and r["peak_extra_mib"] >= 0, where
        assert "RSS" in r["memory_method"], where
        if r["mode"] in ("backward", "full"):  # the returned [N, V] gradient alone is this big
            assert r["peak_extra_mib"] >= 0.9 * GRAD_MIB, f"{where}: {r['peak_extra_mib']} MiB"
        assert r["time_vs_baseline"] > 0
        if r["method"] == "eager":
            assert r["time_vs_baseline"] == pytest.approx(1.0)
        assert r.get("isolated", False) == isolated, where

    md = (out_dir / "logprobs.md").read_text()
    assert "median ms" in md and "peak extra MiB" in md and "RSS" in md and "logprobs.png" in md
    for m in methods:
        assert f"| {m} |" in md
    for mode in modes:
        assert f"| {mode} |" in md

    png = (out_dir / "logprobs.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    return data


def test_bench_logprobs_in_process_all_modes(tmp_path):
    proc = _run_bench(tmp_path, "--in-process")
    _check_results(tmp_path, MODES, isolated=False)
    assert "peak extra MiB" in proc.stdout  # the terminal table


def test_bench_logprobs_isolated_subprocess(tmp_path):
    # one worker process (each costs a torch import): the default CPU path, memory in a fresh process
    _run_bench(tmp_path, "--modes", "full", methods=("eager",))
    data = _check_results(tmp_path, ("full",), isolated=True, methods=("eager",))
    assert data["metadata"]["isolated_subprocesses"] is True


def test_harness_names_are_explicit_and_public():
    """``benchmarks/harness.py`` re-exports its parts' names by name (``__all__``), none private, and every
    ``harness.<name>`` the benchmarks, the GPU suite and the tests use is one of them (a name left out would
    be an AttributeError at run time, in a benchmark no CPU test runs)."""
    import re

    from benchmarks import harness

    exported = set(harness.__all__)
    assert not [n for n in exported if n.startswith("_")]
    assert all(hasattr(harness, n) for n in exported)
    used = {}
    for path in [*REPO.glob("benchmarks/*.py"), *REPO.glob("tests/*.py")]:
        for name in re.findall(r"\bharness\.([A-Za-z_]\w*)", path.read_text()):
            if name not in ("py", "__all__"):  # the file's name, this test's own lookup
                used.setdefault(name, path.name)
    assert used and not {n: f for n, f in used.items() if n not in exported}
