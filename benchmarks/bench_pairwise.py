"""``rf.pairwise_sigmoid_loss`` (the Bradley-Terry loss of reward-model training) against the eager PyTorch
expression TRL's reward trainer writes, and ``torch.compile`` of it.

    python -m benchmarks.bench_pairwise                  # 4096 pairs, float32 (CPU) / bfloat16 (CUDA)
    python -m benchmarks.bench_pairwise --shapes 65536 --modes full --no-save

Shapes are ``P``, the number of pairs. Every method gets the same ``chosen`` and ``rejected`` rewards ``[P]``
(requiring grad; the reward model's scores of the preferred and the other completion) and a per-pair ``margin``
(TRL's optional ``margin`` column), and computes the mean loss ``-log sigmoid(beta·(chosen - rejected) - margin)``
with ``beta = 1`` (TRL has no beta) plus the two statistics TRL logs for each batch: the accuracy
``mean(chosen > rejected)`` and the mean margin ``mean(chosen - rejected)``.

The op is tiny (a 4096-pair batch is 48 KiB): its time is the cost of launching work, not of moving bytes. Beside
the time, the ``ops/call`` column counts that work for one call in the row's mode, from ``torch.profiler``
(:func:`count_ops`): on CUDA the kernels the GPU ran (every device-side activity), on CPU the top-level aten
operators dispatched plus the C++ kernels of a torch.compile'd graph (the summary adds every nested ``aten::``
event). They are counted once, in the process that draws the table (not in the timed workers), and saved with the
results. Results go to ``benchmarks/results/<device>/pairwise.{json,md,png}``; the harness
(``benchmarks/harness.py``) describes how time and memory are measured.
"""

import functools
from collections.abc import Iterator

import torch

import rlhf_fast as rf
from rlhf_fast.reference import pairwise_sigmoid_loss_reference

from . import harness

BETA = 1.0
# Rewards ~ N(0, 1) with the chosen ones shifted up by this: a reward model part way through training
# (accuracy ~ 0.7), so that neither the loss nor its gradient is saturated.
_CHOSEN_SHIFT = 0.75
# Per-pair margins uniform in [0, _MAX_MARGIN): TRL's optional "margin" column (a rating gap).
_MAX_MARGIN = 0.5

# ------------------------------------------------------------------------------------------- methods


def _rlhf_fast(impl: str = "auto"):
    def run(chosen, rejected, margin):
        # (loss, metrics): accuracy and margin come from the same launch
        return rf.pairwise_sigmoid_loss(chosen, rejected, margin=margin, beta=BETA, impl=impl, return_metrics=True)

    return run


def eager_pairwise(chosen, rejected, margin, beta: float = BETA):
    """TRL's ``RewardTrainer.compute_loss``: the loss ``-logsigmoid(chosen - rejected - margin).mean()`` (with a
    beta; the tests' reference), and its per-batch statistics under ``no_grad``: accuracy
    ``(chosen > rejected).float().mean()`` and the mean margin ``(chosen - rejected).mean()``."""
    loss = pairwise_sigmoid_loss_reference(chosen, rejected, margin=margin, beta=beta)
    with torch.no_grad():
        metrics = {
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean(),
        }
    return loss, metrics


def _make_eager():
    return eager_pairwise


METHODS = (
    harness.Method(
        "rlhf_fast",
        _rlhf_fast,
        "`rf.pairwise_sigmoid_loss(chosen, rejected, margin=margin, beta=1.0, return_metrics=True)`, impl auto: the Triton kernel on "
        "CUDA (loss, both gradients and the statistics in one launch), the PyTorch implementation on CPU.",
    ),
    harness.Method(
        "rlhf_fast_torch",
        lambda: _rlhf_fast("torch"),
        "the same with `impl='torch'` on the GPU. On CPU it is what auto runs, so it is measured on CUDA only.",
        devices=("cuda",),
    ),
    harness.Method(
        "eager",
        _make_eager,
        "`rlhf_fast.reference.pairwise_sigmoid_loss_reference` (`-F.logsigmoid(beta * (chosen - rejected) - "
        "margin).mean()`, the tests' reference), then `(chosen > rejected).float().mean()` and "
        "`(chosen - rejected).mean()` under `no_grad`: TRL's `RewardTrainer.compute_loss`.",
    ),
    harness.torch_compile_method(eager_pairwise),
)

# ------------------------------------------------------------------------------------------ inputs


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    if len(shape) != 1:
        raise ValueError(f"pairwise shapes are P (the number of pairs), got {harness.format_shape(shape)}")
    (P,) = shape
    gen = torch.Generator(device=device).manual_seed(0)
    chosen = torch.randn(P, generator=gen, device=device) + _CHOSEN_SHIFT
    rejected = torch.randn(P, generator=gen, device=device)
    margin = _MAX_MARGIN * torch.rand(P, generator=gen, device=device)
    return {
        "chosen": chosen.to(dtype).requires_grad_(True),
        "rejected": rejected.to(dtype).requires_grad_(True),
        "margin": margin.to(dtype),
    }


# ----------------------------------------------------------------------------------- op counting


@functools.lru_cache(maxsize=None)
def count_ops(method: str, shape: tuple[int, ...], dtype: str, device: str, mode: str) -> tuple[int, int | None]:
    """Work one call dispatches in ``mode``, from ``torch.profiler``: ``(ops, aten_events)``.

    CUDA: ``ops`` = the device-side activities (kernels, memsets, copies) the call ran; ``aten_events`` None.
    CPU: ``ops`` = the top-level aten operators (those not called from inside another aten operator: what the
    Python code and the autograd engine asked for) plus the kernels of torch.compile'd graphs (recorded with
    Inductor's ``cpp.enable_kernel_profile``; a compiled graph calls them without going through aten);
    ``aten_events`` = every ``aten::`` event, nested ones included (allocations, dtype copies, the sum inside
    a mean).

    The call is the harness's (``harness.build_case``), after two warmup calls (compilation, lazy init), with
    its untimed setup (the fresh forward of ``backward`` mode) outside the profiled region.
    """
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device)
    torch._dynamo.reset()  # compile afresh, with the kernel profiling below
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        fn = BENCHMARK.method(method).make()
        inputs = make_inputs(shape, harness.DTYPES[dtype], dev)
        case = harness.build_case(fn, inputs, BENCHMARK.grad_inputs, mode)
        for _ in range(2):
            case.run(case.setup() if case.setup is not None else None)
        state = case.setup() if case.setup is not None else None
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        with profile(activities=activities) as prof:
            case.run(state)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
    events = prof.events()
    if dev.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA), None
    aten = [e for e in events if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    compiled_kernels = [e for e in events if "cpp_fused" in e.name]
    return len(top) + len(compiled_kernels), len(aten)


def _ops_cell(r: dict) -> str:
    """``N kernels`` (CUDA) or ``N ops`` (CPU, see :func:`count_ops`): counted on the first drawing of the table
    and kept in ``r``, so that the saved JSON holds it and ``--report-only`` redraws it without a device."""
    if "ops_per_call" not in r and r["status"] == "ok":
        if r["device"] == "cpu" or torch.cuda.is_available():
            r["ops_per_call"], r["aten_events_per_call"] = count_ops(
                r["method"], tuple(r["shape"]), r["dtype"], r["device"], r["mode"]
            )
    n = r.get("ops_per_call")
    if n is None:
        return "—"
    unit = "kernel" if r["device"] == "cuda" else "op"
    return f"{n} {unit}" + ("" if n == 1 else "s")


# ----------------------------------------------------------------------------------------- summary


def summarize(results: list[dict]) -> Iterator[str]:
    """rlhf_fast against eager (and torch.compile), per shape and mode: time and ops per call."""
    for r, peer, p in harness.versus(results, ("eager", "torch_compile")):
        ops = ""
        if r.get("ops_per_call") is not None and p.get("ops_per_call") is not None:
            if r["device"] == "cuda":
                ops = f"; {r['ops_per_call']} vs {p['ops_per_call']} kernels per call"
            else:
                ops = (f"; {r['ops_per_call']} vs {p['ops_per_call']} ops per call (top-level aten ops + compiled "
                       f"kernels), {r['aten_events_per_call']} vs {p['aten_events_per_call']} aten events")
        yield (
            f"{harness.format_shape(r['shape'])} pairs {r['dtype']} {r['mode']}: rlhf_fast "
            f"{1e3 * r['median_ms']:.0f} µs vs {peer} {1e3 * p['median_ms']:.0f} µs: {r['median_ms'] / p['median_ms']:.2f}x its time"
            + (" (p20–p80 ranges overlap: within the run-to-run spread)" if harness.ranges_overlap(r, p) else "")
            + ops
        )
    if any(r.get("mode") and r["status"] == "ok" and r["device"] == "cpu" for r in results):
        yield (
            "CPU: the arithmetic of 4096 pairs takes microseconds. The harness runs gc.collect() before each "
            "timed call, so every call starts cold (caches, the Python and dispatcher paths): that, per-op "
            "dispatch and, on a shared 2-core machine, waits for a busy core in parallel regions (F.logsigmoid, "
            "in every method, opens one even at this size) make up these times. Differences inside the p20–p80 "
            "spread are none; the op counts are the stable comparison."
        )


BENCHMARK = harness.declare(
    globals(),
    name="pairwise",
    title="`rf.pairwise_sigmoid_loss(chosen [P], rejected [P], margin=margin [P], beta=1.0)`: the Bradley-Terry "
    "loss of reward-model training with TRL's accuracy and margin statistics, against TRL's eager expression and "
    "torch.compile of it. A tiny op: time is launch cost; ops/call counts the work one call dispatches.",
    grad_inputs=("chosen", "rejected"),
    bytes_moved=None,  # 12 bytes a pair: at 4096 pairs no method comes near any bandwidth; not reported
    default_shapes={"cpu": ((4096,),), "cuda": ((4096,),)},
    shape_format="P",
    baseline="eager",
    extra_columns=(("ops/call", _ops_cell),),
    # Calls of tens of microseconds: many repeats for a stable median (CPU perf_counter; CUDA do_bench picks its own
    # count except in backward mode, whose loop with a setup uses these).
    repeats={"cpu": 300, "cuda": 200},
    warmup={"cpu": 20, "cuda": 10},
)


main = functools.partial(harness.main, BENCHMARK)  # main(argv=None): the command line (python -m, rlhf-fast bench)


if __name__ == "__main__":
    main()
