"""The kernels ship as rlhf_fast.kernels; no top-level 'kernels' module is ever installed."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_are_a_subpackage(tmp_path):
    # Run from an empty directory so the repository's own kernels/ folder is not on sys.path.
    code = (
        "import importlib.util, rlhf_fast.kernels as k\n"
        "print(importlib.util.find_spec('kernels') is None)\n"
        "print(k.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "rlhf_fast.kernels"]


@pytest.mark.skipif(os.environ.get("RLHF_FAST_SKIP_WHEEL") == "1", reason="wheel build disabled")
def test_wheel_layout(tmp_path):
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
    names = zipfile.ZipFile(wheel).namelist()
    assert "rlhf_fast/kernels/logprobs.py" in names
    assert "rlhf_fast/kernels/__init__.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels package was packaged"
    top_level = [n for n in names if n.endswith("top_level.txt")]
    for n in top_level:
        assert zipfile.ZipFile(wheel).read(n).decode().split() == ["rlhf_fast"]
