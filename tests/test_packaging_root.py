"""The repository root never shadows Hugging Face's ``kernels`` package, which ``transformers`` (>= 5.2x)
imports: from the root (first on ``sys.path`` for ``python -c``, ``python -m pytest`` and user scripts),
``import kernels`` is theirs, ``transformers``' model classes import, ``rlhf_fast.kernels`` is ours, and
``pip install --no-build-isolation -e .`` (which loads HF kernels' setuptools entry point) succeeds.

These run in a new virtual environment layered on this one (a ``.pth`` line adds this environment's
packages) with today's HF ``kernels``, ``setuptools`` and ``wheel`` installed into it, so they test what a
user's fresh machine has whatever this environment's versions are.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(python, args, cwd=ROOT, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A new venv (``.python``) seeing this environment's packages, with HF ``kernels`` and rlhf_fast installed
    editable from this checkout by ``pip install --no-build-isolation -e .`` (``.install``, pip's result)."""
    root = tmp_path_factory.mktemp("layered") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = Path(_run(python, ["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # This interpreter's package folders (its site-packages and whatever its .pth files added), never the root.
    def is_stdlib(p: Path) -> bool:  # the new venv has its own
        return (p / "os.py").is_file() or p.name == "lib-dynload"

    outer = dict.fromkeys(p for p in sys.path if p and Path(p).is_dir() and not is_stdlib(Path(p))
                          and not Path(p).resolve().is_relative_to(ROOT))  # fmt: skip
    (site / "_outer_environment.pth").write_text("\n".join(outer) + "\n")  # after the venv's own site-packages
    # Today's HF kernels (its dependencies are transformers' too) and a setuptools that builds wheels without
    # an isolated build environment: what a user who keeps their torch (--no-build-isolation) has.
    get = _run(python, ["-m", "pip", "install", "-q", "--no-deps", "--upgrade", "kernels", "pip", "setuptools", "wheel"])
    if get.returncode != 0:
        pytest.skip(f"HF kernels / setuptools could not be installed (package registry unreachable?): "
                    f"{(get.stderr.strip().splitlines() or ['no output'])[-1]}")  # fmt: skip
    install = _run(python, ["-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)])
    return SimpleNamespace(python=python, install=install)


def test_no_build_isolation_editable_install_with_hf_kernels(venv):
    assert venv.install.returncode == 0, venv.install.stderr[-3000:]


def test_root_imports_hf_kernels_transformers_and_ours(venv):
    assert venv.install.returncode == 0, venv.install.stderr[-3000:]
    code = (
        "import kernels, rlhf_fast, rlhf_fast.kernels.logprobs as ours\n"
        "from kernels import get_kernel\n"  # a name HF kernels has and our folder has not
        "from transformers import LlamaForCausalLM, Qwen2ForCausalLM\n"
        "import transformers.activations\n"  # imports HF kernels' hub layer when kernels is installed
        "print(kernels.__file__)\nprint(ours.__file__)\nprint(ours.__name__)\n"
    )
    out = _run(venv.python, ["-c", code])  # cwd = the repository root: '' is first on sys.path
    assert out.returncode == 0, out.stderr[-3000:]
    theirs, ours, name = out.stdout.split()
    assert not Path(theirs).resolve().is_relative_to(ROOT), theirs
    assert Path(ours).resolve() == ROOT / "kernels" / "logprobs.py"
    assert name == "rlhf_fast.kernels.logprobs"
    # the test runner's own path: python -m pytest from the root collects and imports transformers' models
    probe = _run(venv.python, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                        "tests/test_packaging_root.py::test_transformers_model_classes_import"])  # fmt: skip
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-2000:]


def test_transformers_model_classes_import():
    """Collected by the test above under ``python -m pytest`` in the layered venv (and run here too)."""
    import kernels  # noqa: F401  # whichever is installed; never the repository's folder
    from transformers import LlamaForCausalLM  # noqa: F401

    assert not Path(kernels.__file__).resolve().is_relative_to(ROOT)


def test_root_without_hf_kernels_has_no_top_level_kernels():
    """With no installed ``kernels`` package, ``import kernels`` from the root fails, naming rlhf_fast.kernels:
    the folder never runs as a top-level package (no second copy of the kernels under another name)."""
    code = (
        "import sys, os\n"
        "sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or '.', 'kernels')) or "
        "os.path.abspath(p or '.') == os.getcwd()]\n"
        "for name in ('kernels', 'kernels.logprobs', 'kernels._build'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        assert 'rlhf_fast.kernels' in str(exc), exc\n"
        "        assert not [m for m in sys.modules if m == 'kernels' or m.startswith('kernels.')], name\n"
        "    else:\n"
        "        raise SystemExit(f'{name} imported as a top-level module')\n"
        "print('ok')\n"
    )
    out = _run(sys.executable, ["-c", code])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-3000:]
