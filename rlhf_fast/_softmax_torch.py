"""Row-chunked softmax helpers of the PyTorch implementations: the twins of the Triton kernels.

Layout helpers (``as_btv``, ``row_chunks``, ``scaled_float_copy``, ``grad_or_zeros``) shared by every op
that streams ``[..., V]`` rows, and the statistics/gradient of ``softmax(z)`` on a float32 chunk, used by
``rf.logprobs`` (chunks of the logits), ``rf.linear_logprobs`` (chunks of ``hidden @ weight.T``) and the
ops built on them. ``softmax_stats_``, ``softmax_grad_`` and ``logp_grad_`` overwrite the chunk they are given,
so a caller passes a scratch copy.
"""

import math

import torch


def as_btv(logits: torch.Tensor) -> torch.Tensor:
    """A ``[B, T, V]`` view of ``[..., V]`` logits with a contiguous last dimension (a copy only if needed).

    Two free leading strides cover the usual ``logits[:, :-1, :]`` slice without a copy.
    """
    V = logits.shape[-1]
    if logits.dim() == 1:
        x = logits.reshape(1, 1, V)
    elif logits.dim() == 2:
        x = logits.unsqueeze(0)
    else:
        x = logits.reshape(math.prod(logits.shape[:-2]), logits.shape[-2], V)
    return x if x.stride(-1) == 1 else x.contiguous()


def grad_or_zeros(grad: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if grad is None:
        return torch.zeros(n, dtype=torch.float32, device=device)
    return grad.reshape(-1).to(torch.float32).contiguous()


def row_chunks(tensors: list[torch.Tensor], rows: int):
    """Yield ``(row_offset, [chunk of each tensor])`` over the ``B*T`` rows of same-shape ``[B, T, V]``
    tensors, at most ``rows`` rows at a time, with the same row boundaries in every tensor."""
    B, T, V = tensors[0].shape
    try:
        flats = [x.view(B * T, V) for x in tensors]
    except RuntimeError:  # a strided slice such as logits[:, :-1]: chunk inside each of the B blocks
        for b in range(B):
            for t in range(0, T, rows):
                yield b * T + t, [x[b, t : t + rows] for x in tensors]
        return
    for r in range(0, B * T, rows):
        yield r, [flat[r : r + rows] for flat in flats]


def scaled_float_copy(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """``chunk / temperature`` as a new float32 tensor (``.float()`` alone would alias float32 input)."""
    z = chunk.to(torch.float32, copy=True)
    return z if temperature == 1.0 else z.div_(temperature)


def softmax_stats_(z: torch.Tensor, labels: torch.Tensor, with_entropy: bool = True):
    """``(logp, entropy, row_max, log_norm)`` of the rows of ``z`` (overwritten as scratch).

    ``labels`` are in ``[0, V)`` (ignored rows already mapped to 0). The same statistics as the Triton
    kernel: ``log p = (z - m) - log s`` with ``s = sum e^(z - m)``, the max ``m`` and the log-normalizer
    kept apart (their rounded sum would lose up to half an ulp of ``m``: 5e-4 at logits near 1e4), and
    ``H = log s - u / s`` with ``u = sum e^(z - m) (z - m)``: two passes fewer than ``-sum p log p``.
    Without ``with_entropy`` the entropy is ``None`` and ``u`` is never formed (the same ``s``, so the
    same ``logp``, in three passes over the chunk fewer: clamp, ``e * d``, its sum).
    """
    m = z.amax(dim=-1, keepdim=True)
    m.masked_fill_(m == -float("inf"), 0.0)  # an all -inf row: shift by 0, not by -inf
    d = z.sub_(m)
    d_label = d.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        log_s = d.exp_().sum(-1).log_()  # e^-inf = 0: a masked vocabulary needs no clamp here
        return d_label - log_s, None, m.squeeze(-1), log_s
    # Masked vocabulary: -inf -> the lowest float, so that e^d * d is 0 * finite = 0 rather than NaN
    # (clamp keeps NaN, so NaN input still comes out NaN).
    d.clamp_(min=torch.finfo(d.dtype).min)  # d is float32 (ops run with autocast off: rlhf_fast/_amp.py)
    e = torch.exp(d)
    s = e.sum(-1)
    u = e.mul_(d).sum(-1)
    log_s = s.log()
    return d_label - log_s, log_s - u / s, m.squeeze(-1), log_s


def softmax_grad_(z, row_max, log_norm, entropy, g_logp, g_entropy, labels, temperature: float, label_grad=None):
    """``dL/dx`` for ``z = x / temperature`` and ``L = sum(g_logp * logp + g_entropy * entropy)``.

    Same formula as the Triton backward (derived in kernels/logprobs.py)::

        dL/dz_v = g_logp * ([v == y] - p_v) - g_H * p_v * (log p_v + H),    dL/dx = dL/dz / T

    ``g_logp`` must already be 0 on ignored rows. ``z`` is overwritten; the result is a new tensor.
    ``label_grad`` (default ``g_logp``) is what the ``[v == y]`` term adds at the label: a vocabulary shard
    passes 0 for rows whose label another rank owns (rlhf_fast/_vocab_parallel.py).
    """
    logp_all = z.sub_(row_max.unsqueeze(-1)).sub_(log_norm.unsqueeze(-1))
    p = logp_all.exp()
    coef = logp_all.add_(entropy.unsqueeze(-1)).mul_(g_entropy.unsqueeze(-1))
    g = coef.add_(g_logp.unsqueeze(-1)).mul_(p).neg_()
    g.masked_fill_(p == 0, 0.0)  # masked vocabulary: p = 0 and log p = -inf
    g.scatter_add_(-1, labels.unsqueeze(-1), (g_logp if label_grad is None else label_grad).unsqueeze(-1))
    return g if temperature == 1.0 else g.div_(temperature)


def logp_grad_(z, row_max, log_norm, g_logp, labels, temperature: float, label_grad=None):
    """``dL/dx`` for ``z = x / temperature`` and ``L = sum(g_logp * logp)``: ``softmax_grad_`` without the
    entropy terms (what it computes with ``g_entropy = 0``, up to rounding)::

        dL/dz_v = g_logp * ([v == y] - p_v),    dL/dx = dL/dz / T

    with ``1 / T`` folded into ``g_logp`` (a ``[rows]`` vector) rather than a pass over the chunk. A masked
    vocabulary entry gets ``p_v = e^-inf = 0`` and so 0 without a mask. ``g_logp`` must already be 0 on
    ignored rows. ``z`` is overwritten and returned as the result. ``label_grad``: as in ``softmax_grad_``.
    """
    g_row = g_logp if temperature == 1.0 else g_logp / temperature
    p = z.sub_(row_max.unsqueeze(-1)).sub_(log_norm.unsqueeze(-1)).exp_()
    g = p.mul_(g_row.neg().unsqueeze(-1))
    if label_grad is not None:
        g_row = label_grad if temperature == 1.0 else label_grad / temperature
    return g.scatter_add_(-1, labels.unsqueeze(-1), g_row.unsqueeze(-1))
