"""Row statistics and gradients of ``softmax(z)`` on a float32 chunk: the PyTorch twin of the Triton kernels.

Used by every PyTorch implementation that turns a ``[n, V]`` chunk of (temperature-scaled) logits into
log-probs and entropy: ``rf.logprobs`` (chunks of the logits) and ``rf.linear_logprobs`` (chunks of
``hidden @ weight.T``). Both functions overwrite the chunk they are given, so a caller passes a scratch copy.
"""

import torch


def softmax_stats_(z: torch.Tensor, labels: torch.Tensor):
    """``(logp, entropy, row_max, log_norm)`` of the rows of ``z``; ``z`` is overwritten with ``log p``.

    ``labels`` are in ``[0, V)`` (ignored rows already mapped to 0). As in the Triton kernel,
    ``log p = (z - m) - log(sum exp(z - m))`` with the max ``m`` and the log-normalizer kept apart: their
    rounded sum would lose up to half an ulp of ``m`` (5e-4 at logits near 1e4).
    """
    m = z.amax(dim=-1, keepdim=True)
    m.masked_fill_(m == -float("inf"), 0.0)  # an all -inf row: shift by 0, not by -inf
    d = z.sub_(m)
    log_s = torch.exp(d).sum(-1, keepdim=True).log_()
    logp_all = d.sub_(log_s)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # p * log p with the 0 * -inf of masked vocabulary entries set to 0 (NaN input stays NaN).
    plogp = logp_all.exp().mul_(logp_all).masked_fill_(logp_all == -float("inf"), 0.0)
    return logp, -plogp.sum(-1), m.squeeze(-1), log_s.squeeze(-1)


def softmax_grad_(z, row_max, log_norm, entropy, g_logp, g_entropy, labels, temperature: float):
    """``dL/dx`` for ``z = x / temperature`` and ``L = sum(g_logp * logp + g_entropy * entropy)``.

    Same formula as the Triton backward (derived in kernels/logprobs.py)::

        dL/dz_v = g_logp * ([v == y] - p_v) - g_H * p_v * (log p_v + H),    dL/dx = dL/dz / T

    ``g_logp`` must already be 0 on ignored rows. ``z`` is overwritten; the result is a new tensor.
    """
    logp_all = z.sub_(row_max.unsqueeze(-1)).sub_(log_norm.unsqueeze(-1))
    p = logp_all.exp()
    coef = logp_all.add_(entropy.unsqueeze(-1)).mul_(g_entropy.unsqueeze(-1))
    g = coef.add_(g_logp.unsqueeze(-1)).mul_(p).neg_()
    g.masked_fill_(p == 0, 0.0)  # masked vocabulary: p = 0 and log p = -inf
    g.scatter_add_(-1, labels.unsqueeze(-1), g_logp.unsqueeze(-1))
    return g if temperature == 1.0 else g.div_(temperature)
