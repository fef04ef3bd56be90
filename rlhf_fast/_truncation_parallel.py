"""Truncated sampling (``top_k`` / ``top_p`` / ``min_p``) on a vocabulary split over a process group: the
log-probs, entropy and gradients of the truncated distribution of the whole vocabulary, from each rank's
slice (layout and combination: rlhf_fast/_vocab_parallel.py; semantics: rlhf_fast/truncation.py).

Every rule keeps ``{v : z_v >= tau}`` for one threshold ``tau`` per row, so the only new work is a *global*
``tau``; with it each rank treats its entries below ``tau`` as ``-inf`` and the existing combination (max,
log-sum-exp, entropy chain rule, label owner) is unchanged: a rank whose slice has nothing kept reports no
mass and adds exactly 0. The threshold is ``truncation.row_thresholds`` with the group (exact, and cheap in
communication: ``[n]`` or ``[n, K]`` vectors per chunk of rows, never the ``[n, V]`` logits):

- min-p: the row's max is an all-reduce (MAX) of the slices' maxima; ``tau = M + log(min_p)``;
- top-k: each rank's ``K = max k + 1`` largest values, all-gathered (``[P, n, K]``): their top ``K`` are the
  row's top ``K``, so the k-th value is the one-process value, bitwise;
- top-p: when every top-p row has a top-k and the set ``S`` it renormalises over ends above the last of the
  ``K`` gathered values (no tie past them), the nucleus is read from them, with the same values summed in
  the same order as in one process. Otherwise ``S``'s size and mass are all-reduces (SUM) of each slice's
  count and ``sum e^(z - M)`` over ``z >= floor``, and the row's largest ``L`` values are all-gathered,
  ``L`` = 256 first, then 8 times more until every row's nucleus ends inside them (as in one process). Only
  the mass of ``S`` is summed in another order than one process sums it, so a row whose top-p boundary lies
  within float32 rounding of ``p`` may keep one token more or less.

Every branch of the threshold search depends only on the gathered or all-reduced values (and on the
truncation arguments, which must be the same on every rank, like the labels: ``_vocab_parallel.shard_of``
checks them, the temperature and the labels before any of this runs), so every rank runs the same
collectives and gets the same ``tau``. The chunks of rows are sized by the whole vocabulary, so that they
are the same on every rank whatever its slice size.

Both implementations share the threshold (the PyTorch code above, on the slice's float32 chunk ``z =
logits / T``); the statistics and gradients are each implementation's truncated row functions
(``rf.logprobs``' Triton kernels or PyTorch twins) run on that chunk at temperature 1, the gradient then
divided by ``T``. The Triton route thus compares the same ``z`` values the threshold was computed from
(its kernels scale by ``1 / T`` in two products, within an ulp of the division, which could move a token
sitting exactly at a threshold). The Triton threshold kernel is not used on a slice: its bisection would
need one all-reduce per probe pass. The ``rf.linear_*`` ops compute each chunk's logits by one matmul (as
their unsharded truncated route does), so their forward reads the lm_head slice once and backward once
more per gradient product, as unsharded.

A row whose label lies on another rank takes the slice's largest entry as its local label (at or above
``tau`` whenever the slice keeps anything), so that the row functions' rule "no log-prob gradient when the
label is below ``tau``" does not fire on ranks that do not own the label; a label outside the global kept
set has log-prob ``-inf`` on every rank and its row's log-prob gradient is dropped on every rank.
"""

import torch

from ._fused_chunk import chunk_buffer, chunk_rows
from ._linear_common import LinearGrads, chunk_logits, matmul_operands
from ._softmax_torch import scaled_float_copy
from .truncation import row_thresholds

_NO_IGNORE = -1  # labels here are shard-local ids >= 0; the caller masks ignored rows
_CHUNK_TEMPORARIES = 2  # float32 [rows, V_r]: the chunk's z and, in the row functions, one more


def _chunks(o, ins, N: int):
    """``(step, z_of)``: rows per chunk (the same on every rank) and ``z_of(rows)``, the slice's float32
    ``logits / T`` of those rows in a buffer the caller may overwrite."""
    step = chunk_rows(o.shard.vocab, _CHUNK_TEMPORARIES)
    if not o.linear:
        flat = ins[0].reshape(N, ins[0].shape[-1])
        return step, lambda rows: scaled_float_copy(flat[rows], o.temperature)
    hidden, weight, bias = ins
    native, w_mm, b32 = matmul_operands(hidden, weight, bias)
    buf = chunk_buffer(step, N, weight.shape[0], hidden.device)

    def z_of(rows):
        z = chunk_logits(hidden, rows, native, w_mm, b32, out=buf)
        return z if o.temperature == 1.0 else z.div_(o.temperature)

    return step, z_of


def partials(o, ins, local: torch.Tensor, owned: torch.Tensor):
    """``(labels, (logp, entropy | None, row_max, log_norm), tau)`` of this rank's slice under ``o.trunc``:
    the global thresholds ``tau [N]``, the slice's statistics over its kept entries (``logp`` meaningful
    where ``owned``) and the local labels the backward must use (the slice's argmax where not ``owned``)."""
    N = local.numel()
    forward, _ = o.row_functions  # rf.logprobs' (set by the ops: this module does not import them)
    step, z_of = _chunks(o, ins, N)
    logp, row_max, log_norm, tau = (torch.empty(N, dtype=torch.float32, device=local.device) for _ in range(4))
    entropy = torch.empty_like(logp) if o.with_entropy else None
    labels = local.clone()
    for r in range(0, N, step):
        rows = slice(r, r + step)
        z = z_of(rows)
        tau[rows] = row_thresholds(z, o.trunc.rows(rows), o.shard.group, o.shard.vocab)
        labels[rows] = torch.where(owned[rows], local[rows], z.argmax(-1))
        stats = forward(z.unsqueeze(0), labels[rows].contiguous(), 1.0, _NO_IGNORE, o.with_entropy, tau=tau[rows])
        logp[rows], ent, row_max[rows], log_norm[rows] = stats
        # a label below tau: -inf, also where the slice keeps nothing (the PyTorch twin's (-inf) - (-inf) is NaN)
        missed = z.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1) < tau[rows]
        logp[rows] = logp[rows].masked_fill(missed, -float("inf"))
        if entropy is not None:
            entropy[rows] = ent
    return labels, (logp, entropy, row_max, log_norm), tau


def grads(o, ins, labels, owned, stats, tau, g_logp, g_entropy, needs=(True, True, True)):
    """The gradients of this slice's ``ins`` from the combined ``stats = (row_max, log_norm, entropy)``:
    ``grad`` of the logits, or ``(d_hidden part, d_weight, d_bias)`` (as ``_vocab_parallel.shard_grads``).
    ``g_logp`` is 0 on ignored rows and on rows whose label is outside the kept set."""
    N = labels.numel()
    _, backward = o.row_functions
    step, z_of = _chunks(o, ins, N)
    row_max, log_norm, entropy = stats
    label_grad = g_logp.masked_fill(~owned, 0.0)  # only the label's owner adds the label term
    if o.linear:
        hidden, weight, _ = ins
        acc, w32 = LinearGrads(*ins, *needs), weight.float()

        def sink(rows, g):
            acc.add(rows, g, hidden[rows].float(), w32)
    else:
        out = torch.empty(ins[0].shape, dtype=ins[0].dtype, device=ins[0].device)
        flat_out = out.view(N, out.shape[-1])

        def sink(rows, g):
            flat_out[rows].copy_(g)

    for r in range(0, N, step):
        rows = slice(r, r + step)
        z = z_of(rows).unsqueeze(0)
        ent, g_ent = (None, None) if g_entropy is None else (entropy[rows], g_entropy[rows])
        g = backward(z, labels[rows].contiguous(), row_max[rows], log_norm[rows], ent, g_logp[rows], g_ent, 1.0,
                     _NO_IGNORE, grad_logits=z, label_grad=label_grad[rows], tau=tau[rows])[0]  # fmt: skip
        sink(rows, g if o.temperature == 1.0 else g.div_(o.temperature))
    return acc.result() if o.linear else out
