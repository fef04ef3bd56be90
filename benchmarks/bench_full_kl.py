"""``rf.full_kl`` (per-row KL(softmax(logits) || softmax(ref_logits)) over the whole vocabulary) against eager
PyTorch and ``torch.compile``.

    python -m benchmarks.bench_full_kl                       # CPU: 2048x50000 float32; CUDA: 8192x151936 bf16
    python -m benchmarks.bench_full_kl --shapes 512x32000 --modes full --no-save

Every method gets the same ``[N, V]`` policy logits (requiring grad) and reference logits (no grad), the
reference 0.5 standard deviations from the policy. No peer library ships a full-vocabulary KL from logits.
Results go to ``benchmarks/results/<device>/full_kl.{json,md,png}``.
"""

import functools

import torch

import rlhf_fast as rf
from rlhf_fast.reference import full_kl_reference

from . import harness


def _eager(logits, ref_logits):
    # What a trainer writes: log_softmax of both in float32, KL summed over the vocabulary.
    return full_kl_reference(logits, ref_logits, mask_zero_probs=False)


METHODS = (
    harness.Method("rlhf_fast", lambda: lambda logits, ref_logits: rf.full_kl(logits, ref_logits),
                   "`rf.full_kl(logits, ref_logits)`, impl auto: Triton on CUDA, chunked PyTorch on CPU."),
    harness.Method("eager", lambda: _eager,
                   "`log_softmax` of both in float32, `(p * (log_p - log_q)).sum(-1)`: every [N, V] intermediate."),
    harness.Method("torch_compile", lambda: torch.compile(_eager, dynamic=False),
                   "`torch.compile(eager, dynamic=False)`; compile time shown as the first call's time.",
                   first_call_note="compile"),
)  # fmt: skip


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    N, V = shape
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn((N, V), generator=gen, dtype=torch.float32, device=device)
    ref = logits + 0.5 * torch.randn((N, V), generator=gen, dtype=torch.float32, device=device)
    return {"logits": logits.to(dtype).requires_grad_(True), "ref_logits": ref.to(dtype)}


def bytes_moved(shape: tuple[int, ...], dtype: torch.dtype, mode: str) -> int:
    """forward: read both logits (2·N·V·s), write the float32 KL; backward: read both and write dlogits
    (3·N·V·s) plus per-row statistics; full: the sum."""
    N, V = shape
    s = dtype.itemsize
    forward = 2 * N * V * s + 4 * N
    backward = 3 * N * V * s + 16 * N
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


BENCHMARK = harness.declare(
    globals(),
    name="full_kl",
    title="`rf.full_kl(logits [N, V], ref_logits [N, V])`: per-row KL over the whole vocabulary, against eager "
    "PyTorch and torch.compile.",
    grad_inputs=("logits",),
    bytes_formula="forward 2·N·V·s + 4·N, backward 3·N·V·s + 16·N, full the sum; s = element size",
    default_shapes={"cpu": ((2048, 50000),), "cuda": ((8192, 151936),)},
)


main = functools.partial(harness.main, BENCHMARK)  # main(argv=None): the command line (python -m, rlhf-fast bench)


if __name__ == "__main__":
    main()
