"""``rf.linear_dpo_loss`` (the sigmoid DPO policy loss straight from the last hidden states and the lm_head
weight, without the ``[N, V]`` logits) against the naive PyTorch DPO TRL-style trainers write, ``torch.compile``
of it, and Liger-Kernel's ``LigerFusedLinearDPOLoss``.

    python -m benchmarks.bench_linear_dpo          # CPU: 8x512x256x32000 float32; CUDA: bf16, 8x512x4096x128256
    python -m benchmarks.bench_linear_dpo --shapes 2x64x32x1000 --modes full --methods rlhf_fast,naive --no-save

Shapes are ``PxTxHxV``: ``P`` preference pairs of ``T`` tokens, so ``hidden [2P, T, H]`` (the chosen rows, then
the rejected rows, as DPO batches them) and ``N = 2·P·T`` tokens. Every method gets the same batch
(:func:`make_inputs`): ``hidden`` and ``weight`` requiring grad, labels with the prompt positions and the right
padding set to ``ignore_index`` (-100), and the reference model's sequence log-probs, precomputed once (as
TRL's ``precompute_ref_log_probs`` and our DPO trainer do) from a reference model close to the policy
(``ref_hidden``, ``ref_weight``: the policy's plus a little noise). The loss: sigmoid DPO, ``beta = 0.1``, no
label smoothing, summed (not averaged) sequence log-probs, mean over pairs.

Liger (0.8.5) takes no precomputed reference log-probs: either it runs the reference lm_head itself
(``use_ref_model=True``, from ``ref_hidden`` and ``ref_weight``; one more matmul pass, without gradient, than the
other methods) or it takes them to be 0 (``use_ref_model=False``: the same work as the other methods, a different
loss value). Both are measured: ``liger_dpo`` computes exactly our loss, ``liger_dpo_noref`` our work. Liger
computes the gradients inside its forward call (``torch.func.grad_and_value`` per chunk of pairs) and its
backward only scales them, so compare the methods in ``full`` mode (forward + backward).

Every method other than ``rlhf_fast`` checks, on its first call (untimed warmup), that its loss equals
``rf.linear_dpo_loss``'s on the same batch (``liger_dpo_noref`` against ``rf.linear_dpo_loss`` with zero reference
log-probs); a mismatch fails the method. Work is counted in matmul passes of ``2·N·H·V`` FLOPs (see
:data:`MATMUL_PASSES`). Results go to ``benchmarks/results/<device>/linear_dpo.{json,md,png}``; the harness
(``benchmarks/harness.py``) describes how time and memory are measured.
"""

import functools
from collections.abc import Iterator

import torch

import rlhf_fast as rf
from rlhf_fast.reference import linear_dpo_loss_reference

from . import harness

BETA = 0.1
IGNORE_INDEX = -100
# The reference model is the policy plus noise of this relative size (on hidden and weight): the policy after
# some DPO steps, log-ratios of a few nats per sequence.
_REF_NOISE = 0.05
# Prompt lengths are uniform in [T/8, T/4] (labels ignored there); sequence ends uniform in [T/2, T], right
# padding after them (ignored too); row 0 runs to T.
_PROMPT_FRACTION = (1 / 8, 1 / 4)
_MIN_FILL = 0.5
# Loss agreement demanded of every method on its first call, against rf.linear_dpo_loss, per dtype.
_LOSS_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
             torch.float16: dict(rtol=1e-2, atol=1e-3)}  # fmt: skip

# ------------------------------------------------------------------------------------------- methods


def _rlhf_fast_loss(hidden, weight, labels, ref_chosen_logp, ref_rejected_logp, impl="auto", skip_ignored=False):
    # (loss, metrics): the metrics (rewards, accuracy, margin) are part of the op's cost
    return rf.linear_dpo_loss(hidden, weight, labels, ref_chosen_logp, ref_rejected_logp, beta=BETA,
                              ignore_index=IGNORE_INDEX, impl=impl, skip_ignored=skip_ignored)  # fmt: skip


def _rlhf_fast(impl: str = "auto", skip_ignored: bool = False):
    def run(hidden, weight, labels, ref_chosen_logp, ref_rejected_logp, ref_hidden, ref_weight):
        return _rlhf_fast_loss(hidden, weight, labels, ref_chosen_logp, ref_rejected_logp, impl, skip_ignored)

    return run


def _naive(hidden, weight, labels, ref_chosen_logp, ref_rejected_logp, ref_hidden, ref_weight):
    # The tests' reference, in the input dtype: the lm_head builds the [2P, T, V] logits, then TRL's
    # get_batch_logps (log_softmax of the upcast logits, gather, masked sum) and its DPO loss and metrics.
    return linear_dpo_loss_reference(hidden, weight, labels, ref_chosen_logp, ref_rejected_logp, beta=BETA,
                                     ignore_index=IGNORE_INDEX)  # fmt: skip


def _checked(fn, zero_ref: bool = False):
    """``fn`` whose first call also checks its loss against ``rf.linear_dpo_loss`` on the same inputs
    (with zero reference log-probs when ``zero_ref``: what ``liger_dpo_noref`` computes) and raises if they differ."""
    state = {"checked": False}

    def run(hidden, weight, labels, ref_chosen_logp, ref_rejected_logp, ref_hidden, ref_weight):
        out = fn(hidden, weight, labels, ref_chosen_logp, ref_rejected_logp, ref_hidden, ref_weight)
        if not state["checked"]:
            loss = out[0] if isinstance(out, tuple) else out
            refs = (ref_chosen_logp, ref_rejected_logp)
            refs = tuple(torch.zeros_like(r) for r in refs) if zero_ref else refs
            with torch.no_grad():
                ours, _ = _rlhf_fast_loss(hidden.detach(), weight.detach(), labels, *refs)
            torch.testing.assert_close(loss.detach().float(), ours.float(), **_LOSS_TOL[hidden.dtype],
                                       msg=lambda m: f"loss differs from rf.linear_dpo_loss's: {m}")  # fmt: skip
            state["checked"] = True
        return out

    return run


def _make_naive():
    return _checked(_naive)


def _make_liger(use_ref_model: bool):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # Its defaults otherwise (chunk_size=1 pair, compiled=True: torch.compile of the per-chunk forward + grad),
    # with our loss: beta 0.1, sigmoid, no label smoothing, summed log-probs (average_log_prob=False), mean over pairs.
    loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, use_ref_model=use_ref_model,
                                      average_log_prob=False, loss_type="sigmoid")  # fmt: skip

    def liger(hidden, weight, labels, ref_chosen_logp, ref_rejected_logp, ref_hidden, ref_weight):
        # forward(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias) ->
        # (loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards,
        # rejected_rewards))
        if use_ref_model:
            return loss_fn(weight, hidden, labels, None, ref_hidden, ref_weight, None)
        return loss_fn(weight, hidden, labels)

    return _checked(liger, zero_ref=not use_ref_model)


METHODS = (
    harness.Method(
        "rlhf_fast",
        _rlhf_fast,
        "`rf.linear_dpo_loss(hidden, weight, labels, ref_chosen_logp, ref_rejected_logp, beta=0.1)`, impl auto "
        "(Triton on CUDA, the chunked PyTorch implementation on CPU), on top of `rf.linear_logprobs`. Returns the "
        "loss and the metrics a trainer logs.",
    ),
    harness.Method(
        "rlhf_fast_skip",
        lambda: _rlhf_fast(skip_ignored=True),
        "the same with `skip_ignored=True` (what `rlhf-fast train dpo` uses): the prompt and padding rows (about 40% "
        "of the rows here) are dropped before any matmul. The same loss and gradients; TFLOP/s counts every row.",
        note="skip_ignored=True",
    ),
    harness.Method(
        "naive",
        _make_naive,
        "`rlhf_fast.reference.linear_dpo_loss_reference` (the tests' reference) in the input dtype: "
        "`F.linear(hidden, weight)` -> `log_softmax(logits.float())` -> gather -> masked sum per sequence "
        "(TRL's `get_batch_logps`) -> `-logsigmoid(beta * (chosen_logratio - rejected_logratio)).mean()` and TRL's "
        "metrics (detached): the way TRL-style trainers compose DPO. Keeps the [N, V] logits and their float32 "
        "log-softmax for backward.",
    ),
    harness.torch_compile_method(_naive, of="naive", wrap=_checked),
    harness.Method(
        "liger_dpo",
        lambda: _make_liger(use_ref_model=True),
        "`liger_kernel.chunked_loss.LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True, average_log_prob=False)"
        "(weight, hidden, labels, None, ref_hidden, ref_weight)`: chunks of one pair (its default), each chunk's "
        "logits, log-probs, loss and gradients (`torch.func.grad_and_value`, torch.compile'd) in the forward call; "
        "it computes the reference log-probs itself from the reference model's hidden states and lm_head (one "
        "more matmul pass, no gradient), since it takes no precomputed ones. The same loss as ours.",
        requires=("liger_kernel",),
        note="+ reference lm_head pass",
        first_call_note="compile",
    ),
    harness.Method(
        "liger_dpo_noref",
        lambda: _make_liger(use_ref_model=False),
        "the same with `use_ref_model=False`: Liger takes the reference log-probs to be 0. The same work as ours "
        "(the reference log-probs cost nothing either way), a different loss value: it is checked against "
        "`rf.linear_dpo_loss` with zero reference log-probs.",
        requires=("liger_kernel",),
        note="ref log-probs = 0",
        first_call_note="compile",
    ),
)

# --------------------------------------------------------------------------------- inputs, work


def _sequence_logp(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float32 summed log-probs of each row of ``labels``, one sequence at a time (a ``[T, V]`` temporary)."""
    out = torch.empty(labels.shape[0], dtype=torch.float32, device=labels.device)
    with torch.no_grad():
        for i in range(labels.shape[0]):
            mask = labels[i] != IGNORE_INDEX
            logp = torch.log_softmax((hidden[i] @ weight.t()).float(), dim=-1)
            out[i] = (logp.gather(-1, labels[i].masked_fill(~mask, 0)[:, None]).squeeze(-1) * mask).sum()
    return out


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    if len(shape) != 4:
        raise ValueError(f"linear_dpo shapes are PxTxHxV, got {harness.format_shape(shape)}")
    P, T, H, V = shape
    gen = torch.Generator(device=device).manual_seed(0)
    randn = lambda *s: torch.randn(s, generator=gen, dtype=torch.float32, device=device)  # noqa: E731
    hidden = randn(2 * P, T, H)
    # Weight scaled by 1/sqrt(H): logits of unit variance, as an initialized lm_head gives.
    weight = randn(V, H) * H**-0.5
    ref_hidden = hidden + _REF_NOISE * randn(2 * P, T, H)
    ref_weight = weight + _REF_NOISE * H**-0.5 * randn(V, H)
    hidden, weight, ref_hidden, ref_weight = (x.to(dtype) for x in (hidden, weight, ref_hidden, ref_weight))
    labels = torch.randint(0, V, (2 * P, T), generator=gen, device=device)
    lo, hi = (max(1, int(f * T)) for f in _PROMPT_FRACTION)
    prompt = torch.randint(lo, hi + 1, (2 * P,), generator=gen, device=device)
    end = torch.randint(max(int(_MIN_FILL * T), hi + 1), T + 1, (2 * P,), generator=gen, device=device).clamp(max=T)
    end[0] = T
    pos = torch.arange(T, device=device)
    labels.masked_fill_((pos < prompt[:, None]) | (pos >= end[:, None]), IGNORE_INDEX)
    ref_logp = _sequence_logp(ref_hidden, ref_weight, labels)
    return {
        "hidden": hidden.requires_grad_(True),
        "weight": weight.requires_grad_(True),
        "labels": labels,
        "ref_chosen_logp": ref_logp[:P].clone(),
        "ref_rejected_logp": ref_logp[P:].clone(),
        "ref_hidden": ref_hidden,
        "ref_weight": ref_weight,
    }


# Matmul passes (2·N·H·V FLOPs each) per method: (forward, backward); full is the sum. The op needs (1, 2).
MATMUL_PASSES = {
    "rlhf_fast": (1, 3),  # rf.linear_logprobs: backward recomputes the logits, then d_hidden, d_weight
    "rlhf_fast_skip": (1, 3),  # the same on the labeled rows only (counted over every row)
    "naive": (1, 2),  # the logits are kept: backward is d_hidden, d_weight
    "torch_compile": (1, 2),
    "liger_dpo": (4, 0),  # forward: logits, reference logits, d_hidden, d_weight; backward scales stored gradients
    "liger_dpo_noref": (3, 0),  # forward: logits, d_hidden, d_weight
}


def matmul_passes(r: dict) -> int:
    forward, backward = MATMUL_PASSES[r["method"]]
    return {"forward": forward, "backward": backward, "full": forward + backward}[r["mode"]]


def flops(r: dict) -> float:
    P, T, H, V = r["shape"]
    return matmul_passes(r) * 2.0 * (2 * P * T) * H * V


# ----------------------------------------------------------------------------------------- summary

# CPU acceptance (issue 5), at 8 pairs x 512 tokens, H = 256, V = 32000 float32: forward + backward within 0.3x
# naive's peak extra memory, and faster than Liger's fused DPO loss. Other shapes get the ratios, no verdict.
_CPU_BAR_SHAPE = (8, 512, 256, 32000)
_CPU_MAX_MEM_VS_NAIVE = 0.3


OURS = ("rlhf_fast", "rlhf_fast_skip")


def summarize(results: list[dict]) -> Iterator[str]:
    """rlhf_fast against naive and each peer, forward + backward; the CPU bars of issue 5 at their shape."""
    ok = {(tuple(r["shape"]), r["method"]): r for r in results if r.get("mode") == "full" and r["status"] == "ok"}
    for (shape, method), r in ok.items():
        if method not in OURS:
            continue
        where = f"{harness.format_shape(shape)} {r['dtype']} forward+backward"
        bar = r["device"] == "cpu" and shape == _CPU_BAR_SHAPE and r["dtype"] == "float32" and method == "rlhf_fast"
        line = f"{where}: {method} {r['median_ms']:.0f} ms, {r['peak_extra_mib']:.0f} MiB"
        naive = ok.get((shape, "naive"))
        if naive is not None:
            # a tiny shape can measure 0 MiB of peak RSS growth (pages the heap already had): no memory ratio then
            m = r["peak_extra_mib"] / naive["peak_extra_mib"] if naive["peak_extra_mib"] > 0 else None
            line += (f"; naive {naive['median_ms']:.0f} ms, {naive['peak_extra_mib']:.0f} MiB: "
                     f"{r['median_ms'] / naive['median_ms']:.2f}x its time"
                     + ("" if m is None else f", {m:.2f}x its peak extra memory"))  # fmt: skip
            if bar and m is not None:
                line += f" ({harness.verdict(m <= _CPU_MAX_MEM_VS_NAIVE, f'the CPU bar <= {_CPU_MAX_MEM_VS_NAIVE}x')})"
        yield line
        for (shape2, peer), p in ok.items():
            if shape2 != shape or peer in (*OURS, "naive"):
                continue
            t = r["median_ms"] / p["median_ms"]
            line = (f"{where} vs {peer}: {method} takes {t:.2f}x its time ({p['median_ms']:.0f} ms) and "
                    f"{r['peak_extra_mib'] / max(p['peak_extra_mib'], 1e-9):.2f}x its peak extra memory "
                    f"({p['peak_extra_mib']:.0f} MiB)")  # fmt: skip
            if harness.ranges_overlap(r, p):
                line += "; their p20–p80 ranges overlap"
            if peer.startswith("liger") and bar:
                line += ": " + harness.verdict(r["median_ms"] < p["median_ms"], "the CPU bar (faster than Liger)")
            yield line


def _passes_cell(r: dict) -> str:
    return str(matmul_passes(r))


BENCHMARK = harness.declare(
    globals(),
    name="linear_dpo",
    title="`rf.linear_dpo_loss(hidden [2P, T, H], weight [V, H], labels [2P, T], ref_chosen_logp [P], "
    "ref_rejected_logp [P], beta=0.1)`: the sigmoid DPO loss from hidden states without the [N, V] logits, "
    "against naive PyTorch DPO (TRL-style), torch.compile of it and Liger-Kernel's LigerFusedLinearDPOLoss.",
    grad_inputs=("hidden", "weight"),
    default_shapes={"cpu": ((8, 512, 256, 32000),), "cuda": ((8, 512, 4096, 128256),)},
    shape_format="PxTxHxV",
    baseline="naive",
    flops_formula="passes x 2·N·H·V with N = 2·P·T tokens, the method's matmul passes in the `passes` column (the "
    "op needs forward 1, backward 2: d_hidden and d_weight; a method that does not keep the logits recomputes them, "
    "3; liger computes its gradients in the forward call, and liger_dpo also the reference logits)",
    extra_columns=(("passes", _passes_cell),),
)


main = functools.partial(harness.main, BENCHMARK)  # main(argv=None): the command line (python -m, rlhf-fast bench)


if __name__ == "__main__":
    main()
