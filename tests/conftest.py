"""Test setup: seeds, the device under test, and the Triton interpreter on CPU-only machines.

On a machine without CUDA, ``TRITON_INTERPRET=1`` is set here, before ``rlhf_fast`` (and so its kernels)
is imported, so that ``impl="triton"`` runs the real kernels under the Triton interpreter. On a CUDA
machine the same tests run the compiled kernels natively, and the GPU-only cases (marked ``cuda``) run too.
"""

import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI draws the same hypothesis examples every run (a submission must not pass or fail by luck); local
# runs keep drawing new ones, which is how new cases get found.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

import rlhf_fast  # noqa: E402,F401
from rlhf_fast._dispatch import triton_status  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_OK, INTERPRETED, _ = triton_status()

# impl values every op test runs through; triton needs a GPU or the interpreter
IMPLS = ["torch"] + (["triton"] if TRITON_OK and (DEVICE.type == "cuda" or INTERPRETED) else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (big shapes, native kernels)")
    # The interpreter evaluates 0 * -inf on the padded lanes of a block (then discarded by tl.where).
    warnings.filterwarnings("ignore", message="invalid value encountered", category=RuntimeWarning)


def pytest_collection_modifyitems(config, items):
    if DEVICE.type != "cuda":
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


def native_env() -> dict:
    """This process's environment without ``TRITON_INTERPRET``, for subprocesses that must compile kernels
    or run as a user would (this file sets it for the tests themselves)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _trainer_tests_on_one_thread(request, monkeypatch):
    """The trainer tests (test_train_*.py) run tiny models: fastest on one thread, and on a shared 2-core
    machine far faster than on two (a tiny matmul measured 0.18 ms on one thread, 0.8-6 ms on two)."""
    if not request.node.fspath.basename.startswith("test_train_"):
        yield
        return
    monkeypatch.setenv("RLHF_FAST_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device():
    return DEVICE
