"""``rf.linear_full_kl``: the exact per-position ``KL(pi || pi_ref)`` over the vocabulary from two hidden-state
/ lm_head pairs, without building either ``[N, V]`` logits tensor.

``pi = softmax((hidden @ weight.T + bias) / T)``, ``pi_ref = softmax((ref_hidden @ ref_weight.T + ref_bias) / T)``;
the gradient flows to ``hidden``, ``weight`` and ``bias`` (the reference side is a constant).

Both implementations stream chunks of rows (the chunk size from the memory budget of
rlhf_fast/_fused_chunk.py), each side's ``[rows, V]`` float32 logits computed by one matmul into a buffer
that every chunk reuses (``chunk_buffer``: no per-chunk allocation).

- ``torch``: on the two buffers, in place and a few cached rows at a time (``_SOFTMAX_ELEMENTS``), the
  reference's log-softmax first, then the policy's, then the KL terms ``p (log p - log q)`` over the
  reference's buffer; a ``[rows, V]`` scratch of those few rows holds the exponentials. Backward recomputes
  both chunks, turns them into ``log p`` and ``log q`` with the saved row statistics (no reduction), writes
  ``dKL/dlogits = p (log p - log q - KL) g / T`` over the reference's buffer and multiplies it into
  ``d_hidden[rows]``, ``d_weight`` and ``d_bias``. Extra memory: the two chunk buffers, the scratch, the
  ``[N, H]`` hidden gradient and the float32 ``[V, H]`` weight-gradient accumulator (and a float32 copy of
  a bf16/fp16 weight): at N=4096, H=256, V=50000 float32, 190 MiB peak for forward + backward on the
  CPU, 0.078x the 2438 MiB of ``rf.full_kl`` on the two materialised logits, in 1.12x its time
  (benchmarks/results/cpu/linear_full_kl.md; 367 MiB and 1.49x before the buffers and the in-place work).
- ``triton``: per chunk, ``rf.full_kl``'s kernels (``kernels/full_kl.py``) on the two buffers; the matmuls are
  cuBLAS (torch) calls; a single fused kernel over vocabulary tiles is future work.

So forward is two matmul passes (policy and reference) and backward four (the two recomputations and the
two gradient products).
"""

from dataclasses import dataclass

import torch

from . import _amp, _checks, _vocab_parallel
from ._dispatch import resolve
from ._fused_chunk import chunk_buffer, chunk_rows
from ._linear_common import LinearGrads, check_linear_operands, chunk_logits, matmul_operands
from ._softmax_torch import grad_or_zeros
from .full_kl_op import _backend as _full_kl_backend

# float32 [rows, V] chunks the budget (rlhf_fast/_fused_chunk.py) is split over: the two logits buffers
# every chunk reuses (policy and reference), and one more share for what sits beside them (the small
# softmax scratch, MKL's packed weight, the weight-gradient accumulator)
_CHUNK_TEMPORARIES = 3
# rows of the in-place softmax work on the chunk buffers (a ~8 MiB float32 scratch, as rf.full_kl's chunks):
# each elementwise pass runs over rows that stay in cache
_SOFTMAX_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class LinearFullKLOptions:
    temperature: float = 1.0


def _chunk(hidden, rows, native, w, b32, out=None):
    # [1, rows, V]: rf.full_kl's backends' layout
    return chunk_logits(hidden, rows, native, w, b32, out=out).unsqueeze(0)


def _log_softmax_(z: torch.Tensor, scratch: torch.Tensor):
    """``log softmax(z)`` in place of the float32 rows ``z``, and their ``(max, log sum e^(z - max))``;
    ``scratch`` (``z``'s shape) holds ``e^(z - max)`` for the sum."""
    m = z.amax(dim=-1, keepdim=True)
    m.masked_fill_(m == -float("inf"), 0.0)  # an all -inf row: shift by 0
    log_s = torch.exp(z.sub_(m), out=scratch).sum(-1, keepdim=True).log_()
    return z.sub_(log_s), m, log_s


def _kl_rows_(log_p, log_q, scratch, kl_row=None, grad_row=None):
    """On float32 rows of ``log p`` and ``log q`` (both overwritten): with ``kl_row=None`` the per-row
    ``KL = sum_v p_v (log p_v - log q_v)`` (returned); else ``dKL/dz = p (log p - log q - KL) * grad_row``
    (written into ``log_q``'s rows, returned). ``p_v = 0`` (``log p_v = -inf``, masked vocabulary) adds
    nothing, whatever ``q_v`` is; ``q_v = 0`` alone makes the KL ``+inf``."""
    masked = log_p == -float("inf")
    d = log_q.sub_(log_p).neg_()  # log p - log q
    if kl_row is not None:
        d.sub_(kl_row)
    d.mul_(torch.exp(log_p, out=scratch))
    d.masked_fill_(masked, 0.0)
    return d.sum(-1) if kl_row is None else d.mul_(grad_row)


def _scaled_(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return z if temperature == 1.0 else z.div_(temperature)


def _buffers(N: int, V: int, device):
    """``(step, sub, z_buf, q_buf, scratch)``: rows per matmul chunk and per in-place softmax part, the two
    reused ``[step, V]`` logits buffers and the ``[sub, V]`` scratch."""
    step, sub = chunk_rows(V, _CHUNK_TEMPORARIES), max(1, _SOFTMAX_ELEMENTS // V)
    scratch = torch.empty(min(sub, N), V, dtype=torch.float32, device=device)
    return step, sub, chunk_buffer(step, N, V, device), chunk_buffer(step, N, V, device), scratch


def _torch_forward(hidden, pol, ref_hidden, ref, temperature: float):
    """``(kl [N], stats [4, N])`` by chunks of rows: both logits chunks into the two reused buffers, then in
    place, a few cached rows at a time, the reference's log-softmax, the policy's, and the KL terms."""
    N, V = hidden.shape[0], pol[1].shape[0]
    kl = torch.empty(N, dtype=torch.float32, device=hidden.device)
    stats = torch.empty((4, N, 1), dtype=torch.float32, device=hidden.device)
    step, sub, z_buf, q_buf, scratch = _buffers(N, V, hidden.device)
    for r in range(0, N, step):
        rows = slice(r, r + step)
        z = _scaled_(chunk_logits(hidden, rows, *pol, out=z_buf), temperature)
        q = _scaled_(chunk_logits(ref_hidden, rows, *ref, out=q_buf), temperature)
        for s in range(0, z.shape[0], sub):
            n = min(sub, z.shape[0] - s)
            at = slice(r + s, r + s + n)
            log_q, stats[2, at], stats[3, at] = _log_softmax_(q[s : s + n], scratch[:n])
            log_p, stats[0, at], stats[1, at] = _log_softmax_(z[s : s + n], scratch[:n])
            kl[at] = _kl_rows_(log_p, log_q, scratch[:n])
    return kl, stats.squeeze(-1)


def _torch_backward(hidden, weight, bias, ref_hidden, ref, kl, stats, grad_kl, temperature: float, grads):
    """Recompute both chunks into the reused buffers, ``log p`` and ``log q`` from the saved statistics (no
    reduction), ``dKL/dlogits`` in place of the reference chunk, then its two products into the gradients."""
    N, V = hidden.shape[0], weight.shape[0]
    w32, b32 = weight.float(), None if bias is None else bias.float()
    step, sub, z_buf, q_buf, scratch = _buffers(N, V, hidden.device)
    m_p, ls_p, m_q, ls_q = (x.unsqueeze(-1) for x in stats)
    g_rows = (grad_kl / temperature).unsqueeze(-1)
    for r in range(0, N, step):
        rows = slice(r, r + step)
        z = _scaled_(chunk_logits(hidden, rows, False, w32, b32, out=z_buf), temperature)
        q = _scaled_(chunk_logits(ref_hidden, rows, *ref, out=q_buf), temperature)
        for s in range(0, z.shape[0], sub):
            n = min(sub, z.shape[0] - s)
            at = slice(r + s, r + s + n)
            log_q = q[s : s + n].sub_(m_q[at]).sub_(ls_q[at])
            log_p = z[s : s + n].sub_(m_p[at]).sub_(ls_p[at])
            _kl_rows_(log_p, log_q, scratch[:n], kl[at].unsqueeze(-1), g_rows[at])
        grads.add(rows, q, hidden[rows].float(), w32)


def _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature: float, impl: str):
    pol = matmul_operands(hidden, weight, bias)
    ref = matmul_operands(ref_hidden, ref_weight, ref_bias)
    if impl != "triton":
        return _torch_forward(hidden, pol, ref_hidden, ref, temperature)
    N, V = hidden.shape[0], weight.shape[0]
    kl_forward, _ = _full_kl_backend(impl)
    kl = torch.empty(N, dtype=torch.float32, device=hidden.device)
    stats = torch.empty((4, N), dtype=torch.float32, device=hidden.device)
    step = chunk_rows(V, _CHUNK_TEMPORARIES)
    z_buf, q_buf = chunk_buffer(step, N, V, hidden.device), chunk_buffer(step, N, V, hidden.device)
    for r in range(0, N, step):
        rows = slice(r, r + step)
        kl[rows], stats[:, rows] = kl_forward(_chunk(hidden, rows, *pol, out=z_buf),
                                              _chunk(ref_hidden, rows, *ref, out=q_buf), temperature)  # fmt: skip
    return kl, stats


def _backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl, stats, grad_kl, temperature: float,
              impl: str, need_hidden: bool, need_weight: bool, need_bias: bool):  # fmt: skip
    N, V = hidden.shape[0], weight.shape[0]
    ref = matmul_operands(ref_hidden, ref_weight, ref_bias)
    grads = LinearGrads(hidden, weight, bias, need_hidden, need_weight, need_bias)
    if impl != "triton":
        _torch_backward(hidden, weight, bias, ref_hidden, ref, kl, stats, grad_kl, temperature, grads)
        return grads.result()
    _, kl_backward = _full_kl_backend(impl)
    w32 = weight.float()
    b32 = None if bias is None else bias.float()
    step = chunk_rows(V, _CHUNK_TEMPORARIES)
    z_buf, q_buf = chunk_buffer(step, N, V, hidden.device), chunk_buffer(step, N, V, hidden.device)
    for r in range(0, N, step):
        rows = slice(r, r + step)
        z = _chunk(hidden, rows, False, w32, b32, out=z_buf)
        g = kl_backward(z, _chunk(ref_hidden, rows, *ref, out=q_buf), kl[rows], stats[:, rows].contiguous(),
                        grad_kl[rows], temperature)[0]  # fmt: skip
        grads.add(rows, g, hidden[rows].float(), w32)
    return grads.result()


class _LinearFullKL(torch.autograd.Function):
    @staticmethod
    @_amp.float32_op
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts: LinearFullKLOptions, impl: str):
        kl, stats = _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts.temperature, impl)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl, stats)
        ctx.opts, ctx.impl = opts, impl
        ctx.set_materialize_grads(False)
        return kl

    @staticmethod
    @_amp.float32_op
    def backward(ctx, grad_kl):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl, stats = ctx.saved_tensors
        if grad_kl is None:
            return (None,) * 8
        d_hidden, d_weight, d_bias = _backward(
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl, stats,
            grad_or_zeros(grad_kl, kl.numel(), hidden.device), ctx.opts.temperature, ctx.impl,
            *ctx.needs_input_grad[:3],
        )  # fmt: skip
        return d_hidden, d_weight, d_bias, None, None, None, None, None


def linear_full_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    impl: str = "auto",
    process_group: "torch.distributed.ProcessGroup | None" = None,
    matmul_dtype: "torch.dtype | None" = None,
) -> torch.Tensor:
    """``rf.full_kl(hidden @ weight.T + bias, ref_hidden @ ref_weight.T + ref_bias)`` without either logits tensor.

    Args:
        hidden: ``[..., H]`` last hidden states of the policy (float32, bfloat16 or float16).
        weight: ``[V, H]`` the policy's lm_head, ``hidden``'s dtype; ``bias``: optional ``[V]``.
        ref_hidden: ``[..., H_ref]`` the reference model's hidden states at the same positions (same leading
            shape); ``ref_weight`` ``[V, H_ref]`` (same ``V``), ``ref_bias`` optional ``[V]``, in
            ``ref_hidden``'s dtype (which may differ from the policy's). Constants: no gradient.
        temperature: positive divisor of both logits.
        impl: ``"auto"`` | ``"triton"`` | ``"torch"`` (see the module docstring).
        process_group: tensor parallelism (``None``: none). ``weight``/``bias`` and ``ref_weight``/``ref_bias``
            hold this rank's contiguous slice of the vocabulary's rows (the same slice), slices in rank
            order; ``hidden`` and ``ref_hidden`` are the same on every rank (``temperature`` and the rows' shape
            are checked to be: ``ValueError`` naming the one that is not). Every rank returns the KL over
            the whole vocabulary; ``weight``/``bias`` get their slice's gradient, ``hidden`` the full one,
            all-reduced (SUM) in backward (rlhf_fast/_vocab_parallel.py).
        matmul_dtype: ``None`` (follow autocast) or ``torch.float32`` (both sides' lm_head matmuls in
            float32 under any autocast), as in :func:`rlhf_fast.linear_logprobs`.

    Returns float32 ``KL(pi || pi_ref)`` ``[...]`` per position, differentiable in ``hidden``, ``weight`` and
    ``bias`` (gradients in their dtypes). Under autocast both sides' matmul operands take the autocast
    dtype as ``F.linear``'s do; the logits and the KL stay float32.

    No ``skip_ignored`` (unlike the other linear ops): this op takes no labels, so it cannot tell which rows
    are prompt or padding. To compute the KL of response rows only, select them before the call
    (``hidden[mask]``, ``ref_hidden[mask]``), which is exactly what ``skip_ignored`` does inside the others.

    Not batch invariant (README "Batch invariance"): its chunk matmuls are not padded, and a one-row product
    rounds unlike the same row of a bigger one (MKL on CPU; cuBLAS picks kernels by the row count).
    """
    hidden, weight, bias = check_linear_operands(hidden, weight, bias, matmul_dtype=matmul_dtype)
    ref_hidden, ref_weight, ref_bias = check_linear_operands(ref_hidden, ref_weight, ref_bias,
                                                   ("ref_hidden", "ref_weight", "ref_bias"), matmul_dtype)  # fmt: skip
    _checks.check_same_device("ref_hidden", ref_hidden, "hidden", hidden)
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ref_hidden must have the leading shape of hidden {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(ref_hidden.shape[:-1])}")  # fmt: skip
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have weight's vocabulary size V={weight.shape[0]}, got {ref_weight.shape[0]}")
    opts = LinearFullKLOptions(temperature=_checks.check_positive("temperature", temperature))
    impl = resolve(impl, hidden.device)
    lead = hidden.shape[:-1]
    N = hidden[..., 0].numel()
    detach = [None if t is None else t.detach() for t in (ref_hidden, ref_weight, ref_bias)]
    args = (hidden.reshape(N, hidden.shape[-1]), weight, bias, detach[0].reshape(N, ref_hidden.shape[-1]), *detach[1:])
    with _amp.no_autocast():
        if process_group is None:
            kl = _LinearFullKL.apply(*args, opts, impl)
        else:
            _vocab_parallel.same_on_every_rank(process_group, hidden.device, {
                "temperature": opts.temperature, "hidden.shape[:-1]": lead})  # fmt: skip
            o = _vocab_parallel.FullKLShardOptions(process_group, impl, _forward, _backward, linear=True,
                                                   temperature=opts.temperature)  # fmt: skip
            kl = _vocab_parallel.full_kl(o, *args)
    return kl.view(lead)
