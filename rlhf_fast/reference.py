"""Plain PyTorch reference implementations: the eager composition trainers write today.

Tests call them on float64 inputs as the ground truth; benchmarks call them in the input dtype as the
"PyTorch eager" baseline (and ``torch.compile`` them for the compiled baseline). They build every
``[N, V]`` intermediate on purpose: that is what the fused ops are measured against.
"""

import torch


def logprobs_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    mask_zero_probs: bool = True,
):
    """``(logp, entropy)`` by ``log_softmax(logits.float() / T).gather`` and entropy via the softmax.

    Float64 input is kept in float64 (the test reference); lower precisions are upcast to float32 as
    trainers do. ``mask_zero_probs`` sets the ``0 * -inf`` terms of masked vocabulary entries to 0;
    without it (the usual trainer code, used as the benchmark baseline) such rows give NaN entropy.
    """
    x = logits if logits.dtype == torch.float64 else logits.float()
    logp_all = torch.log_softmax(x / temperature, dim=-1)
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    if mask_zero_probs:
        # where() before the product, so that autograd never forms 0 * -inf either
        logp_all = torch.where(logp_all == -float("inf"), 0.0, logp_all)
        plogp = torch.softmax(x / temperature, dim=-1) * logp_all
    else:
        plogp = logp_all.exp() * logp_all
    return logp, -plogp.sum(-1)
