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
