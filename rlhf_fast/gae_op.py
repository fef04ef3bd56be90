"""``rf.gae``: generalized advantage estimation over ``[B, T]`` rewards and values, without a loop over T.

Semantics (the API document, plus the choice for masks with holes)::

    delta_t = r_t + gamma * V_next(t) - V_t
    A_t     = delta_t + gamma * lam * A_next(t)
    returns = A + V

over the response tokens of a row (``mask != 0``), where ``next(t)`` is the next response token after
``t``; ``V`` and ``A`` after the last response token are 0. Positions with ``mask == 0`` get 0 in both
outputs, and their rewards and values are never read into the recursion: a hole (say, a tool output
inside a multi-turn response) is skipped, as if the tokens on either side were adjacent. This is what
multi-turn trainers do (verl skips observation tokens in the same way). Left padding / prompt tokens are
holes before the first response token, so they change nothing either. Put rewards on response tokens
(usually the last one): a reward on a masked position is dropped.

Two implementations:

- ``triton`` (``kernels/gae.py``): one program per row, a log-depth scan over tiles of the row.
- ``torch``: the same numbers from dense ops. The response tokens of each row are first packed to the
  front (a scatter by their rank), which turns holes into plain adjacency; then
  ``A_k = sum_{j >= k} w^(j-k) delta_j`` (``w = gamma * lam``) is a discounted reverse cumulative sum,
  computed in chunks of ``C`` positions with two small triangular matrices of powers of ``w``:
  within a chunk ``A = delta @ M^T`` with ``M[k, j] = w^(j-k)`` (``j >= k``), and across chunks the same
  with ``w^C`` over the chunk starts, added back with ``w^(C-k)``. Every factor is a power of ``w`` in
  ``[0, 1]``: no division by a small power (the ``w^-t`` of the one-line log-space trick, which
  overflows for ``w^T`` near 0), and ``w^T`` underflowing to 0 is the right answer. Cost
  ``O(B * T * C)`` with ``C ~ sqrt(T / 2)``; memory ``O(B * T)``. Rows whose response is one span (right or
  left padding) skip the packing. Error against float64 within 2.5x that of a float32 loop; timings
  against the Python loops in benchmarks/results/cpu/gae.md. A row's outputs are bitwise the same alone
  or in any batch on CPU (``discounted_reverse_cumsum`` says how; tests/test_batch_invariance.py).

GAE has no gradient: the outputs are constants for the loss (they come back with ``requires_grad=False``).
Computed in float32 whatever autocast says (the torch impl's triangular matmuls would otherwise be bf16).
"""

import functools
import math

import torch

from . import _amp, _checks
from ._dispatch import resolve
from ._fused_chunk import MIN_CHUNK_ROWS, pad_rows

# ----------------------------------------------------------------------------------------------- torch


def _chunk_size(T: int) -> int:
    """``C ~ sqrt(T / 2)`` (a power of two, at least 16): balances the ``B*T*C`` multiply-adds of the
    ``[C, C]`` matmul against the ``B*(T/C)^2`` of the ``[T/C, T/C]`` one. At ``T = 2048`` this is 32, which
    measured 15-25% faster on CPU than 64 (and 2x faster than 128) with one or two threads."""
    return max(16, 1 << math.ceil(math.log2(max(1.0, math.sqrt(T / 2)))))


@functools.lru_cache(maxsize=32)
def _powers_lower(n: int, base: float, step: int, device: torch.device) -> torch.Tensor:
    """``[n, n]`` float32 with ``base^(step * (j - k))`` at ``(j, k)`` for ``j >= k``, 0 above the diagonal.

    The transpose of the upper-triangular ``M[k, j]`` of the module docstring, built contiguous: a
    right operand ``x @ M^T`` that is a transposed view takes a much slower matmul path on CPU.
    Powers in float64, then rounded once; ``base^e`` for ``e`` in the thousands underflows to 0, correctly.
    Cached: a trainer calls GAE with the same ``T`` and ``gamma * lam`` every step.
    """
    j = torch.arange(n, device=device, dtype=torch.float64)
    exponent = (j[:, None] - j[None, :]) * step
    powers = torch.pow(torch.tensor(base, dtype=torch.float64, device=device), exponent.clamp(min=0))
    return torch.where(exponent >= 0, powers, 0.0).to(torch.float32)


def discounted_reverse_cumsum(x: torch.Tensor, w: float) -> torch.Tensor:
    """``y[:, k] = sum_{j >= k} w^(j - k) x[:, j]`` for float32 ``x [B, L]``, ``0 <= w <= 1``, in chunks.

    Chunk ``c`` covers positions ``[cC, (c+1)C)``. With ``local = x_chunk @ M^T`` (the sum inside the
    chunk) and ``start[c] = y[cC]``, ``start = local[:, :, 0] @ N^T`` with ``N[c, c'] = (w^C)^(c' - c)``,
    and ``y[cC + k] = local[c, k] + w^(C - k) * start[c + 1]``.
    """
    B, L = x.shape
    C = _chunk_size(L)
    n = -(-L // C)
    if n * C != L:
        x = torch.nn.functional.pad(x, (0, n * C - L))
    # Both products multiply at least MIN_CHUNK_ROWS rows (zero rows appended, dropped after): a row of a
    # product of fewer than 12 rows rounds unlike the same row of a bigger one on CPU (this torch's MKL), so
    # a row alone (B * n or B rows) came out up to 1e-6 off the same row in a batch. From 16 rows on, every
    # row is bitwise the same whatever the row count and its position (README "Batch invariance").
    local = pad_rows(x.reshape(B * n, C), MIN_CHUNK_ROWS) @ _powers_lower(C, w, 1, x.device)
    y = local[: B * n].view(B, n, C)  # in place below
    start = (pad_rows(y[:, :, 0].contiguous(), MIN_CHUNK_ROWS) @ _powers_lower(n, w, C, x.device))[:B]  # [B, n]
    next_start = torch.nn.functional.pad(start[:, 1:], (0, 1))  # y at the next chunk's start; 0 past the end
    tail = torch.pow(torch.tensor(w, dtype=torch.float64), torch.arange(C, 0, -1, dtype=torch.float64))
    # a product, then a sum (two roundings each, as any elementwise kernel computes them): not addcmul_,
    # whose vectorised and scalar loops may round a*b+c differently (fused or not), and where a row's
    # elements fall between them depends on how the batch's elements are split over the threads
    y += next_start[:, :, None] * tail.to(device=x.device, dtype=torch.float32)
    y = y.view(B, n * C)
    return y if n * C == L else y[:, :L]


def _torch_gae(rewards, values, mask, gamma: float, lam: float):
    B, T = rewards.shape
    r = rewards.to(torch.float32)
    v = values.to(torch.float32)
    # .to(bool) is "nonzero" like mask != 0, and 8x faster on CPU for a float mask
    on = None if mask is None else mask.to(torch.bool)
    # (meta tensors have no values to inspect: take the general path, which handles every mask)
    packed = on is not None and (on.device.type == "meta" or not _one_span_per_row(on))
    if packed:
        # Pack each row's response tokens to the front: token t goes to its rank (number of response
        # tokens before it); masked positions go to a scratch column T that is dropped.
        rank = torch.cumsum(on, dim=1) - 1
        dest = torch.where(on, rank, T)
        buf = torch.zeros((2, B, T + 1), dtype=torch.float32, device=r.device)
        buf.scatter_(2, dest.expand(2, B, T), torch.stack((r, v)))
        r, v = buf[0, :, :T], buf[1, :, :T]
    off = None if on is None else ~on
    if off is not None and not packed:
        # One span of response tokens per row: V = 0 outside it, and delta = 0 there (below), give the
        # same recursion without packing. masked_fill, not torch.where(on, x, 0): 2-3x faster on CPU.
        v = v.masked_fill(off, 0.0)
    # delta = r + gamma * V_next - V, with V = 0 after the last response token (rows end in zeros).
    delta = r - v
    # not add_(alpha=gamma): its vectorised loop fuses a*b+c and its scalar loop may not (see
    # discounted_reverse_cumsum); gamma = 1 (the usual RLHF setting) needs no product
    delta[:, :-1] += v[:, 1:] if gamma == 1.0 else v[:, 1:] * gamma
    if off is not None and not packed:
        delta.masked_fill_(off, 0.0)
    adv = discounted_reverse_cumsum(delta, gamma * lam)
    if packed:
        src = rank.clamp(min=0)
        ret = (adv + v).gather(1, src).masked_fill_(off, 0.0)
        return adv.gather(1, src).masked_fill_(off, 0.0), ret
    if off is not None:
        # Before a row's span (left padding, prompt) A carries the discounted span: zero it. V is already 0
        # outside the span, so the returns need no second mask.
        adv.masked_fill_(off, 0.0)
    return adv, adv + v


def _one_span_per_row(on: torch.Tensor) -> bool:
    """Whether each row's response tokens are contiguous (right or left padding, prompt tokens masked).

    The common case, worth one host sync to skip the packing scatter and gather.
    """
    # Count the rising edges (plus a span starting at t = 0) per row as bytes summed into int16/int32: a
    # plain bool .sum() converts to int64 first, 6-8x slower on CPU at 256x2048.
    count_dtype = torch.int16 if on.shape[1] < (1 << 15) else torch.int32
    rising = (on[:, 1:] & ~on[:, :-1]).view(torch.uint8).sum(1, dtype=count_dtype)
    return bool((rising + on[:, 0] <= 1).all())


def _last_contiguous(x):
    return x if x is None or x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


# ---------------------------------------------------------------------------------------------- public


def _check_discount(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


@_amp.float32_op
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation: ``(advantages, returns)``, float32 ``[B, T]``, no gradient.

    Args:
        rewards: ``[B, T]`` per-token rewards (float32, bfloat16 or float16; any strides), typically the
            score on the last response token plus a per-token KL penalty.
        values: ``[B, T]`` value estimates ``V_t``, same shape.
        mask: ``[B, T]`` response mask (bool, integer or float; nonzero = response token), or ``None``
            (every position is a response token). As in every op a mask entry is a non-negative token
            weight (negative ones raise ``ValueError``); GAE averages nothing, so only which entries are
            nonzero matters here.
        gamma: discount in ``[0, 1]``.
        lam: GAE lambda in ``[0, 1]``.
        impl: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``.

    Over the response tokens of each row, with ``next(t)`` the next response token after ``t``::

        delta_t = r_t + gamma * V_next(t) - V_t,   A_t = delta_t + gamma * lam * A_next(t),   R_t = A_t + V_t

    ``V`` and ``A`` after the last response token are 0 (the response ended). Positions with
    ``mask == 0`` get 0 in both outputs and are skipped by the recursion: for right padding this is the
    textbook recursion; prompt tokens (left padding) change nothing; a hole inside a response (a masked
    tool output) joins the tokens on either side as if adjacent, and a reward placed on a masked
    position is dropped. NaN in a response token's reward or value makes the advantages of its row NaN
    (all of them with ``impl="torch"``, those up to it with ``impl="triton"``); padding never leaks in.
    """
    _checks.check_float_tensor(rewards, "rewards")
    _checks.check_float_tensor(values, "values")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, T], got {tuple(rewards.shape)}")
    _checks.check_shape("values", values, rewards.shape, "the shape of rewards")
    _checks.check_same_device("values", values, "rewards", rewards)
    if mask is not None:
        _checks.check_mask(mask, rewards, "rewards")
    gamma = _check_discount("gamma", gamma)
    lam = _check_discount("lam", lam)
    impl = resolve(impl, rewards.device)
    rewards, values, mask = rewards.detach(), values.detach(), None if mask is None else mask.detach()
    with torch.no_grad():
        if impl == "triton":
            from .kernels.gae import gae_forward

            return gae_forward(_last_contiguous(rewards), _last_contiguous(values), _last_contiguous(mask), gamma, lam)
        return _torch_gae(rewards, values, mask, gamma, lam)

