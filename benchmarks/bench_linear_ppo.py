"""``rf.linear_ppo_loss`` (the clipped policy loss with a KL penalty and an entropy bonus straight from the last
hidden states and the lm_head, the per-token gradient computed in the forward) against the composition it
replaces, ``rf.linear_logprobs`` + ``rf.ppo_policy_loss`` + ``rf.kl_penalty``, and the naive lm_head + log-softmax
loss trainers write.

    python -m benchmarks.bench_linear_ppo          # CPU: 8x512x256x50000 float32; CUDA: bf16, 16x512x4096x131072
    python -m benchmarks.bench_linear_ppo --shapes 2x32x32x1000 --modes full --no-save

Shapes are ``BxTxHxV``: ``B`` responses of ``T`` tokens (``N = B·T`` rows). Every method gets the same batch:
``hidden [B, T, H]`` and ``weight [V, H]`` requiring grad, labels, old and reference log-probs near the current
ones, whitened advantages, and a right-padded mask (rows end uniformly in ``[T/2, T]``). The loss: vanilla clip
0.2, ``kl_coef`` 0.05 with k3, ``entropy_coef`` 0.01, token-mean. Every method other than ``rlhf_fast`` checks on
its first (untimed) call that its loss equals ``rf.linear_ppo_loss``'s.

Work is counted in matmul passes of ``2·N·H·V`` FLOPs (:data:`MATMUL_PASSES`): the loss needs the logits and the
two gradient products; ``rf.linear_ppo_loss`` does all three in its forward (its backward only scales them),
the composition recomputes the logits in backward (four), naive keeps them (three, and the ``[N, V]`` tensors).
Results go to ``benchmarks/results/<device>/linear_ppo.{json,md,png}``.
"""

import functools
from collections.abc import Iterator

import torch

import rlhf_fast as rf

from . import harness
from .bench_linear_logprobs import cpu_matmul_rates as _linear_rates

CLIP = 0.2
KL_COEF = 0.05
ENTROPY_COEF = 0.01
IGNORE_INDEX = -100
_LOGP_NOISE = 0.05  # old / reference log-probs: the current ones plus noise of this size (a few updates back)
_MIN_FILL = 0.5
_LOSS_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
             torch.float16: dict(rtol=1e-2, atol=1e-3)}  # fmt: skip

# ------------------------------------------------------------------------------------------- methods


def _ours(hidden, weight, labels, old_logp, advantages, mask, ref_logp):
    loss, _ = rf.linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, ref_logp=ref_logp,
                                 kl_coef=KL_COEF, kl_estimator="k3", entropy_coef=ENTROPY_COEF, clip_low=CLIP,
                                 ignore_index=IGNORE_INDEX)  # fmt: skip
    return loss


def _composition(hidden, weight, labels, old_logp, advantages, mask, ref_logp):
    # What a trainer on our earlier ops writes: per-token log-probs and entropy, then the [B, T] loss terms.
    logp, entropy = rf.linear_logprobs(hidden, weight, labels, ignore_index=IGNORE_INDEX, return_entropy=True)
    per_token = rf.kl_penalty(logp, ref_logp, estimator="k3") * KL_COEF - ENTROPY_COEF * entropy
    clip, _ = rf.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=CLIP)
    return clip + rf.aggregate(per_token, mask)


def _naive(hidden, weight, labels, old_logp, advantages, mask, ref_logp):
    # The lm_head matmul, log_softmax in float32, every [N, V] intermediate kept for backward.
    logp_all = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ratio = torch.exp(logp - old_logp)
    clip = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - CLIP, 1 + CLIP))
    lr = ref_logp - logp
    k3 = torch.exp(lr) - 1 - lr
    per_token = clip + KL_COEF * k3 - ENTROPY_COEF * entropy
    return (per_token * mask).sum() / mask.sum()


def _checked(fn):
    """``fn`` whose first call checks its loss against ``rf.linear_ppo_loss`` on the same batch."""

    def run(**inputs):
        out = fn(**inputs)
        if not run.checked:
            with torch.no_grad():
                want = _ours(**{k: v.detach() for k, v in inputs.items()})
            torch.testing.assert_close(out.detach().float(), want.float(), **_LOSS_TOL[inputs["hidden"].dtype])
            run.checked = True
        return out

    run.checked = False
    return run


METHODS = (
    harness.Method("rlhf_fast", lambda: _ours,
                   "`rf.linear_ppo_loss(...)`: chunks of rows; each chunk's logits, statistics, per-token loss and its "
                   "dL/dlogits in the forward, d_hidden and d_weight accumulated there; backward scales them."),
    harness.Method("composition", lambda: _checked(_composition),
                   "`rf.linear_logprobs(..., return_entropy=True)` + `rf.ppo_policy_loss` + `rf.kl_penalty` (k3) + "
                   "`rf.aggregate`: statistics forward, the logits recomputed in backward."),
    harness.Method("naive", lambda: _checked(_naive),
                   "`log_softmax((hidden @ weight.T).float())`, gather, entropy, ratio, clip, k3: every [N, V] "
                   "intermediate kept for backward."),
)  # fmt: skip

# Matmul passes (2·N·H·V FLOPs each) per method: (forward, backward).
MATMUL_PASSES = {"rlhf_fast": (3, 0), "composition": (1, 3), "naive": (1, 2)}


def flops(r: dict) -> float:
    B, T, H, V = r["shape"]
    forward, backward = MATMUL_PASSES[r["method"]]
    return {"forward": forward, "backward": backward, "full": forward + backward}[r["mode"]] * 2.0 * B * T * H * V


def cpu_matmul_rates(shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, float]:
    B, T, H, V = shape
    return _linear_rates((B * T, H, V), dtype)


# --------------------------------------------------------------------------------- inputs


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    if len(shape) != 4:
        raise ValueError(f"linear_ppo shapes are BxTxHxV, got {harness.format_shape(shape)}")
    B, T, H, V = shape
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn((B, T, H), generator=gen, dtype=torch.float32, device=device)
    weight = torch.randn((V, H), generator=gen, dtype=torch.float32, device=device) * H**-0.5
    labels = torch.randint(0, V, (B, T), generator=gen, device=device)
    lengths = torch.randint(int(_MIN_FILL * T), T + 1, (B,), generator=gen, device=device).clamp(min=1)
    lengths[0] = T
    mask = (torch.arange(T, device=device)[None] < lengths[:, None]).float()
    labels.masked_fill_(mask == 0, IGNORE_INDEX)
    with torch.no_grad():
        logp = rf.linear_logprobs(hidden.to(dtype), weight.to(dtype), labels, ignore_index=IGNORE_INDEX)
    noise = lambda: _LOGP_NOISE * torch.randn((B, T), generator=gen, device=device) * mask  # noqa: E731
    advantages = torch.randn((B, T), generator=gen, device=device) * mask
    return {
        "hidden": hidden.to(dtype).requires_grad_(True),
        "weight": weight.to(dtype).requires_grad_(True),
        "labels": labels,
        "old_logp": logp + noise(),
        "advantages": advantages,
        "mask": mask,
        "ref_logp": logp + noise(),
    }


# ----------------------------------------------------------------------------------------- summary


def summarize(results: list[dict]) -> Iterator[str]:
    """rlhf_fast against the composition and naive, forward + backward; on CPU the bar of issue 14:
    at most 0.8x the composition's time (cold and warm) with no more peak memory."""
    for r, peer, p in harness.versus(results, ("composition", "naive"), mode="full"):
        t = r["median_ms"] / p["median_ms"]
        w = r["warm_median_ms"] / p["warm_median_ms"] if r.get("warm_median_ms") and p.get("warm_median_ms") else None
        m = r["peak_extra_mib"] / p["peak_extra_mib"] if p["peak_extra_mib"] > 0 else None
        line = (f"{harness.format_shape(r['shape'])} {r['dtype']} forward+backward: rlhf_fast {r['median_ms']:.0f} ms, "
                f"{r['peak_extra_mib']:.0f} MiB = {t:.2f}x {peer}'s time cold"
                + (f", {w:.2f}x warm" if w is not None else "")
                + (f", {m:.2f}x its peak extra memory" if m is not None else ""))  # fmt: skip
        if peer == "composition" and r["device"] == "cpu":
            met = t <= 0.8 and (w is None or w <= 0.8) and (m is None or m <= 1.0)
            line += ": " + harness.verdict(met, "the CPU bar (<= 0.8x time, <= 1x memory)")
        yield line


BENCHMARK = harness.declare(
    globals(),
    name="linear_ppo",
    title="`rf.linear_ppo_loss(hidden [B, T, H], weight [V, H], labels, old_logp, advantages, mask, ref_logp=...)`: "
    "the PPO policy loss from hidden states, its gradient computed in the forward, against the composition of "
    "our earlier ops and the naive lm_head + log-softmax loss.",
    grad_inputs=("hidden", "weight"),
    default_shapes={"cpu": ((8, 512, 256, 50000),), "cuda": ((16, 512, 4096, 131072),)},
    shape_format="BxTxHxV",
    baseline="composition",
    flops_formula="passes x 2·B·T·H·V: rlhf_fast 3 (all in forward), composition 1 + 3 (recompute), naive 1 + 2",
    cpu_matmul_rates=cpu_matmul_rates,
)


main = functools.partial(harness.main, BENCHMARK)  # main(argv=None): the command line (python -m, rlhf-fast bench)


if __name__ == "__main__":
    main()
