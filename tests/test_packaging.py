"""The kernels ship as rlhf_fast.kernels, the benchmarks as rlhf_fast.benchmarks; no top-level 'kernels' or
'benchmarks' module is ever installed, and an installed wheel runs the benchmarks from any directory."""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import run_native

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_are_a_subpackage(tmp_path):
    # Run from an empty directory so the repository's own kernels/ folder is not on sys.path: a top-level
    # 'kernels' there is Hugging Face's (transformers >= 5.2x installs it) or nothing, never ours.
    code = (
        "import importlib.util, os, rlhf_fast.kernels as k\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec is None or os.path.dirname(spec.origin) != os.path.dirname(k.__file__))\n"
        "print(k.__name__)\n"
    )
    out = run_native(["-c", code], 120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "rlhf_fast.kernels"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if os.environ.get("RLHF_FAST_SKIP_WHEEL") == "1":
        pytest.skip("wheel build disabled")
    tmp_path = tmp_path_factory.mktemp("wheel")
    # Build in this environment when its setuptools can make wheels on its own (>= 70.1, also offline, as
    # on the GPU machines); otherwise let pip fetch the build requirements into an isolated environment.
    has_bdist_wheel = importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
    isolation = ["--no-build-isolation"] if has_bdist_wheel else []
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("rlhf_fast-*.whl")
    return wheel


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "rlhf_fast/kernels/logprobs.py" in names
    assert "rlhf_fast/kernels/__init__.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels package was packaged"
    assert {"rlhf_fast/benchmarks/harness.py", "rlhf_fast/benchmarks/gpu_suite.py",
            "rlhf_fast/benchmarks/bench_logprobs.py"} <= set(names)  # fmt: skip
    assert not [n for n in names if n.startswith("benchmarks/")], "a top-level benchmarks package was packaged"
    assert not [n for n in names if "/results/" in n], "committed benchmark results were packaged"
    assert not [n for n in names if n.startswith("docs/") or "/docs/" in n], "the documentation was packaged"
    top_level = [n for n in names if n.endswith("top_level.txt")]
    for n in top_level:
        assert zipfile.ZipFile(wheel).read(n).decode().split() == ["rlhf_fast"]


def test_installed_wheel_runs_the_benchmarks_from_any_directory(wheel, tmp_path):
    """What the GPU machine does: pip install --no-index --no-deps --target DIR, then run from elsewhere."""
    target, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (target / "bin" / "rlhf-fast").is_file()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(target), RLHF_FAST_NO_PROGRESS="1")

    def run(*args, timeout=600):
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip

    where = run("-c", "import rlhf_fast.benchmarks.harness as h; print(h.__file__, h.PACKAGE)")
    assert where.returncode == 0 and where.stdout.split() == [
        str(target / "rlhf_fast" / "benchmarks" / "harness.py"), "rlhf_fast.benchmarks"], where.stdout + where.stderr
    listing = run("-m", "rlhf_fast", "bench")
    assert listing.returncode == 0, listing.stderr
    assert {"logprobs", "gae", "full_kl", "gpu"} <= set(listing.stdout.split())
    # an op benchmark: its CPU worker subprocesses import rlhf_fast.benchmarks.bench_gae, not a checkout
    gae = run("-m", "rlhf_fast", "bench", "gae", "--shapes", "4x16", "--methods", "rlhf_fast,python_loop",
              "--repeats", "1", "--warmup", "0")  # fmt: skip
    assert gae.returncode == 0, gae.stderr[-2000:]
    results = json.loads((work / "benchmarks" / "results" / "cpu" / "gae.json").read_text())["results"]
    assert [r["status"] for r in results] == ["ok", "ok"], results
    # the GPU suite's dry run: the environment, and the trainer (its runs are subprocesses of the installed module)
    suite = run("-m", "rlhf_fast", "bench", "gpu", "--dry-run", "--sections", "environment,trainer", "--out", "dry")
    assert suite.returncode == 0, suite.stderr[-2000:]
    trainer = json.loads((work / "dry" / "trainer.json").read_text())
    assert [r["status"] for r in trainer["results"]] == ["ok", "ok"], trainer
    assert "| environment |" in (work / "dry" / "summary.md").read_text()
