"""``rf.ppo_loss_from_logits`` (the PPO policy loss straight from ``[B, T, V]`` logits: log-probs, entropy,
clipped surrogate, k3 KL penalty, entropy bonus, token-mean) against the eager composition trainers write,
``torch.compile`` of it, and ``rf.logprobs`` alone (the floor).

    python -m benchmarks.bench_ppo                       # CPU: 8x512x50000 float32; CUDA: bf16, 16x512x151936
    python -m benchmarks.bench_ppo --shapes 4x128x8000 --modes full --methods rlhf_fast,eager --no-save

Shapes are ``BxTxV`` (``N = B·T`` tokens). Every method gets the same batch (:func:`make_inputs`): logits
requiring grad, labels (valid ids everywhere, padding included, as trainers pass them), a right-padded response
mask, whitened ``[B, T]`` advantages, and old / reference log-probs near the current ones (so that some ratios
are clipped and the KL is not zero). The loss settings are those of a typical RLHF run: ``kl_coef=0.05`` with
the k3 estimator in the loss, ``entropy_coef=0.01``, clip 0.2, token-mean aggregation.

The op's floor is ``logprobs_floor``: ``rf.logprobs(..., return_entropy=True)`` and a sum, the same passes over
the logits (one forward, one backward) with none of the per-token loss. The fused op should cost little more.
Results go to ``benchmarks/results/<device>/ppo.{json,md,png}``; the harness (``benchmarks/harness.py``)
describes how time and memory are measured.
"""

import functools
from collections.abc import Iterator

import torch

import rlhf_fast as rf
from rlhf_fast.reference import ppo_loss_reference

from . import harness

# The loss settings every method uses (see the module docstring).
LOSS_KW = {"kl_coef": 0.05, "kl_estimator": "k3", "entropy_coef": 0.01}
# Spread of old_logp and ref_logp around the current log-probs: with 0.2 a fair share of the ratios
# exp(logp - old_logp) fall outside the clip range [0.8, 1.2] (as after a few minibatch steps), and the KL is
# of the size a run sees.
_LOGP_NOISE = 0.2
# Response lengths are uniform in [_MIN_FILL * T, T] (right padding after them); one row is full.
_MIN_FILL = 0.5
_PAD_ID = 0  # the padding positions' label: a real token id (the pad token), masked out by the mask
# Rows per chunk when computing the current log-probs in make_inputs: bounds its float32 temporary.
_INPUT_CHUNK_ROWS = 1024

# ------------------------------------------------------------------------------------------- methods


def _rlhf_fast(impl: str = "auto"):
    def run(logits, labels, old_logp, advantages, mask, ref_logp):
        # (loss, metrics): the metrics (clipfrac, approx_kl, entropy, kl, ...) are part of the op's cost
        return rf.ppo_loss_from_logits(logits, labels, old_logp, advantages, mask, ref_logp=ref_logp, impl=impl,
                                       **LOSS_KW)  # fmt: skip

    return run


def _eager(logits, labels, old_logp, advantages, mask, ref_logp):
    # The trainer's composition and the tests' reference: log_softmax(x.float()).gather, entropy from its exp
    # (no masking of 0 * -inf: the usual trainer code), ratio, clipped surrogate, k3, entropy bonus, token-mean.
    return ppo_loss_reference(logits, labels, old_logp, advantages, mask, ref_logp=ref_logp, mask_zero_probs=False,
                              **LOSS_KW)  # fmt: skip


def _make_eager():
    return _eager


def _make_logprobs_floor():
    def floor(logits, labels, old_logp, advantages, mask, ref_logp):
        # Both outputs feed the scalar, so the backward gets both gradients, as the PPO loss's does.
        logp, entropy = rf.logprobs(logits, labels, return_entropy=True)
        return logp.sum() + entropy.sum()

    return floor


def _make_liger_grpo():
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    def liger(logits, labels, old_logp, advantages, mask, ref_logp):
        # Liger takes logits of L + 1 positions and drops the last: the tokens are the last T - 1 of each row.
        # Its advantages are per sequence (the row's mean here); it has no entropy bonus.
        tail = lambda t: t[:, 1:].contiguous()  # noqa: E731
        loss, _ = triton_grpo_loss(logits, tail(old_logp), tail(ref_logp), tail(labels), advantages.mean(1),
                                   tail(mask), temperature=1.0, beta=0.05, eps_low=0.2, eps_high=0.2,
                                   loss_type="dapo", inplace=True, reduce=True)  # fmt: skip
        return loss

    return liger


METHODS = (
    harness.Method(
        "rlhf_fast",
        _rlhf_fast,
        "`rf.ppo_loss_from_logits(logits, labels, old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=0.05, "
        "kl_estimator='k3', entropy_coef=0.01)`, impl auto: on CUDA one Triton pass over the logits forward "
        "(log-prob, entropy, the whole per-token loss and its derivative) and one backward; on CPU `rf.logprobs`' "
        "chunked PyTorch implementation with the per-token loss as autograd over [B, T] tensors. Returns the loss "
        "and the metrics a trainer logs.",
    ),
    harness.Method(
        "rlhf_fast_torch",
        lambda: _rlhf_fast("torch"),
        "the same with `impl='torch'` (the chunked PyTorch implementation) on the GPU. On CPU it is what auto "
        "runs, so it is measured on CUDA only.",
        devices=("cuda",),
    ),
    harness.Method(
        "eager",
        _make_eager,
        "`rlhf_fast.reference.ppo_loss_reference(..., mask_zero_probs=False)`, the way TRL / verl / OpenRLHF "
        "compose it (and the tests' reference): `log_softmax(logits.float())` -> gather -> ratio -> clipped "
        "surrogate -> k3 -> entropy from `exp(logp_all) * logp_all` -> token-mean; every [N, V] float32 "
        "intermediate kept for backward.",
    ),
    harness.torch_compile_method(_eager),
    harness.Method(
        "logprobs_floor",
        _make_logprobs_floor,
        "`logp, entropy = rf.logprobs(logits, labels, return_entropy=True)` then `logp.sum() + entropy.sum()`, "
        "impl auto: the passes over the logits the fused op cannot avoid, without its per-token loss. The floor "
        "of the fused op, not a way to compute the loss.",
        note="floor: logprobs only",
    ),
    harness.Method(
        "liger_grpo",
        _make_liger_grpo,
        "`liger_kernel.transformers.grpo_loss.triton_grpo_loss(..., beta=0.05, loss_type='dapo', inplace=True, "
        "reduce=True)`: Liger's Triton GRPO loss from logits (token-mean clipped surrogate + k3 KL), gradient "
        "written into the logits buffer (the harness restores the logits before each repeat). Less work: no "
        "entropy, per-sequence advantages, the last T - 1 tokens of each row.",
        devices=("cuda",),
        requires=("liger_kernel", "triton"),
        overwrites_inputs=True,
        note="Liger: no entropy, T-1 tokens",
    ),
)

# ------------------------------------------------------------------------------------- inputs, bytes


def _current_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float32 ``log_softmax(logits)[labels]``, chunk by chunk (no [N, V] float32 temporary), no autograd."""
    V = logits.shape[-1]
    x, y = logits.detach().reshape(-1, V), labels.reshape(-1)
    out = torch.empty(y.shape, dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for r in range(0, x.shape[0], _INPUT_CHUNK_ROWS):
            rows = slice(r, r + _INPUT_CHUNK_ROWS)
            out[rows] = torch.log_softmax(x[rows].float(), dim=-1).gather(-1, y[rows, None]).squeeze(-1)
    return out.view(labels.shape)


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    if len(shape) != 3:
        raise ValueError(f"ppo shapes are BxTxV, got {harness.format_shape(shape)}")
    B, T, V = shape
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn((B, T, V), generator=gen, dtype=dtype, device=device)
    labels = torch.randint(0, V, (B, T), generator=gen, device=device)
    lengths = torch.randint(int(_MIN_FILL * T), T + 1, (B,), generator=gen, device=device).clamp(min=1)
    lengths[0] = T
    mask = (torch.arange(T, device=device)[None] < lengths[:, None]).float()
    labels.masked_fill_(mask == 0, _PAD_ID)
    logp = _current_logp(logits, labels)
    noise = lambda: _LOGP_NOISE * torch.randn((B, T), generator=gen, device=device)  # noqa: E731
    old_logp, ref_logp = logp + noise(), logp + noise()
    advantages = torch.randn((B, T), generator=gen, device=device)  # whitened, as masked_whiten leaves them
    return {
        "logits": logits.requires_grad_(True),
        "labels": labels,
        "old_logp": old_logp,
        "advantages": advantages,
        "mask": mask,
        "ref_logp": ref_logp,
    }


# Per token: labels (int64, 8 B) and old_logp, advantages, ref_logp, mask (float32, 4 B each) read in forward;
# forward writes logp, entropy (the metrics) and, for backward, lse and dloss/dlogp (float32); backward reads the
# label, lse, entropy and dloss/dlogp.
_FWD_TOKEN_BYTES = 8 + 4 * 4 + 4 * 4
_BWD_TOKEN_BYTES = 8 + 3 * 4


def bytes_moved(shape: tuple[int, ...], dtype: torch.dtype, mode: str) -> int:
    """The least traffic the fused op needs, with ``N = B·T`` and ``s`` the logits' element size.

    forward:  read the logits once (N·V·s) and the per-token inputs; write per-token results (40·N).
    backward: read the logits (N·V·s) and per-token label and statistics (20·N); write dlogits (N·V·s).
    full:     forward + backward. The same for every method (logprobs_floor moves slightly less per token).
    """
    B, T, V = shape
    N, s = B * T, dtype.itemsize
    forward = N * V * s + N * _FWD_TOKEN_BYTES
    backward = 2 * N * V * s + N * _BWD_TOKEN_BYTES
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


# ----------------------------------------------------------------------------------------- summary

# GPU acceptance (issue 4): the fused op at most 1.3x its floor and at least 5x faster than eager, full mode.
_GPU_MAX_VS_FLOOR = 1.3
_GPU_MIN_SPEEDUP = 5.0


def summarize(results: list[dict]) -> Iterator[str]:
    """rlhf_fast against eager and against its floor (logprobs_floor), per shape and mode; the acceptance bars.

    CPU: the PyTorch implementation's forward + backward must take less peak memory than eager.
    GPU: forward + backward at most 1.3x logprobs_floor's time and at least 5x faster than eager.
    """
    ok = {(tuple(r["shape"]), r["mode"], r["method"]): r for r in results if r.get("mode") and r["status"] == "ok"}
    for (shape, mode, method), r in ok.items():
        if method != "rlhf_fast":
            continue
        where = f"{harness.format_shape(shape)} {r['dtype']} {mode}"
        floor, eager = ok.get((shape, mode, "logprobs_floor")), ok.get((shape, mode, "eager"))
        if floor is not None:
            overlap = harness.ranges_overlap(r, floor)
            yield (
                f"{where}: rlhf_fast / logprobs_floor = {r['median_ms'] / floor['median_ms']:.2f}x time "
                f"({r['median_ms']:.1f} vs {floor['median_ms']:.1f} ms"
                + ("; their p20–p80 ranges overlap: a difference within the run-to-run spread" if overlap else "")
                + f"), {r['peak_extra_mib']:.0f} vs {floor['peak_extra_mib']:.0f} MiB peak extra"
            )
        if mode != "full" or eager is None:
            continue
        speedup = eager["median_ms"] / r["median_ms"]
        line = (
            f"{where}: rlhf_fast {r['median_ms']:.1f} ms, {r['peak_extra_mib']:.0f} MiB; eager "
            f"{eager['median_ms']:.1f} ms, {eager['peak_extra_mib']:.0f} MiB: {speedup:.2f}x faster, "
            + (f"{r['peak_extra_mib'] / eager['peak_extra_mib']:.2f}x eager's peak extra memory"
               if eager["peak_extra_mib"] > 0 else "eager's peak extra memory not measurable (0 MiB)")
        )
        if r["device"] == "cpu":
            less = r["peak_extra_mib"] < eager["peak_extra_mib"]
            line += ": " + harness.verdict(less, "the CPU bar (less peak memory than eager)")
        elif floor is not None:
            vs_floor = r["median_ms"] / floor["median_ms"]
            good = vs_floor <= _GPU_MAX_VS_FLOOR and speedup >= _GPU_MIN_SPEEDUP
            line += ": " + harness.verdict(good, f"the GPU bar (<= {_GPU_MAX_VS_FLOOR}x logprobs_floor, "
                                           f">= {_GPU_MIN_SPEEDUP:.0f}x faster than eager; here {vs_floor:.2f}x and "
                                           f"{speedup:.1f}x)")  # fmt: skip
        yield line


BENCHMARK = harness.declare(
    globals(),
    name="ppo",
    title="`rf.ppo_loss_from_logits(logits [B, T, V], labels, old_logp, advantages, mask, ref_logp=..., "
    "kl_coef=0.05, kl_estimator='k3', entropy_coef=0.01)`: the fused PPO policy loss, against the eager "
    "composition (TRL / verl / OpenRLHF), torch.compile, and rf.logprobs alone (the floor).",
    grad_inputs=("logits",),
    bytes_formula="with N = B·T and s the logits' element size: forward N·V·s + 40·N (read the logits and, per "
    "token, the int64 label and float32 old_logp, advantages, ref_logp, mask; write logp, entropy, lse, "
    "dloss/dlogp), backward 2·N·V·s + 20·N (read the logits and per-token label, lse, entropy, dloss/dlogp; "
    "write dlogits), full the sum",
    default_shapes={"cpu": ((8, 512, 50000),), "cuda": ((16, 512, 151936),)},
    shape_format="BxTxV",
    summarize=summarize,
)


main = functools.partial(harness.main, BENCHMARK)  # main(argv=None): the command line (python -m, rlhf-fast bench)


if __name__ == "__main__":
    main()
