"""``rf.gae`` (generalized advantage estimation over ``[B, T]`` rewards and values, no loop over T) against the
Python reverse loop over T that TRL and OpenRLHF write, and verl's masked loop.

    python -m benchmarks.bench_gae                         # 256x2048 right-padded, and 256x2048x8 (8 holes a row)
    python -m benchmarks.bench_gae --shapes 64x512 --methods rlhf_fast,python_loop --no-save

Shapes are ``BxT`` (right padding only) or ``BxTxH``: ``H`` masked spans (holes: say, tool outputs inside a
multi-turn response) per row, of 16 to 64 tokens each, inside the response. Every method gets the same
float32 ``rewards`` (0 everywhere except a score on each row's last response token), ``values`` and float32
``mask`` (1 = response token; response lengths uniform in ``[T/2, T]``, one row full), ``gamma=1.0``,
``lam=0.95``. GAE has no gradient: the benchmark is forward only, inputs not requiring grad.

Right padding: all methods compute the same numbers. With holes ``rf.gae`` and ``verl_loop`` skip the holes (the
tokens on either side are joined, as multi-turn trainers do); ``python_loop`` treats them as zero-reward,
zero-value steps, so its numbers differ there: it is timed, not matched, on that case (the work is the same).
Results go to ``benchmarks/results/<device>/gae.{json,md,png}``; the harness (``benchmarks/harness.py``)
describes how time and memory are measured.
"""

import functools
from collections.abc import Iterator

import torch

import rlhf_fast as rf
from rlhf_fast.reference import gae_reference

from . import harness

GAMMA, LAM = 1.0, 0.95
# Response lengths are uniform in [_MIN_FILL * T, T] (right padding after them); one row is full.
_MIN_FILL = 0.5
# Holes (masked spans inside a response) are 16 to 64 tokens long: a short tool output or observation.
_HOLE_LEN = (16, 64)

# ------------------------------------------------------------------------------------------- methods


def _rlhf_fast(impl: str = "auto"):
    return lambda rewards, values, mask: rf.gae(rewards, values, mask, gamma=GAMMA, lam=LAM, impl=impl)


def python_loop(rewards, values, mask, gamma: float = GAMMA, lam: float = LAM):
    """TRL's / OpenRLHF's GAE: padding zeroed in rewards and values, then a reverse loop over T on ``[B]`` columns
    (``rlhf_fast.reference.gae_reference(skip_holes=False)``, the tests' and the trainers' reference too)."""
    with torch.no_grad():
        return gae_reference(rewards, values, mask, gamma=gamma, lam=lam, skip_holes=False)


def verl_loop(rewards, values, mask, gamma: float = GAMMA, lam: float = LAM):
    """verl's ``compute_gae_advantage_return``: the loop carries ``nextvalues`` and ``lastgaelam`` across masked
    positions (holes are skipped). verl then whitens the advantages; here the outputs are zeroed where
    ``mask == 0`` instead, which gives ``rf.gae``'s numbers."""
    with torch.no_grad():
        rewards, values, mask = rewards.float(), values.float(), mask.float()
        nextvalues = 0.0
        lastgaelam = 0.0
        advantages_reversed = []
        for t in reversed(range(rewards.shape[1])):
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            # skip values and TD-error on observation tokens
            nextvalues = values[:, t] * mask[:, t] + (1 - mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * mask[:, t] + (1 - mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
        return advantages * mask, returns * mask


METHODS = (
    harness.Method(
        "rlhf_fast",
        _rlhf_fast,
        f"`rf.gae(rewards, values, mask, gamma={GAMMA}, lam={LAM})`, impl auto: Triton on CUDA (one program per "
        "row, a log-depth scan), the PyTorch implementation on CPU (a chunked discounted reverse cumsum: two small "
        "triangular matmuls; holes packed away first).",
    ),
    harness.Method(
        "rlhf_fast_torch",
        lambda: _rlhf_fast("torch"),
        "the same with `impl='torch'` (the PyTorch implementation; on CPU it is what auto runs).",
    ),
    harness.Method(
        "python_loop",
        lambda: python_loop,
        "TRL's / OpenRLHF's GAE: rewards and values multiplied by the mask, then `for t in reversed(range(T))`: "
        "`delta = r[:, t] + gamma * nextvalues - v[:, t]; lastgaelam = delta + gamma * lam * lastgaelam` on [B] "
        "columns, `torch.stack`, `returns = advantages + values`. Does not skip holes.",
    ),
    harness.Method(
        "verl_loop",
        lambda: verl_loop,
        "verl's `compute_gae_advantage_return` loop, which carries `nextvalues` and `lastgaelam` across masked "
        "positions (skips holes), without its final whitening; outputs zeroed where mask == 0.",
    ),
)

# ------------------------------------------------------------------------------------- inputs, bytes


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    if len(shape) not in (2, 3):
        raise ValueError(f"gae shapes are BxT or BxTxH (H holes per row), got {harness.format_shape(shape)}")
    B, T = shape[:2]
    holes = shape[2] if len(shape) == 3 else 0
    gen = torch.Generator(device=device).manual_seed(0)
    lengths = torch.randint(int(_MIN_FILL * T), T + 1, (B,), generator=gen, device=device).clamp(min=1)
    lengths[0] = T
    t = torch.arange(T, device=device)
    on = t[None] < lengths[:, None]
    if holes:
        # H spans per row, starting anywhere in the response before its last _HOLE_LEN[1] + 1 tokens (so the
        # last response token, which carries the score, stays in), possibly overlapping.
        hole_len = torch.randint(_HOLE_LEN[0], _HOLE_LEN[1] + 1, (B, holes), generator=gen, device=device)
        room = (lengths - _HOLE_LEN[1] - 1).clamp(min=1)
        start = (torch.rand((B, holes), generator=gen, device=device) * room[:, None]).long()
        in_hole = (t[None, None] >= start[..., None]) & (t[None, None] < (start + hole_len)[..., None])
        on &= ~in_hole.any(1)
    last = T - 1 - on.flip(1).int().argmax(1)  # each row's last response token
    rewards = torch.zeros((B, T), device=device)
    rewards[torch.arange(B, device=device), last] = torch.randn((B,), generator=gen, device=device)
    values = 0.5 * torch.randn((B, T), generator=gen, device=device)
    return {"rewards": rewards.to(dtype), "values": values.to(dtype), "mask": on.float()}


def bytes_moved(shape: tuple[int, ...], dtype: torch.dtype, mode: str) -> int:
    """Read rewards and values (``s`` bytes each) and the float32 mask; write float32 advantages and returns."""
    B, T = shape[:2]
    return B * T * (2 * dtype.itemsize + 4) + B * T * 2 * 4


# ----------------------------------------------------------------------------------------- summary

# Acceptance (issue 4): rf.gae against the Python loop at the right-padded 256x2048: CPU >= 10x faster, GPU >= 100x.
# Only judged at that shape: the loop's cost grows with T (launches), rf.gae's much less, so the speedup depends on it.
_ACCEPTANCE_SHAPE = (256, 2048)
_MIN_SPEEDUP = {"cpu": 10.0, "cuda": 100.0}


def summarize(results: list[dict]) -> Iterator[str]:
    """Speedup of rf.gae over the loops, per shape; the acceptance bar (vs python_loop) at the acceptance shape."""
    ok = {(tuple(r["shape"]), r["method"]): r for r in results if r.get("mode") and r["status"] == "ok"}
    for (shape, method), r in ok.items():
        if not method.startswith("rlhf_fast"):
            continue
        has_holes = len(shape) == 3 and shape[2] > 0
        speedups = []
        for loop in ("python_loop", "verl_loop"):
            base = ok.get((shape, loop))
            if base is not None:
                speedups.append((loop, base["median_ms"] / r["median_ms"], base["median_ms"]))
        if not speedups:
            continue
        line = f"{harness.format_shape(shape)}{' (holes)' if has_holes else ''} {method} {r['median_ms']:.2f} ms: " + \
            ", ".join(f"{s:.1f}x faster than {loop} ({ms:.1f} ms)" for loop, s, ms in speedups)  # fmt: skip
        bar = _MIN_SPEEDUP.get(r["device"])
        python = next((s for loop, s, _ in speedups if loop == "python_loop"), None)
        if shape == _ACCEPTANCE_SHAPE and python is not None and bar is not None:
            line += ": " + harness.verdict(python >= bar, f"the {r['device'].upper()} bar (>= {bar:.0f}x)")
        yield line


BENCHMARK = harness.declare(
    globals(),
    name="gae",
    title=f"`rf.gae(rewards [B, T], values [B, T], mask, gamma={GAMMA}, lam={LAM})`: generalized advantage "
    "estimation without a loop over T, against the Python reverse loop of TRL / OpenRLHF and verl's masked loop.",
    grad_inputs=(),  # no gradient: forward mode only
    bytes_formula="B·T·(2·s + 4) read (rewards and values, s bytes each; float32 mask) + 8·B·T written (float32 "
    "advantages and returns)",
    default_shapes={"cpu": ((256, 2048), (256, 2048, 8)), "cuda": ((256, 2048), (256, 2048, 8))},
    default_dtype={"cpu": torch.float32, "cuda": torch.float32},
    shape_format="BxT or BxTxH (H holes per row)",
    baseline="python_loop",
    # A call takes milliseconds (the loops tens to hundreds): more repeats than the harness's CPU default of 3.
    repeats={"cpu": 20},
    warmup={"cpu": 3},
)


main = functools.partial(harness.main, BENCHMARK)  # main(argv=None): the command line (python -m, rlhf-fast bench)


if __name__ == "__main__":
    main()
