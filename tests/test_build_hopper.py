"""Every kernel compiles ahead of time for sm_90 and sm_80, without spills, with vectorized streaming loads.

A profiler without a GPU (see kernels/_aot.py): it catches GPU-only compile failures and obviously slow
code (scalar 16-bit loads, register spills) in CI. The compilation runs in a subprocess without
``TRITON_INTERPRET``, since interpreted kernels cannot be compiled.

Every check runs twice: with this environment's Triton, and with the GPU image's (``GPU_IMAGE_TRITON``,
fetched once into ``~/.cache/rlhf_fast`` and put first on ``PYTHONPATH`` of the subprocess; skipped, with
the reason, where the package registry cannot be reached). The kernels also run under that Triton's
interpreter (the GPU suite's correctness section, dry run).
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import native_env
from peer_wheels import wheel_site

# The GPU machine's Triton (benchmarks/README.md): the oldest release setup.py claims, tested here.
GPU_IMAGE_TRITON = "3.6.0"


def triton_site(version: str) -> Path:
    """A folder holding Triton ``version`` (``pip install --target``), downloaded once; skip if it cannot be."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip(f"Triton {version} wheels are for Linux x86_64")
    return wheel_site("triton", version)


def triton_env(version: str | None) -> dict:
    """This environment without ``TRITON_INTERPRET``; with Triton ``version`` first on the path if given."""
    env = native_env()
    if version is not None:
        site = triton_site(version)
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
        got = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert got.stdout.strip() == version, got.stdout + got.stderr
    return env

NARROW = ("LDG.E.U16", "LDG.E.S16", "LDG.E.U8", "LDG.E.S8")
VECTOR = ("LDG.E.128", "LDG.E.64")


@pytest.fixture(scope="module", params=[None, GPU_IMAGE_TRITON], ids=["installed-triton", "gpu-image-triton"])
def report(request):
    pytest.importorskip("triton")
    env = triton_env(request.param)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_fast.kernels._aot"], env=env, capture_output=True, text=True, timeout=1200
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows, out.stderr[-3000:]
    return rows


def test_every_kernel_is_built_for_both_archs(report):
    kernels = {r["kernel"] for r in report}
    assert {
        "_logprobs_fwd_kernel",
        "_logprobs_bwd_kernel",
        "_linear_logprobs_fwd_kernel",
        "_linear_logprobs_bwd_kernel",
        "_full_kl_fwd_kernel",
        "_full_kl_bwd_kernel",
        "_gae_kernel",
        "_pairwise_sigmoid_kernel",
        "_gumbel_argmax_kernel",
        "_row_threshold_kernel",
    } <= kernels
    for kernel in kernels:
        assert {r["arch"] for r in report if r["kernel"] == kernel} == {80, 90}
    for dtype in ("fp32", "bf16", "fp16"):
        assert any(r["config"].startswith(dtype) for r in report)
    # rf.logprobs' and rf.linear_logprobs' kernels in both specialisations: with the entropy, and log-probs only.
    for kernel in ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_linear_logprobs_fwd_kernel",
                   "_linear_logprobs_bwd_kernel"):  # fmt: skip
        configs = {r["config"] for r in report if r["kernel"] == kernel}
        for dtype in ("fp32", "bf16", "fp16"):
            assert any(c.startswith(dtype) and " entropy " in c for c in configs), (kernel, dtype)
            assert any(c.startswith(dtype) and " logp only " in c for c in configs), (kernel, dtype)
    # rf.logprobs' kernels in their truncated-sampling specialisation (a tau threshold per row)
    for kernel in ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"):
        configs = {r["config"] for r in report if r["kernel"] == kernel}
        for dtype in ("fp32", "bf16", "fp16"):
            assert any(c.startswith(dtype) and c.endswith(" truncated") for c in configs), (kernel, dtype)


def test_compiles_without_spills(report):
    for r in report:
        where = f"{r['kernel']} [{r['config']}] sm_{r['arch']}"
        assert "error" not in r, f"{where}: {r.get('error')}"
        assert r["local"] == 0 and r["stack"] == 0, f"{where} spills to local memory: {r}"
        assert 0 < r["registers"] <= 255, where


def test_streaming_loads_and_stores_are_vectorized(report):
    streaming = [r for r in report if r["streams_rows"]]
    assert streaming
    for r in streaming:
        where = f"{r['kernel']} [{r['config']}] sm_{r['arch']}"
        loads = r["global_loads"]
        assert any(k in loads for k in VECTOR), f"{where}: no vector loads in {loads}"
        narrow = sum(n for k, n in loads.items() if k in NARROW)
        assert narrow <= r["narrow_loads_allowed"], f"{where}: {narrow} narrow scalar loads in {loads}"
        if r["streams_out"]:
            assert any(k.startswith("STG.E.128") or k.startswith("STG.E.64") for k in r["global_stores"]), where


def test_matmul_tiles_use_tensor_cores(report):
    """bf16/fp16 tl.dot kernels: wgmma (HGMMA) on sm_90, mma.sync (HMMA) on sm_80."""
    tiles = [r for r in report if r["tensor_cores"]]
    assert tiles
    for r in tiles:
        expected = "HGMMA" if r["arch"] == 90 else "HMMA"
        assert expected in r["mma"], f"{r['kernel']} [{r['config']}] sm_{r['arch']}: {r['mma']}"


def test_kernels_run_under_the_gpu_image_triton_interpreter(tmp_path):
    """Every kernel and launcher specialisation, under the interpreter of the GPU image's Triton, against
    float64 (tiny shapes): the GPU suite's correctness section in a dry run."""
    env = triton_env(GPU_IMAGE_TRITON)
    out = subprocess.run([sys.executable, "-m", "rlhf_fast", "bench", "gpu", "--dry-run", "--sections", "correctness",
                          "--out", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "correctness.json").read_text())
    assert result["meta"]["versions"]["triton"] == GPU_IMAGE_TRITON
    assert result["rows"] and len(result["rows"]) == result["planned"]
    bad = [(r["case"], r["dtype"], r.get("reason") or r.get("worst")) for r in result["rows"] if r["status"] != "PASS"]
    assert not bad, bad

