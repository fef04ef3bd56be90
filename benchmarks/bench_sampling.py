"""One sampling step of the trainers' ``generate``: a token per row from ``softmax(logits / T)`` over ``[B, V]``
logits, with the counter-based Gumbel-max sampler (``rf.sample_tokens``: the rows' draws
do not depend on the batch or the number of processes) against what ``transformers`` does when sampling
(``softmax`` then ``torch.multinomial``, from the global RNG).

    python -m benchmarks.bench_sampling                    # B in {64, 256} x V = 151936 (GPU), smaller on CPU
    python -m benchmarks.bench_sampling --shapes 16x32000 --no-save

``rlhf_fast`` is one Triton kernel on CUDA (hash, perturb, argmax: one read of the logits) and the torch
implementation on CPU; ``rlhf_fast_torch`` is that torch implementation (~15 elementwise passes over int64
temporaries) everywhere. Called once per generated token, so its cost multiplies by the response length.
Results go to ``benchmarks/results/<device>/sampling.{json,md,png}``; the harness (``benchmarks/harness.py``)
describes how time and memory are measured.
"""

import functools

import torch

from rlhf_fast.sampling import sample_tokens
from rlhf_fast.train.rollout import row_seeds

from . import harness

TEMPERATURE = 0.9
POSITION = 7  # the response position the noise is keyed by (any: the cost does not depend on it)

# ------------------------------------------------------------------------------------------- methods


def _rlhf_fast(impl: str = "auto"):
    return lambda logits, seeds: sample_tokens(logits, seeds, POSITION, TEMPERATURE, impl=impl)


def multinomial(logits, seeds):
    """``transformers``' sampling step: temperature, float32 softmax, ``torch.multinomial`` (seeds unused)."""
    probs = torch.softmax(logits.float() / TEMPERATURE, dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


METHODS = (
    harness.Method(
        "rlhf_fast",
        _rlhf_fast,
        f"`sample_tokens(logits, seeds, position, {TEMPERATURE})`, impl auto: one Triton kernel on CUDA (splitmix64 "
        "noise, logits / T + Gumbel, per-row argmax in one read), the torch implementation on CPU.",
    ),
    harness.Method(
        "rlhf_fast_torch",
        lambda: _rlhf_fast("torch"),
        "the same with `impl='torch'`: the noise formed with torch int64 ops in chunks, then argmax.",
    ),
    harness.Method(
        "multinomial",
        lambda: multinomial,
        "what `transformers` runs when sampling: `softmax(logits.float() / T)`, `torch.multinomial(probs, 1)` from "
        "the global RNG (draws depend on the batch and the RNG state).",
    ),
)

# ------------------------------------------------------------------------------------- inputs, bytes


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    if len(shape) != 2:
        raise ValueError(f"sampling shapes are BxV, got {harness.format_shape(shape)}")
    B, V = shape
    gen = torch.Generator(device=device).manual_seed(0)
    logits = 4.0 * torch.randn((B, V), generator=gen, device=device)
    return {"logits": logits.to(dtype), "seeds": row_seeds(0, 0, range(B)).to(device)}


def bytes_moved(shape: tuple[int, ...], dtype: torch.dtype, mode: str) -> int:
    """Read the logits once (``s`` bytes each); the B tokens written are negligible."""
    B, V = shape
    return B * V * dtype.itemsize


BENCHMARK = harness.declare(
    globals(),
    name="sampling",
    title=f"One sampling step at T = {TEMPERATURE} over `[B, V]` logits: the counter-based Gumbel-max sampler the "
    "trainers use against `softmax` + `torch.multinomial`.",
    grad_inputs=(),  # no gradient: forward mode only
    bytes_formula="B·V·s read (the logits, s bytes each)",
    default_shapes={"cpu": ((16, 32000), (64, 32000)), "cuda": ((64, 151936), (256, 151936))},
    shape_format="BxV",
    baseline="multinomial",
    repeats={"cpu": 10},
    warmup={"cpu": 2},
)


main = functools.partial(harness.main, BENCHMARK)  # main(argv=None): the command line (python -m, rlhf-fast bench)


if __name__ == "__main__":
    main()
