"""The GPU suite (``rlhf-fast bench gpu``) end to end on CPU: ``--dry-run`` runs every section's code path with
tiny shapes (kernels under the Triton interpreter), so that the first GPU run does not fail on plumbing."""

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import native_env

from benchmarks import gpu_correctness, gpu_suite


def _run_suite(out: Path, cwd: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlhf_fast", "bench", "gpu", "--dry-run", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=cwd, env=env or native_env(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run from a directory that is not the checkout: ``--out tmp``, relative to it. Its budget is one no
    machine load can exhaust (the 420 s default gave a loaded 2-core machine's sections too little): this run
    checks what every section writes; the time boxes themselves are tested below with sections made to overrun."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    t0 = time.perf_counter()
    proc = _run_suite(Path("tmp"), cwd, "--budget-s", "1000000")
    seconds = time.perf_counter() - t0
    print(f"dry run: {seconds:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "tmp", proc


def _json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def test_every_section_wrote_its_part(dry_run):
    out, _ = dry_run
    suite = _json(out / "summary.json")
    assert [s["name"] for s in suite["suite"]["sections"]] == [s.name for s in gpu_suite.SECTIONS]
    assert all(s["status"] == "done" for s in suite["suite"]["sections"]), suite["suite"]["sections"]

    env = _json(out / "environment.json")
    assert env["ceilings"]["copy_gbps"] > 0 and env["ceilings"]["bf16_matmul_tflops"] > 0
    assert {"trl", "liger-kernel", "cut-cross-entropy", "quack-kernels"} <= set(env["environment"]["peers"])

    corr = _json(out / "correctness.json")
    planned = gpu_correctness.planned(dry_run=True)
    assert corr["planned"] == len(planned) == len(corr["rows"])
    bad = [(r["case"], r["dtype"], r.get("reason") or r.get("worst")) for r in corr["rows"] if r["status"] != "PASS"]
    assert not bad, bad
    assert "| PASS | logprobs +entropy |" in (out / "correctness.md").read_text()

    index = _json(out / "ops.json")
    for op in gpu_suite.OPS:
        assert index["ops"][op.name]["status"] == "done", op.name
        results = _json(out / "ops" / f"{op.name}.json")["results"]
        ok = [r for r in results if r.get("status") == "ok"]
        # ours ran: the rlhf_fast method, or every method of a benchmark of rlhf_fast against itself
        methods = {m.name for m in importlib.import_module(f"benchmarks.bench_{op.name}").BENCHMARK.methods}
        ours = {"rlhf_fast"} if "rlhf_fast" in methods else methods
        assert ours <= {r["method"] for r in ok}, (op.name, results)
        assert {tuple(r["shape"]) for r in ok} == set(op.dry_shapes)
        # a method that did not run says why (peer not installed, CUDA only, dry run), never silently dropped
        assert all(r.get("reason") for r in results if r.get("status") != "ok"), op.name
        for ext in ("md", "png"):
            assert (out / "ops" / f"{op.name}.{ext}").is_file()

    trainer = _json(out / "trainer.json")
    assert [r["ops"] for r in trainer["results"]] == ["fused", "reference"]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in trainer["results"]), trainer["results"]

    summary = (out / "summary.md").read_text()
    for part in ("## Sections", "## Correctness", "## Ops", "## Trainer", "logprobs", "fused"):
        assert part in summary, part
    assert (out / "summary.png").stat().st_size > 0


def test_commit_versions_and_command_in_every_file(dry_run):
    out, _ = dry_run
    for name in ("environment", "correctness", "ops", "trainer"):
        meta = _json(out / f"{name}.json")["meta"]
        assert meta["command"].startswith("rlhf-fast bench gpu") and "--dry-run" in meta["command"], name
        assert meta["git_commit"], name  # the test runs in a checkout
        assert meta["versions"]["torch"] and meta["ceilings"]["copy_gbps"] > 0, name
    for op in gpu_suite.OPS:
        meta = _json(out / "ops" / f"{op.name}.json")["metadata"]
        assert meta["suite"]["ceilings"] and meta["command"].startswith("rlhf-fast bench gpu"), op.name
    for md in ("summary.md", "correctness.md", "environment.md"):
        text = (out / md).read_text()
        assert "- Commit: " in text and "- Ceilings (measured)" in text and "rlhf-fast bench gpu" in text, md


def test_correctness_cases_exercise_every_kernel():
    """A kernel added to the build check (kernels/_aot.py) must get a correctness case too."""
    from rlhf_fast.kernels._aot import all_builds

    def name(build):  # under the interpreter the @triton.jit functions are not JITFunctions: unwrap by hand
        fn = build.kernel
        while hasattr(fn, "fn"):
            fn = fn.fn
        return fn.__name__

    built = {name(b) for b in all_builds()}
    assert "_logprobs_fwd_kernel" in built
    covered = {k for case in gpu_correctness.CASES for k in case.kernels}
    assert built <= covered, f"kernels without a correctness case: {sorted(built - covered)}"
    # and the big case: one [N, V] with more than 2^31 elements
    assert any(len(s) == 2 and s[0] * s[1] > 2**31 for c in gpu_correctness.CASES for s in c.shapes.values())


def test_a_failing_case_shows_as_fail(tmp_path):
    """The table can fail: a deliberately wrong float64 reference (the test hook) turns that case to FAIL."""
    env = {**native_env(), gpu_correctness.INJECT_ENV: "pairwise_sigmoid_loss margin"}
    proc = _run_suite(tmp_path / "out", tmp_path, "--sections", "correctness", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _json(tmp_path / "out" / "correctness.json")["rows"]
    status = {(r["case"], r["dtype"]): r["status"] for r in rows}
    assert {s for (c, _), s in status.items() if c == "pairwise_sigmoid_loss margin"} == {"FAIL"}
    assert {s for (c, _), s in status.items() if c != "pairwise_sigmoid_loss margin"} == {"PASS"}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| FAIL | pairwise_sigmoid_loss margin |" in summary and "test hook" in summary


def test_time_box_stops_starting_items(tmp_path):
    """Past its time box a section starts nothing more: what did not run is listed as NOT RUN, nothing dropped."""
    proc = _run_suite(tmp_path / "out", tmp_path, "--sections", "correctness", "--budget-s", "1.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _json(tmp_path / "out" / "correctness.json")
    assert len(result["rows"]) == result["planned"] == len(gpu_correctness.planned(dry_run=True))
    assert result["counts"]["NOT RUN"] > 0 and set(result["counts"]) == {"PASS", "FAIL", "ERROR", "NOT RUN"}
    assert result["counts"]["FAIL"] == result["counts"]["ERROR"] == 0
    assert "NOT RUN" in (tmp_path / "out" / "summary.md").read_text()


def test_a_section_past_its_time_box_is_killed_and_the_run_goes_on(tmp_path):
    """The trainer cannot finish in 2 s: it is killed (with the runs it started), the summary says so."""
    env = {**native_env(), "RLHF_FAST_SUITE_GRACE_S": "0"}
    proc = _run_suite(tmp_path / "out", tmp_path, "--sections", "trainer,environment", "--budget-s", "2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections = {s["name"]: s for s in _json(tmp_path / "out" / "summary.json")["suite"]["sections"]}
    assert sections["trainer"]["status"].startswith("killed at its time box"), sections
    assert "killed at its time box" in (tmp_path / "out" / "summary.md").read_text()


def test_no_worse_bar():
    """The bar itself: within 1.25x plain's error plus the margin passes, beyond it fails, NaN fails."""
    import torch

    truth = torch.tensor([1.0, 2.0], dtype=torch.float64)
    plain = truth + 1e-3
    ok = gpu_correctness.no_worse("x", (truth + 1.2e-3).float(), plain.float(), truth, rel_margin=0, fp32_tol=None)
    bad = gpu_correctness.no_worse("x", (truth + 1.4e-3).float(), plain.float(), truth, rel_margin=0, fp32_tol=None)
    nan = gpu_correctness.no_worse("x", torch.tensor([float("nan"), 2.0]), plain.float(), truth, rel_margin=0,
                                   fp32_tol=None)  # fmt: skip
    assert ok["ok"] and not bad["ok"] and not nan["ok"]
    # float32: the tests' absolute bar as well
    tight = gpu_correctness.no_worse("x", (truth + 1.2e-3).float(), plain.float(), truth, rel_margin=0, fp32_tol=1e-4)
    assert not tight["ok"]


def test_issue_24_benchmarks_are_planned_at_their_cuda_shapes():
    """The two truncated-sampling benchmarks (issue 24) are items of the ops section, at the shapes their
    modules declare for CUDA, forward + backward, within the budget."""
    ops = {op.name: op for op in gpu_suite.OPS}
    for name in ("truncation", "truncation_linear"):
        bench = importlib.import_module(f"benchmarks.bench_{name}").BENCHMARK
        assert ops[name].shapes == tuple(bench.default_shapes["cuda"]) and ops[name].modes == ("full",), name
        assert ops[name].planned_s > 0


def test_budget_is_shared_by_planned_time():
    plan = gpu_suite.plan(420)
    assert [p["name"] for p in plan] == [s.name for s in gpu_suite.SECTIONS]
    assert abs(sum(p["share_of_budget"] for p in plan) - 420) < 1e-6
    assert sum(s.planned_s for s in gpu_suite.SECTIONS) <= 420


def test_needs_a_gpu_without_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, "-m", "rlhf_fast", "bench", "gpu", "--out", str(tmp_path)], cwd=tmp_path,
                          env=native_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
