"""Test setup: seeds, the device under test, and the Triton interpreter on CPU-only machines.

On a machine without CUDA, ``TRITON_INTERPRET=1`` is set here, before ``rlhf_fast`` (and so its kernels)
is imported, so that ``impl="triton"`` runs the real kernels under the Triton interpreter. On a CUDA
machine the same tests run the compiled kernels natively, and the GPU-only cases (marked ``cuda``) run too.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, register_random, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# CI draws the same hypothesis examples every run (a submission must not pass or fail by luck); local
# runs keep drawing new ones, which is how new cases get found.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

import rlhf_fast  # noqa: E402,F401
from rlhf_fast._dispatch import triton_status  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_OK, INTERPRETED, _ = triton_status()

# impl values every op test runs through; triton needs a GPU or the interpreter
IMPLS = ["torch"] + (["triton"] if TRITON_OK and (DEVICE.type == "cuda" or INTERPRETED) else [])

# the property tests' draws: the dtypes every op takes, and a seed for the inputs built from it
FLOAT_DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
SEEDS = st.integers(0, 2**31 - 1)


class _TorchGlobalRNG:
    """torch's global generator in the shape hypothesis manages (``register_random``): hypothesis seeds it to 0
    before every example and restores it after, as it does ``random``'s. Without this, the tensors a test draws
    with ``torch.randn`` (not from the example's seed) depend on the examples run before it, so a failing
    example replays as a different case and hypothesis reports ``FlakyFailure`` (test_full_kl's gradient
    weights ``g`` did exactly this)."""

    def seed(self, seed):
        torch.manual_seed(seed)

    def getstate(self):
        return torch.random.get_rng_state()

    def setstate(self, state):
        torch.random.set_rng_state(state)


TORCH_RNG = _TorchGlobalRNG()  # a module global: hypothesis keeps only a weak reference
register_random(TORCH_RNG)


def random_cases(max_examples: int):
    """A hypothesis property test, once per impl of IMPLS: ``max_examples`` draws each, no deadline (the Triton
    interpreter is slow), function-scoped fixtures allowed (the autouse seed, ``device``: no draw depends on them)."""

    def decorate(test):
        test = settings(max_examples=max_examples, deadline=None,
                        suppress_health_check=[HealthCheck.function_scoped_fixture])(test)  # fmt: skip
        return pytest.mark.parametrize("impl", IMPLS)(test)

    return decorate


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


def run_native(args: list[str], timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python <args>`` from ``cwd`` (the checkout's root) in :func:`native_env`, its output captured as text."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=native_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def spawn_gloo(rank_fn, world: int, tmp: Path, *args) -> list:
    """``rank_fn(rank, world, *args)`` in ``world`` spawned processes joined in a gloo process group (the
    default group, one torch thread each, a file rendezvous under ``tmp``); each rank's result, rank order."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(rank_fn, world, str(tmp), args), nprocs=world, join=True)
    return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]


def _gloo_rank(rank: int, rank_fn, world: int, tmp: str, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        torch.save(rank_fn(rank, world, *args), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def check_native(code: str, timeout: float = 60) -> None:
    """``code`` in a fresh ``python -c`` (:func:`run_native`) must exit 0 having printed ``ok``."""
    proc = run_native(["-c", code], timeout)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def run_bench(name: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m benchmarks.bench_<name> <args>`` (:func:`run_native`), which must exit 0; the finished process."""
    proc = run_native(["-m", f"benchmarks.bench_{name}", *args], timeout)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


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
