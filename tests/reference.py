"""Float64 ground truth for the tests, and "plain PyTorch in the same dtype" for low-precision bounds."""

import torch

from rlhf_fast.reference import logprobs_reference


def logprobs_f64(logits, labels, *, temperature=1.0, ignore_index=-100):
    """``(logp, entropy, dlogits_fn)`` in float64 from the (already rounded) input values."""
    x = logits.detach().double().requires_grad_(True)
    logp, ent = logprobs_reference(x, labels, temperature=temperature, ignore_index=ignore_index)

    def grad(g_logp, g_ent):
        gl = torch.zeros_like(logp) if g_logp is None else g_logp.double()
        ge = torch.zeros_like(ent) if g_ent is None else g_ent.double()
        (g,) = torch.autograd.grad((logp * gl).sum() + (ent * ge).sum(), x, retain_graph=True)
        return g

    return logp.detach(), ent.detach(), grad


def logprobs_plain_same_dtype(logits, labels, *, temperature=1.0, ignore_index=-100):
    """Plain PyTorch without upcasting: every intermediate in the input dtype (the bar for bf16/fp16)."""
    x = logits.detach().clone().requires_grad_(True)
    logp_all = torch.log_softmax(x / temperature, dim=-1)
    ignored = labels == ignore_index
    logp = logp_all.gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0)
    safe = torch.where(logp_all == -float("inf"), 0.0, logp_all)
    ent = -(torch.softmax(x / temperature, dim=-1) * safe).sum(-1)

    def grad(g_logp, g_ent):
        gl = torch.zeros_like(logp) if g_logp is None else g_logp.to(logp.dtype)
        ge = torch.zeros_like(ent) if g_ent is None else g_ent.to(ent.dtype)
        (g,) = torch.autograd.grad((logp * gl).sum() + (ent * ge).sum(), x, retain_graph=True)
        return g

    return logp.detach(), ent.detach(), grad


def assert_no_worse(name, ours, plain, ref, *, rel_margin=2e-6, input_rounding=0.0, abs_margin=0.0):
    """Error of ``ours`` against float64 ``ref`` at most 1.25x plain PyTorch's (``plain``), plus a margin.

    The margin is ``rel_margin`` of the scale for float32 results, and half an ulp at the largest value
    for results stored in bf16/fp16 (gradients): the max of a few hundred rounding errors is itself a
    random number, and a half-ulp difference in the last rounding is not a worse algorithm.
    ``input_rounding`` (relative) widens the margin by the rounding of the scaled input itself: where
    ``x / T`` rounds by more than the bar (large logits, ``T != 1``), which of two equally good float32
    computations of it lands closer to float64 is a coin toss, not a property of the implementation.
    ``abs_margin`` adds an absolute amount the caller derives (e.g. an intermediate's own float32 rounding).
    """
    scale = 1.0 + (ref.abs().max().item() if ref.numel() else 0.0)
    margin = (rel_margin + input_rounding) * scale + abs_margin
    if ours.dtype in (torch.bfloat16, torch.float16):
        margin += 0.5 * torch.finfo(ours.dtype).eps * scale
    err = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    bar = (plain.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= 1.25 * bar + margin, f"{name}: error {err:.3g} vs plain PyTorch {plain.dtype} {bar:.3g}"
    return scale
