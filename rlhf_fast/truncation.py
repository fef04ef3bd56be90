"""Truncated sampling (top-k / top-p / min-p): the one definition every op shares, its argument checks, and
each row's kept-set threshold computed from a float32 chunk of logits (the PyTorch twin of
``rlhf_fast.kernels.truncation``).

Semantics, for one row with ``z = logits / T`` and ``p = softmax(z)``:

- min-p (``0 < min_p < 1``) keeps ``v`` iff ``p_v >= min_p * max_w p_w``, i.e. ``z_v >= max z + log(min_p)``;
- top-k (``0 < k < V``) keeps ``v`` iff fewer than ``k`` tokens have a strictly larger ``z``: every token
  ``>=`` the k-th largest value (ties at the k-th value are kept);
- top-p (``0 < p < 1``), on the distribution ``q`` renormalised over the set ``S`` kept so far, keeps
  ``v`` in ``S`` iff the ``q``-mass of the tokens of ``S`` with a strictly larger ``z`` is ``< p``. Without
  ties this is the sorters' rule (ascending sort, drop tokens whose cumulative probability is
  ``<= 1 - p``); tokens tied in value are kept or dropped together (kept, where a sort would split them).
  The largest token is always kept.

``sampler="vllm"`` (vLLM v1): temperature, min-p, top-k, then top-p on what min-p and top-k kept.
``sampler="hf"`` (transformers' ``generate``): temperature, top-k, top-p on what top-k kept, then min-p.
min-p and top-k commute (both keep the tokens above a value), so the two samplers differ only in whether
top-p sees the min-p cut. Each rule keeps every token above some value, so the kept set of a row is
``{v : z_v >= tau}`` for one threshold ``tau`` (``-inf`` when nothing is cut): the ops compute ``tau``
once per row and then the statistics of ``softmax(z)`` restricted to ``z >= tau``.

Off values (``top_k`` 0 or ``>= V``, ``top_p`` 1, ``min_p`` 0, or ``None``) cut nothing; when every row is
off, the ops take their untruncated code path (bitwise no-ops).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._softmax_torch import row_chunks, scaled_float_copy

SAMPLERS = ("vllm", "hf")


@dataclass(frozen=True)
class RowTruncation:
    """Per-row truncation parameters of ``N`` rows, each a contiguous ``[N]`` tensor on the logits' device:
    ``top_k`` int32 (0 = off), ``top_p`` float32 (1 = off), ``min_p`` float32 (0 = off)."""

    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    sampler: str = "vllm"

    def rows(self, sl: slice) -> "RowTruncation":
        return RowTruncation(self.top_k[sl], self.top_p[sl], self.min_p[sl], self.sampler)


def _per_row(name: str, value, row_shape: tuple, device) -> torch.Tensor | None:
    """``value`` (a number, or a tensor of the rows' shape, ``[N]``, or a prefix of the row shape that
    broadcasts over the rest) as a flat ``[N]`` tensor; ``None`` stays ``None``."""
    if value is None or not isinstance(value, torch.Tensor):
        return value
    n = 1
    for s in row_shape:
        n *= s
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but logits are on {device}")
    shape = tuple(value.shape)
    if shape == row_shape or (value.dim() == 1 and value.numel() == n):
        return value.reshape(n)
    if 0 < len(shape) < len(row_shape) and shape == row_shape[: len(shape)]:  # [B] for [B, T] rows
        return value.reshape(shape + (1,) * (len(row_shape) - len(shape))).expand(row_shape).reshape(n)
    raise ValueError(f"{name} must be a number or a tensor of shape {row_shape} (one value per row), "
                     f"[{n}], or a leading part of {row_shape}; got shape {shape}")  # fmt: skip


def _check_range(name: str, x: torch.Tensor, ok: torch.Tensor, what: str) -> None:
    if x.numel() and x.device.type != "meta" and not bool(ok.all()):
        raise ValueError(f"{name} must be {what}, found {x[~ok].flatten()[0].item()}")


def keys_on(top_k=None, top_p=None, min_p=None) -> dict:
    """The truncation keywords that cut anything, as an engine or a config states them: ``top_k > 0`` (off: 0
    in transformers, TRL and here, -1 in vLLM and verl), ``top_p < 1``, ``min_p > 0``; ``None`` is off. The
    trainers' keys, TRL's ``GRPOConfig`` and verl's rollout config all go through it, so they agree on what
    is off."""
    on = {"top_k": top_k is not None and top_k > 0, "top_p": top_p is not None and top_p < 1.0,
          "min_p": min_p is not None and min_p > 0}  # fmt: skip
    return {key: value for key, value in zip(on, (top_k, top_p, min_p)) if on[key]}


def check_truncation(top_k, top_p, min_p, sampler: str, row_shape, V: int, device) -> RowTruncation | None:
    """Checked per-row truncation of rows ``row_shape`` (the logits' leading shape) over a vocabulary of ``V``;
    ``None`` when every row is off (the caller then runs its untruncated code). ``ValueError`` names the
    argument at fault."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    row_shape = tuple(row_shape)
    n = 1
    for s in row_shape:
        n *= s
    k, p, mp = (_per_row(nm, v, row_shape, device) for nm, v in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p)))

    if isinstance(k, torch.Tensor):
        if k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
            raise ValueError(f"top_k must be an int or an integer tensor, got {k.dtype}")
        _check_range("top_k", k, k >= 0, ">= 0 (0 or >= V: off)")
        k = torch.where(k >= V, 0, k).to(torch.int32)
    elif k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 or >= V: off) or an integer tensor, got {k!r}")
        k = None if k == 0 or k >= V else torch.full((n,), k, dtype=torch.int32, device=device)

    def floats(name, v, lo_open, off, what):
        if isinstance(v, torch.Tensor):
            if not v.dtype.is_floating_point:
                raise ValueError(f"{name} must be a float or a float tensor, got {v.dtype}")
            v64 = v.double()
            ok = ((v64 > 0) if lo_open else (v64 >= 0)) & ((v64 <= 1) if off == 1.0 else (v64 < 1))
            _check_range(name, v, ok, what)
            return v.to(torch.float32)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name} must be a float {what} or a float tensor, got {v!r}")
        v = float(v)
        ok = (v > 0 if lo_open else v >= 0) and (v <= 1 if off == 1.0 else v < 1)
        if not ok:
            raise ValueError(f"{name} must be {what}, got {v!r}")
        return None if v == off else torch.full((n,), v, dtype=torch.float32, device=device)

    p = floats("top_p", p, True, 1.0, "in (0, 1] (1: off)")
    mp = floats("min_p", mp, False, 0.0, "in [0, 1) (0: off)")
    active = [
        t is not None and t.numel() and t.device.type != "meta" and bool((t != off).any())
        for t, off in ((k, 0), (p, 1.0), (mp, 0.0))
    ]
    if not any(active):
        return None
    k = k.contiguous() if k is not None else torch.zeros(n, dtype=torch.int32, device=device)
    p = p.contiguous() if p is not None else torch.ones(n, dtype=torch.float32, device=device)
    mp = mp.contiguous() if mp is not None else torch.zeros(n, dtype=torch.float32, device=device)
    return RowTruncation(k, p, mp, sampler)


# ----------------------------------------------------------------------------------------------- torch


def _nucleus(sv, ts, m, p, total=None):
    """``(keep, cum)`` over descending values ``sv [n, L]``: the entries of ``S = {sv >= ts}`` whose
    exclusive cumulative mass ``e^(sv - m)`` is ``< p`` times ``total`` (default: the mass of ``S`` in
    ``sv``), a prefix of each row."""
    e = torch.exp(sv - m).masked_fill_(sv < ts, 0.0)
    cum = e.cumsum(-1)
    excl = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # mass strictly above (no ties)
    return excl < p * (cum[:, -1:] if total is None else total), cum


_MAX, _SUM = "max", "sum"


def _reduce(t: torch.Tensor, op: str, group) -> torch.Tensor:
    """``t`` all-reduced over ``group`` (``None``: ``t`` itself)."""
    if group is None:
        return t
    t = t.contiguous()
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == _MAX else dist.ReduceOp.SUM, group=group)
    return t


def _top_values(z: torch.Tensor, L: int, group) -> torch.Tensor:
    """``[n, L]`` the ``L`` largest values of each row, descending. With a ``group``: of the whole row, from
    the all-gathered ``L`` largest of each rank's slice (``-inf`` past a slice shorter than ``L``)."""
    if group is None:
        return z.topk(L, dim=-1).values
    top = z.topk(min(L, z.shape[1]), dim=-1).values
    if top.shape[1] < L:
        top = torch.cat([top, top.new_full((top.shape[0], L - top.shape[1]), -float("inf"))], dim=-1)
    parts = [torch.empty_like(top) for _ in range(group.size())]
    dist.all_gather(parts, top.contiguous(), group=group)
    return torch.cat(parts, dim=-1).topk(L, dim=-1).values


def row_thresholds(z: torch.Tensor, trunc: RowTruncation, group=None, vocab: int | None = None) -> torch.Tensor:
    """``[n]`` float32 threshold ``tau`` of each row of a float32 chunk ``z [n, V]`` (logits / T): the row
    keeps ``{v : z_v >= tau}``; ``-inf`` where nothing is cut. ``z`` is read, not written.

    ``group`` (a process group, with ``vocab`` the whole vocabulary's size): ``z`` is this rank's slice of
    each row's vocabulary and ``tau`` is the whole row's, the same on every rank
    (rlhf_fast/_truncation_parallel.py): the row's max is an all-reduce (MAX), the largest values of the
    row an all-gather of each slice's largest (:func:`_top_values`), the counts and masses all-reduces
    (SUM); every branch below depends only on these shared values, so every rank runs the same collectives.

    top-k takes the k-th value of ``torch.topk`` (descending values, ``K`` = the largest k of the chunk,
    plus one). top-p needs, per row, the values of the set ``S`` it renormalises over in descending order:
    when every top-p row has a top-k and ``S``'s floor is above the last of the ``K`` values (so no tie
    reaches past them) it reuses them; otherwise it takes the largest ``L`` values of its rows, 256 first and
    8 times more until every row's nucleus ends inside them or ``L`` covers ``S`` (a peaked row stops early;
    a flat one sorts up to ``|S|``, the whole row when nothing cut it before). It keeps the prefix whose
    exclusive cumulative mass is ``< p`` times ``S``'s mass. The row's max comes from the same ``topk`` where
    every row has a top-k.
    """
    n, V = z.shape[0], z.shape[1] if vocab is None else vocab
    neg_inf = torch.full((n,), -float("inf"), dtype=torch.float32, device=z.device)
    k = trunc.top_k.long()
    k_on = k > 0
    vals = None
    t_k = neg_inf
    if bool(k_on.any()):
        # descending; one value past the largest k, so that S's floor lies above the last one unless tied
        vals = _top_values(z, min(int(k.max()) + 1, V), group)
        t_k = torch.where(k_on, vals.gather(-1, (k - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1), neg_inf)
    m = vals[:, 0] if vals is not None and bool(k_on.all()) else _reduce(z.amax(-1), _MAX, group)
    mp_on = trunc.min_p > 0
    t_min = torch.where(mp_on, m + torch.where(mp_on, trunc.min_p, 1.0).log(), neg_inf) if bool(mp_on.any()) else neg_inf
    t_s = torch.maximum(t_k, t_min) if trunc.sampler == "vllm" else t_k  # the set top-p renormalises over
    tau = torch.maximum(t_k, t_min)
    p_on = trunc.top_p < 1
    if bool(p_on.any()):
        rows = p_on.nonzero().squeeze(-1)
        ts, mr, pr = t_s[rows].unsqueeze(-1), m[rows].unsqueeze(-1), trunc.top_p[rows].unsqueeze(-1)
        if vals is not None and bool((k_on[rows] & (vals[rows, -1] < ts.squeeze(-1))).all()):
            sv = vals[rows]  # S inside the top-k values: entries past S are masked below
            keep, _ = _nucleus(sv, ts, mr, pr)
        else:  # the largest values of S, 256 first, 8 times more until each row's nucleus ends inside them
            zr = z if rows.numel() == n else z[rows]
            live = zr >= ts
            size = _reduce(live.sum(-1), _SUM, group)
            total = _reduce(torch.exp(zr - mr).masked_fill_(~live, 0.0).sum(-1, keepdim=True), _SUM, group)  # S's mass
            L = 256
            while True:
                L = min(L, int(size.max()))
                sv = _top_values(zr, L, group)
                keep, _ = _nucleus(sv, ts, mr, pr, total)
                if L == int(size.max()) or bool((~keep[:, -1] | (size <= L)).all()):
                    break
                L *= 8
        last = (keep.sum(-1) - 1).clamp(min=0)
        t_p = sv.gather(-1, last.unsqueeze(-1)).squeeze(-1)
        tau = tau.clone()
        tau[rows] = torch.maximum(tau[rows], t_p)
    return tau


def chunked_thresholds(x: torch.Tensor, trunc: RowTruncation, temperature: float) -> torch.Tensor:
    """``[B*T]`` float32 threshold of each row of ``[B, T, V]`` logits, ``row_thresholds`` on row chunks of
    about 2M entries (so the sort top-p may need stays ``O(chunk)``); the twin of
    ``kernels.truncation.row_thresholds``."""
    tau = torch.empty(x.shape[0] * x.shape[1], dtype=torch.float32, device=x.device)
    for r, (chunk,) in row_chunks([x], max(1, (1 << 21) // x.shape[-1])):
        rows = slice(r, r + chunk.shape[0])
        # read-only: a float32 chunk at T = 1 needs no copy
        z = chunk if chunk.dtype == torch.float32 and temperature == 1.0 else scaled_float_copy(chunk, temperature)
        tau[rows] = row_thresholds(z, trunc.rows(rows))
    return tau


def thresholds(impl: str):
    """The threshold function ``(x [B, T, V], trunc, temperature) -> tau [B*T]`` of an impl."""
    if impl == "triton":
        from .kernels.truncation import row_thresholds as triton_thresholds

        return triton_thresholds
    return chunked_thresholds


def mask_below_(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``z [n, V]`` with every entry below its row's ``tau [n]`` set to ``-inf`` (in place)."""
    return z.masked_fill_(z < tau.unsqueeze(-1), -float("inf"))
