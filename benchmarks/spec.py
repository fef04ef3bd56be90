"""What a benchmark is (``Method``, ``Benchmark``), one measured case (``Case``, ``build_case``), the run's
options (``BenchRun``) and the paths and constants the harness shares. Part of the harness (benchmarks/harness.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# This folder is importable twice: as ``benchmarks`` from a checkout's root (``python -m benchmarks.bench_x``)
# and as ``rlhf_fast.benchmarks`` from an installation (``rlhf-fast bench x``, any directory).
PACKAGE = __package__ or "benchmarks"


def results_dir(slug: str) -> Path:
    """Default results folder: ``benchmarks/results/<slug>`` under the current directory."""
    return Path.cwd() / "benchmarks" / "results" / slug


def module_name(module: str) -> str:
    """``benchmarks.bench_x`` as this installation imports it (``rlhf_fast.benchmarks.bench_x`` when installed)."""
    return f"{PACKAGE}.{module.rsplit('.', 1)[-1]}"


def module_cwd() -> Path | None:
    """Where ``python -m <module_name(...)>`` resolves: the checkout's root for ``benchmarks``, anywhere else."""
    return REPO_ROOT if PACKAGE == "benchmarks" else None

MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 1 << 20

# CPU runs take seconds per call at real sizes: a few repeats after one warmup call (the first call of a
# fresh process pays page faults and thread-pool start-up, ~3x a steady call at 4096x50000).
# On CUDA only the loop with an untimed setup uses these; do_bench picks its own count (25 ms warmup,
# 100 ms of repeats, Triton's defaults).
DEFAULT_REPEATS = {"cpu": 3, "cuda": 20}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 3}
# Zeroed before each CUDA-event-timed run to flush L2 (as do_bench does): larger than any L2 (H100: 50 MiB).
_L2_FLUSH_BYTES = 256 * MIB
# Ceilings: a 1 GiB device-to-device copy (moves 2 GiB: read + write) and an 8192^3 bf16 matmul are large
# enough to reach steady-state bandwidth / tensor-core rate on any current GPU.
_COPY_BYTES = 1 << 30
_MATMUL_SIZE = 8192
RESULT_MARKER = "@@bench-result@@ "
# A worker that takes longer than this is stuck (the slowest default CPU case takes well under a minute).
_WORKER_TIMEOUT_S = 3600


# ------------------------------------------------------------------------------------------ description


@dataclass(frozen=True)
class Method:
    """One way of computing the op.

    ``make()`` returns ``fn(**inputs) -> Tensor | tuple[Tensor, ...]``; it may import a peer library or
    wrap with ``torch.compile`` and may raise (the method is then reported as skipped or failed, the run
    goes on).
    """

    name: str
    make: Callable[[], Callable[..., Any]]
    description: str
    modes: tuple[str, ...] = MODES
    devices: tuple[str, ...] = ("cpu", "cuda")
    requires: tuple[str, ...] = ()  # modules it imports, checked (without importing) before running
    overwrites_inputs: bool = False  # its backward writes over its inputs: restore them before each repeat
    note: str = ""  # short, shown in the table's note column
    first_call_note: str = ""  # e.g. "compile": show the first call's time (one-off cost) in the table


def torch_compile_method(fn: Callable[..., Any], of: str = "eager", more: str = "",
                         wrap: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None) -> Method:
    """The ``torch_compile`` method the op benchmarks compare: ``torch.compile(fn, dynamic=False)``. Compilation
    happens on the first call (the harness's untimed warmup), and is reported apart. ``of`` names ``fn`` in the
    description, ``more`` adds to it; ``wrap`` wraps the compiled function (a benchmark's check of its output)."""

    def make():
        compiled = torch.compile(fn, dynamic=False)
        return compiled if wrap is None else wrap(compiled)

    return Method("torch_compile", make, f"`torch.compile({of}, dynamic=False)`; compile time is excluded from the "
                  "timing and shown as the first call's time." + more, first_call_note="compile")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Benchmark:
    """An op to benchmark: its inputs, the methods compared and the bytes it must move."""

    name: str  # results file stem
    title: str  # one line for the markdown header
    methods: tuple[Method, ...]
    make_inputs: Callable[[tuple[int, ...], torch.dtype, torch.device], dict[str, torch.Tensor]]
    grad_inputs: tuple[str, ...]  # inputs differentiated in the backward and full modes
    default_shapes: dict[str, tuple[tuple[int, ...], ...]]  # per device type
    # importable module defining it, run as ``python -m <module>`` for CPU workers ("": benchmarks.bench_<name>)
    module: str = ""
    # Minimum traffic of the op per mode (GB/s column), or None for an op whose bound is compute (see flops).
    bytes_moved: Callable[[tuple[int, ...], torch.dtype, str], int] | None = None
    bytes_formula: str = ""  # that formula in words, for the markdown ("" without bytes_moved)
    # per device type: float32 on CPU, bfloat16 on CUDA unless the op says otherwise
    default_dtype: dict[str, torch.dtype] = field(default_factory=lambda: {"cpu": torch.float32, "cuda": torch.bfloat16})
    shape_format: str = "NxV"
    baseline: str = "eager"
    summarize: Callable[[list[dict]], Iterable[str]] | None = None  # extra lines for the report
    # Floating-point operations one call performs, from a result dict (its "shape", "mode", "method",
    # "device", "dtype"): adds a TFLOP/s column and, on GPU, its fraction of the measured bf16 matmul rate.
    # Per method, because methods may do different work (e.g. recompute a product in backward). None: no column.
    flops: Callable[[dict], float | None] | None = None
    flops_formula: str = ""  # that formula in words, for the markdown
    # Extra table columns after "method": (header, cell text from a result dict), e.g. the work a method does.
    extra_columns: tuple[tuple[str, Callable[[dict], str]], ...] = ()
    # The modes the op has: all of MODES for a differentiable op, ("forward",) for one without a gradient (the
    # default when grad_inputs is empty).
    modes: tuple[str, ...] | None = None
    # Per device type, overrides of DEFAULT_REPEATS / DEFAULT_WARMUP: an op of a few milliseconds needs more
    # repeats than the seconds-long default cases (the --repeats / --warmup flags override both).
    repeats: dict[str, int] | None = None
    warmup: dict[str, int] | None = None
    # CPU ceiling of a compute-bound op: ``fn(shape, dtype) -> {pass name: GFLOP/s}``, the machine's measured
    # rate for each matmul pass of the op at that shape (plain torch products, the op's own layouts). Adds
    # "% mm" (achieved TFLOP/s over the rate of the same passes) to CPU tables: CPUs differ between machines,
    # and a fraction of the machine's own rate travels where milliseconds do not.
    cpu_matmul_rates: Callable[[tuple[int, ...], torch.dtype], dict[str, float]] | None = None

    def __post_init__(self):
        if not self.module:
            object.__setattr__(self, "module", f"benchmarks.bench_{self.name}")
        if self.modes is None:
            object.__setattr__(self, "modes", MODES if self.grad_inputs else ("forward",))
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ValueError(f"{self.name}: modes must be a non-empty subset of {MODES}, got {self.modes}")
        if not self.grad_inputs and self.modes != ("forward",):
            raise ValueError(f"{self.name}: without grad_inputs there is nothing to differentiate: modes=('forward',)")

    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise ValueError(f"unknown method {name!r}; {self.name} has {[m.name for m in self.methods]}")


# The parts a ``bench_<op>.py`` module defines (or imports) under these names, and the Benchmark field each fills.
MODULE_PARTS = {"METHODS": "methods", "make_inputs": "make_inputs", "bytes_moved": "bytes_moved",
                "summarize": "summarize", "flops": "flops", "cpu_matmul_rates": "cpu_matmul_rates"}  # fmt: skip


def declare(namespace: dict[str, Any], **fields: Any) -> Benchmark:
    """A bench module's :class:`Benchmark`, ``declare(globals(), name=..., title=..., ...)``: the module's parts
    named as in ``MODULE_PARTS`` (``METHODS`` and ``make_inputs`` always; ``bytes_moved``, ``summarize``, ``flops``,
    ``cpu_matmul_rates`` where the module has them) fill their fields, ``fields`` the rest (and win over a part)."""
    parts = {field_: namespace[name] for name, field_ in MODULE_PARTS.items() if name in namespace}
    return Benchmark(**{**parts, **fields})


# ------------------------------------------------------------------------------------------- one case


@dataclass
class Case:
    """What one measurement runs: ``state = setup()`` untimed (if any), then ``run(state)`` timed.

    ``run`` returns what it computed; the harness drops it after stopping the clock, so freeing outputs
    and saved tensors is not timed.
    """

    run: Callable[[Any], Any]
    setup: Callable[[], Any] | None
    grad_to_none: list[torch.Tensor]


def build_case(
    fn: Callable[..., Any],
    inputs: dict[str, torch.Tensor],
    grad_inputs: tuple[str, ...],
    mode: str,
    overwrites_inputs: bool = False,
) -> Case:
    """The (setup, run) pair measuring ``fn(**inputs)`` in ``mode`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    targets = [inputs[name] for name in grad_inputs]
    grad_outputs: list[torch.Tensor] = []  # ones shaped like the outputs, made on the first (warmup) call

    def forward() -> list[torch.Tensor]:
        outs = fn(**inputs)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]

    def backward(outs: list[torch.Tensor]):
        if not grad_outputs:
            grad_outputs.extend(torch.ones_like(o) for o in outs)
        return torch.autograd.grad(outs, targets, grad_outputs)

    restore = None
    if overwrites_inputs and mode != "forward":
        pristine = [(t, t.detach().clone()) for t in targets]

        def restore():
            with torch.no_grad():
                for t, saved in pristine:
                    t.copy_(saved)

    if mode == "forward":
        return Case(run=lambda _: forward(), setup=None, grad_to_none=targets)
    if mode == "backward":

        def fresh_forward():
            if restore is not None:
                restore()
            return forward()

        return Case(run=backward, setup=fresh_forward, grad_to_none=targets)
    return Case(run=lambda _: backward(forward()), setup=restore, grad_to_none=targets)


@dataclass
class BenchRun:
    """One benchmark run's options (from the command line, or the GPU suite): what to measure and how.
    Not a trainer's ``rlhf_fast.train.loop.RunConfig``."""

    device: torch.device
    dtype: torch.dtype
    shapes: list[tuple[int, ...]]
    modes: list[str]
    methods: list[str]
    repeats: int
    warmup: int
    isolate: bool  # CPU: one subprocess per measurement
    warm: bool = False  # CPU, isolated: also time every case warm, in this one process (see run_benchmark)
    module: str = ""  # for the recorded command line
    argv: tuple[str, ...] = ()


# Untimed calls before the warm repeats: the first pays one-off costs (compile, first-touch page faults of the
# heap), the second finds the allocator and caches as a training loop's later steps do.
WARM_WARMUP = 2


def format_shape(shape) -> str:
    return "x".join(str(s) for s in shape)
