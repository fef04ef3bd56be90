"""Vocabulary-parallel (tensor-parallel) softmax ops: ``process_group=...`` on the log-prob, entropy and KL ops.

Layout. With a process group of size ``P``, the last dimension of the logits (``ref_logits``), or the rows of
an lm_head ``weight`` (and ``bias``), hold this rank's contiguous slice of the vocabulary; rank ``r`` holds
ids ``[offset_r, offset_r + V_r)`` with ``offset_r = V_0 + ... + V_{r-1}``: the slices in rank order, of any
sizes (each call exchanges the ``V_r`` with one all-reduce of a small ``[P, k]`` table, which also checks that
the row arguments - labels, temperature, ignore_index, truncation; a PPO loss's tensors and options - are
the same on every rank). Labels are global ids, the
same tensor on every rank. Megatron-LM's layout is this one with equal slices: rank ``r`` owns
``[r V/P, (r+1) V/P)`` (``VocabUtility`` in megatron/core/tensor_parallel/utils.py; the lm_head is a
``ColumnParallelLinear`` with ``gather_output=False``, the loss ``vocab_parallel_cross_entropy``), and so is
verl's: its fused linear cross-entropy / entropy kernel takes the tensor-parallel process group and matches
labels at ``rank * V_local + column`` (verl/utils/kernel/kernels.py, commit fe3b96ba). Megatron pads the
vocabulary to a multiple of ``make_vocab_size_divisible_by x TP size`` so that the slices are equal. To us
padded rows are ordinary vocabulary entries (as they are to Megatron's own cross-entropy): a padded row at a
finite logit takes probability mass like any other entry. To get the unpadded model's distribution, give
padded entries the logit ``-inf`` (for the linear ops: a ``bias`` of ``-inf`` on those rows, any finite
weight): they then have probability 0, add nothing to the entropy or KL and get gradient 0.

What each rank computes. Its shard's row statistics, with the op's own implementation (Triton kernels or
the chunked PyTorch twins, unchanged): the max ``m_r``, the log-normalizer ``log s_r`` (``s_r = sum e^(z -
m_r)`` over the shard), the shard's own entropy ``H_r`` and the label's log-prob within the shard (on the
rank that owns the label). Two all-reduces combine them exactly: ``M = max_r m_r`` (MAX), then a SUM of
``a_r = s_r e^(m_r - M)`` (so ``S = sum_r a_r`` and ``log p_v = (z_v - M) - log S``), of the label term
``z_y - M = logp_r(y) + log a_r`` and of ``a_r (H_r - log a_r)``: with ``w_r = a_r / S`` the shard's mass,
``H = sum_r w_r (H_r - log w_r) = log S + sum_r a_r (H_r - log a_r) / S`` (the chain rule of entropy).
The KL combines the same way: ``KL = sum_r w_r (KL_r + log w_r - log w'_r)`` with ``w'_r`` the reference
distribution's shard mass. Every rank gets identical outputs (all-reduce results are identical on every rank).

Backward needs no communication for the logits ops: each rank runs the op's ordinary backward on its shard
with the combined statistics (``M``, ``log S``, ``H``, the KL) and gets the exact gradient of its shard. The
upstream gradient must be the same on every rank (it is, when every rank computes the same loss from the
identical outputs). The linear ops take ``hidden`` replicated on every rank, as Megatron's
``ColumnParallelLinear(gather_output=False)`` does: each rank's ``d_hidden = dlogits_r @ W_r`` is a partial
sum over its shard, so the backward all-reduces (SUM) ``d_hidden`` and returns the full gradient on every
rank; ``d_weight`` and ``d_bias`` are the rank's own shard's. So do not all-reduce ``hidden``'s gradient a
second time (do not feed ``hidden`` through Megatron's ``copy_to_tensor_model_parallel_region``, whose
backward would sum the already summed gradient again).

Under bf16/fp16 the shards' parts of ``d_hidden`` are summed in float32 and rounded once. Any
``torch.distributed`` group works (NCCL for CUDA tensors, gloo for CPU ones; the tests run gloo).

With ``process_group=None`` the ops do no work here (``shard_of`` returns ``None``) and no collective: they
run exactly as without tensor parallelism.
"""

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from . import _amp, _truncation_parallel
from ._softmax_torch import as_btv, grad_or_zeros

# Label id the implementations see as "ignored" here: none. Labels handed to them are shard-local ids >= 0 (0
# on a row whose label lives on another rank, whose label term label_grad is then 0), so -1 never matches;
# this module masks ignored rows itself.
_NO_IGNORE = -1



# ------------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class Shard:
    """This rank's slice ``[offset, offset + size)`` of a ``vocab``-entry vocabulary."""

    group: object
    offset: int
    size: int
    vocab: int

    def localize(self, labels: torch.Tensor, ignore_index: int):
        """``(local, owned)``: shard-local label ids (0 where this rank does not own the label, or the row is
        ignored) and the rows whose label this rank owns."""
        local = labels - self.offset
        owned = (local >= 0) & (local < self.size) & (labels != ignore_index)
        return local.masked_fill(~owned, 0).contiguous(), owned


def _group_types() -> tuple:
    """A ``dist.new_group`` / ``init_process_group`` group, or a backend built directly (``ProcessGroupGloo``);
    none where this PyTorch build has no ``torch.distributed``."""
    if not dist.is_available():
        return ()
    return (dist.ProcessGroup, torch._C._distributed_c10d.Backend)


def check_group(process_group) -> None:
    if not isinstance(process_group, _group_types()):
        raise ValueError(
            "process_group must be None or a torch.distributed process group (the tensor-parallel group over "
            f"which the vocabulary is split), got {type(process_group).__name__}"
        )
    if process_group.rank() < 0:
        raise ValueError("process_group does not include this process (its rank in it is -1)")


def shard_of(process_group, V_local: int, device: torch.device, same: dict | None = None) -> Shard | None:
    """The layout of this rank's vocabulary slice (``None`` without a group), from every rank's ``V_local``.

    ``same``: the row arguments every rank must pass alike (``{"labels": tensor, "temperature": 0.7, ...}``);
    ``ValueError`` naming the first one that differs between ranks, raised on every rank (so none goes on into
    collectives the others never join: a ``top_k`` on one rank only would otherwise hang the group or mix
    thresholds). Checked in the same all-reduce that exchanges the slice sizes: each rank writes its row of a
    ``[P, 1 + len(same)]`` int64 table (its size, then each argument's fingerprint), the SUM gives every rank
    every row."""
    if process_group is None:
        return None
    check_group(process_group)
    rank, size = process_group.rank(), process_group.size()
    names = list(same or {})
    table = torch.zeros(size, 1 + len(names), dtype=torch.int64, device=device)
    table[rank, 0] = V_local
    for j, name in enumerate(names):
        table[rank, 1 + j] = _fingerprint(same[name], device)
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=process_group)
    table = table.cpu()
    for j, name in enumerate(names):
        if bool((table[:, 1 + j] != table[0, 1 + j]).any()):
            raise ValueError(f"{name} differs between the ranks of process_group: the vocabulary is split over "
                             f"the ranks, the rows are not, so every rank must pass the same {name}")  # fmt: skip
    sizes = table[:, 0].tolist()
    return Shard(process_group, offset=sum(sizes[:rank]), size=V_local, vocab=sum(sizes))


def same_on_every_rank(process_group, device: torch.device, same: dict) -> None:
    """``shard_of``'s check alone, for an op that needs no slice layout (``full_kl``, ``linear_full_kl``,
    ``linear_dpo_loss``): ``ValueError`` on every rank naming the first argument of ``same`` that differs between
    the ranks of ``process_group``; one all-reduce of a small table."""
    shard_of(process_group, 0, device, same)


def row_arguments(labels, temperature, ignore_index, top_k, top_p, min_p, sampler) -> dict:
    """The arguments of a log-prob or loss op that act on its rows, which ``shard_of`` checks are the same on
    every rank: always all seven (the table every rank all-reduces must have the same shape everywhere).
    ``labels`` costs one elementwise pass over ``[N]`` ids, nothing next to the ``[N, V_r]`` slice."""
    return {"labels": labels, "temperature": temperature, "ignore_index": ignore_index, "top_k": top_k,
            "top_p": top_p, "min_p": min_p, "sampler": sampler}  # fmt: skip


def loss_arguments(options, **tensors) -> dict:
    """What else a PPO loss op's ranks must pass alike: its ``[B, T]`` tensors (``None`` where not given) and
    every field of its policy-loss options (a dataclass; each named by its field, as the keywords are). A
    rank with other advantages, old log-probs or mask (a data loader that is not the same on the ranks of the
    tensor-parallel group) or another ``clip_low`` would compute another loss, and its slice's gradient with
    it, silently. One elementwise pass over each ``[B, T]`` tensor."""
    return tensors | {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


_MOD = 2_147_483_647  # 2^31 - 1: fingerprints sum products of residues, exactly and without int64 overflow


def _fingerprint(value, device) -> torch.Tensor | int:
    """An int64 fingerprint of an argument, equal on two ranks when the argument is: ``None``; a number (by its
    float64 value); a string; a tuple or list of ints, such as a ``torch.Size`` (as the int64 tensor of them);
    a tensor (by its shape, dtype and each element's float64 bits at its position; returned as a 0-d int64
    tensor on ``device``, so that no host sync is needed). Anything else is
    fingerprinted by its type's name (the op's own checks reject it next)."""
    if value is None:
        return -1
    if isinstance(value, (bool, int, float)) and abs(value) <= 1e308:
        return int(torch.tensor(float(value), dtype=torch.float64).view(torch.int64))
    if isinstance(value, str):
        return zlib.crc32(value.encode()) + (1 << 40)
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):  # a shape (torch.Size)
        return _fingerprint(torch.tensor(list(value), dtype=torch.int64), device)
    if isinstance(value, torch.Tensor) and not value.is_complex() and value.device.type != "meta":
        bits = value.detach().reshape(-1).to(device=device, dtype=torch.float64).view(torch.int64)
        position = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=device) % _MOD
        low, high = bits & 0xFFFFFFFF, (bits >> 32) & 0xFFFFFFFF
        mixed = ((low % _MOD) * position % _MOD + (high % _MOD) * (position * 7919 % _MOD) % _MOD).sum() % _MOD
        shape = zlib.crc32(f"{tuple(value.shape)} {value.dtype}".encode())
        return mixed * _MOD + shape
    return zlib.crc32(type(value).__name__.encode()) + (1 << 41)


def _reduce_(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def _sum_hidden_grad_(d_hidden: torch.Tensor | None, group) -> torch.Tensor | None:
    """Sum the shards' parts of a replicated ``hidden``'s gradient over the group, in float32 for bf16/fp16 (each
    part was rounded to the dtype once; the sum is rounded once more, not once per addition)."""
    if d_hidden is None or d_hidden.dtype == torch.float32:
        return d_hidden if d_hidden is None else _reduce_(d_hidden, dist.ReduceOp.SUM, group)
    return d_hidden.copy_(_reduce_(d_hidden.float(), dist.ReduceOp.SUM, group))


# ------------------------------------------------------------------------------------ exact combination
# Partials are [R, N]: R shards held by this process (1 under a process group; P when shards are simulated
# in one process with group=None, benchmarks/gpu_tp.py), reduced over R here and then across the group.


def _global_max(row_max, log_norm, group):
    """``M = max_r m_r`` over the shards that have any mass (a shard whose row is all ``-inf`` reports
    ``m_r = 0``, which must not win); 0 for a row with no finite entry anywhere, as the kernels shift it."""
    M = torch.where(log_norm == -float("inf"), -float("inf"), row_max).amax(-2)  # [..., R, N] -> [..., N]
    M = _reduce_(M, dist.ReduceOp.MAX, group)
    return torch.where(M == -float("inf"), 0.0, M)


def combine_logprobs(logp, entropy, row_max, log_norm, owned, group):
    """``(logp, entropy | None, row_max, log_norm)`` of the whole vocabulary from ``[R, N]`` shard partials
    (``logp``: the label's log-prob within the shard where ``owned``; ``entropy`` may be ``None``)."""
    M = _global_max(row_max, log_norm, group)
    log_a = (row_max - M) + log_norm  # log of the shard's mass times S
    a = torch.exp(log_a)
    cols = [a, torch.where(owned, logp + log_a, 0.0)]  # the label term is z_y - M
    if entropy is not None:  # a shard without mass (a = 0: e.g. all -inf, entropy NaN) adds exactly 0
        cols.append(torch.where(a == 0, 0.0, a * (entropy - log_a)))
    parts = _reduce_(torch.stack(cols).sum(1), dist.ReduceOp.SUM, group)
    log_S = parts[0].log()
    H = None if entropy is None else log_S + parts[2] / parts[0]
    return parts[1] - log_S, H, M, log_S


def combine_full_kl(kl, stats, group):
    """``(kl, stats)`` of the whole vocabulary from ``[R, N]`` shard KLs and ``[R, 4, N]`` statistics
    ``(m_p, log s_p, m_q, log s_q)``: ``KL = sum_r w_r (KL_r + log w_r - log w'_r)``."""
    m_p, log_sp, m_q, log_sq = stats.unbind(1)
    M = _global_max(torch.stack([m_p, m_q]), torch.stack([log_sp, log_sq]), group)  # [2, N] (one all-reduce)
    log_ap, log_aq = (m_p - M[0]) + log_sp, (m_q - M[1]) + log_sq
    ap = torch.exp(log_ap)
    term = torch.where(ap == 0, 0.0, ap * (kl + (log_ap - log_aq)))  # p has no mass here: adds exactly 0
    parts = _reduce_(torch.stack([ap, torch.exp(log_aq), term]).sum(1), dist.ReduceOp.SUM, group)
    log_Sp, log_Sq = parts[0].log(), parts[1].log()
    return parts[2] / parts[0] - log_Sp + log_Sq, torch.stack([M[0], log_Sp, M[1], log_Sq])


# ------------------------------------------------------------------------------------------- log-probs


@dataclass(frozen=True)
class LogprobsShardOptions:
    """How to run one op on a shard: its implementation's ``forward`` / ``backward`` (``rf.logprobs``' or,
    with ``linear``, ``rf.linear_logprobs``' launchers or PyTorch twins), the options, the layout."""

    shard: Shard
    impl: str
    forward: Callable
    backward: Callable
    linear: bool
    temperature: float = 1.0
    ignore_index: int = -100
    with_entropy: bool = True
    trunc: object = None  # truncation.RowTruncation of the rows: truncated sampling (rlhf_fast/_truncation_parallel.py)
    row_functions: tuple | None = None  # with trunc: rf.logprobs' (forward, backward), which run on each chunk


def shard_partials(o: LogprobsShardOptions, labels: torch.Tensor, ins):
    """This shard's ``(local, owned, (logp, entropy | None, row_max, log_norm))``: shard-local labels, the
    rows whose label it owns, and its row statistics ``[N]`` (``ins``: ``(x [B, T, V_r],)`` or ``(hidden,
    weight, bias)``). Stage one of :class:`_LogprobsShard`; an in-process simulation of ``P`` shards runs it
    per shard and stacks the statistics for :func:`combine_logprobs` (benchmarks/gpu_tp.py)."""
    local, owned = o.shard.localize(labels, o.ignore_index)
    if o.linear:
        return local, owned, o.forward(*ins, local, o.temperature, o.with_entropy)
    return local, owned, o.forward(ins[0], local, o.temperature, _NO_IGNORE, o.with_entropy)


def shard_grads(o: LogprobsShardOptions, ins, local, owned, stats, g_logp, g_entropy, needs=(True, True, True)):
    """The gradients of this shard's ``ins`` from the combined ``stats = (row_max, log_norm, entropy)``, with
    ``g_logp`` (0 on ignored rows) and ``g_entropy`` (``None``: no entropy terms): ``grad`` of the logits, or
    ``(d_hidden, d_weight, d_bias)`` with ``d_hidden`` this shard's part only (the caller sums the parts)."""
    # Every row gets -g_logp p_v on its shard; only the rank owning the label adds g_logp at it: the label
    # term is label_grad, 0 on the rows owned elsewhere (both implementations take it).
    label_grad = g_logp.masked_fill(~owned, 0.0)
    row_max, log_norm, entropy = stats
    args = (row_max, log_norm, None if g_entropy is None else entropy, g_logp, g_entropy, o.temperature)
    if not o.linear:
        return o.backward(ins[0], local, *args, _NO_IGNORE, label_grad=label_grad)
    return o.backward(*ins, local, *args, *needs, label_grad=label_grad)


class _LogprobsShard(torch.autograd.Function):
    @staticmethod
    @_amp.float32_op
    def forward(ctx, o: LogprobsShardOptions, labels, *inputs):
        ins = inputs if o.linear else (as_btv(inputs[0]),)
        tau = None
        if o.trunc is None:
            local, owned, stats = shard_partials(o, labels, ins)
        else:  # the whole row's thresholds, then the slice's statistics over its kept entries
            local, owned = o.shard.localize(labels, o.ignore_index)
            local, stats, tau = _truncation_parallel.partials(o, ins, local, owned)
        logp, entropy, row_max, log_norm = (None if t is None else t.unsqueeze(0) for t in stats)
        logp, entropy, row_max, log_norm = combine_logprobs(logp, entropy, row_max, log_norm, owned[None],
                                                            o.shard.group)  # fmt: skip
        ignored = labels == o.ignore_index
        logp.masked_fill_(ignored, 0.0)
        no_grad = ignored if tau is None else ignored | ((logp == -float("inf")) & (tau > -float("inf")))  # missed
        ctx.save_for_backward(*ins, local, owned, no_grad, row_max, log_norm, entropy, tau)
        ctx.o, ctx.input_shape = o, inputs[0].shape
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    @_amp.float32_op
    def backward(ctx, grad_logp, grad_entropy):
        o = ctx.o
        *ins, local, owned, no_grad, row_max, log_norm, entropy, tau = ctx.saved_tensors
        n = local.numel()
        # no log-prob gradient on ignored rows, nor (truncated) on rows whose label is outside the kept set
        g_logp = grad_or_zeros(grad_logp, n, local.device).masked_fill(no_grad, 0.0)
        g_entropy = None if grad_entropy is None else grad_or_zeros(grad_entropy, n, local.device)
        stats = (row_max, log_norm, entropy)
        if tau is None:
            grads = shard_grads(o, ins, local, owned, stats, g_logp, g_entropy, ctx.needs_input_grad[2:5])
        else:
            grads = _truncation_parallel.grads(o, ins, local, owned, stats, tau, g_logp, g_entropy,
                                               ctx.needs_input_grad[2:5])  # fmt: skip
        if not o.linear:
            return None, None, grads.reshape(ctx.input_shape)
        d_hidden, d_weight, d_bias = grads
        return None, None, _sum_hidden_grad_(d_hidden, o.shard.group), d_weight, d_bias  # hidden is replicated


def logprobs(o: LogprobsShardOptions, labels: torch.Tensor, *inputs):
    """``(logp [N], entropy [N] | None)`` of the whole vocabulary, for ``labels [N]`` (global ids) and the
    shard's ``inputs``: ``(logits [..., V_r],)`` or, with ``o.linear``, ``(hidden [N, H], weight [V_r, H],
    bias [V_r] | None)``. Differentiable in the inputs (exact gradients of this rank's shard)."""
    return _LogprobsShard.apply(o, labels.reshape(-1), *inputs)


# ------------------------------------------------------------------------------------------------- KL


@dataclass(frozen=True)
class FullKLShardOptions:
    """``rf.full_kl``'s ``forward`` / ``backward`` (or, with ``linear``, ``rf.linear_full_kl``'s chunk loops,
    which take ``impl`` and, backward, the three ``need_*`` flags) run on a shard."""

    group: object
    impl: str
    forward: Callable
    backward: Callable
    linear: bool
    temperature: float = 1.0


class _FullKLShard(torch.autograd.Function):
    @staticmethod
    @_amp.float32_op
    def forward(ctx, o: FullKLShardOptions, *inputs):
        ins = inputs if o.linear else (as_btv(inputs[0]), as_btv(inputs[1]))
        extra = (o.impl,) if o.linear else ()
        kl, stats = o.forward(*ins, o.temperature, *extra)
        kl, stats = combine_full_kl(kl.unsqueeze(0), stats.unsqueeze(0), o.group)
        ctx.save_for_backward(*ins, kl, stats)
        ctx.o, ctx.input_shape = o, inputs[0].shape
        ctx.set_materialize_grads(False)
        return kl

    @staticmethod
    @_amp.float32_op
    def backward(ctx, grad_kl):
        o = ctx.o
        *ins, kl, stats = ctx.saved_tensors
        if grad_kl is None:
            return (None,) * (2 + len(ins))
        g = grad_or_zeros(grad_kl, kl.numel(), kl.device)
        if not o.linear:
            return None, o.backward(*ins, kl, stats, g, o.temperature).reshape(ctx.input_shape), None
        d_hidden, d_weight, d_bias = o.backward(*ins, kl, stats, g, o.temperature, o.impl, *ctx.needs_input_grad[1:4])
        return None, _sum_hidden_grad_(d_hidden, o.group), d_weight, d_bias, None, None, None  # hidden is replicated


def full_kl(o: FullKLShardOptions, *inputs) -> torch.Tensor:
    """``KL [N]`` of the whole vocabulary from the shard's ``(logits, ref_logits)`` or, with ``o.linear``,
    ``(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)``; the gradient flows to the policy side."""
    return _FullKLShard.apply(o, *inputs)
