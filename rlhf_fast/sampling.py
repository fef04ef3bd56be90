"""``rf.sample_tokens``: one token per row from ``softmax(logits / temperature)``, by Gumbel-max with
counter-based noise.

Token ``argmax_v(logits_v / T + g_v)`` with ``g_v`` standard Gumbel noise is an exact sample of
``softmax(logits / T)``. The noise is a splitmix64 hash of ``(row seed, position, v)``, not a draw from a
stateful RNG, so a row's token depends only on its seed, the position and its logits: not on the other rows,
the batch size or the number of processes (the trainers' rollouts rely on it, rlhf_fast/train/rollout.py).
``impl="triton"`` (``auto`` on CUDA) hashes, perturbs and takes the argmax in one read of the logits
(``rlhf_fast.kernels.sampling``); ``"torch"`` forms the same integers with tensor ops (``gumbel_noise``).

Truncated sampling (``top_k`` / ``top_p`` / ``min_p``, rlhf_fast/truncation.py): the argmax runs over the
row's kept tokens only (the others' perturbed logits count as ``-inf``). The Gumbel-max argument holds on
any subset: the token is an exact sample of ``softmax`` restricted to the kept set and renormalised, with
the same noise, so the same keys and the same batch invariance (each row's threshold depends on its row).
"""

import torch

from . import truncation
from ._dispatch import resolve
from ._softmax_torch import as_btv

# splitmix64 (Steele et al. 2014) in int64 arithmetic: multiplications wrap modulo 2**64 and ``>>`` is
# arithmetic, so each logical shift masks off the copied sign bits.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _int64(x: int) -> int:
    """A Python int wrapped into int64's range (two's complement), as the tensor arithmetic wraps."""
    return (x + 2**63) % 2**64 - 2**63


def _mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ ((z >> 30) & (2**34 - 1))) * _MIX1
    z = (z ^ ((z >> 27) & (2**37 - 1))) * _MIX2
    return z ^ ((z >> 31) & (2**33 - 1))


def row_seeds(seed: int, stream: int, rows: torch.Tensor | list[int]) -> torch.Tensor:
    """``[B]`` int64 sampling seeds of rows ``rows`` (global indices) of stream ``stream`` (a PPO step, a
    best-of-n round, an evaluation) of a run seeded with ``seed``: distinct seeds for distinct
    ``(seed, stream, row)``, the same on every process, whatever the batch."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    base = _mix64(torch.tensor([_int64(seed * 1_000_003 + stream)], dtype=torch.int64))
    return _mix64(base + (rows + 1) * _GOLDEN)


def position_keys(seeds: torch.Tensor, position: int) -> torch.Tensor:
    """``[B]`` int64 keys of response position ``position`` of rows seeded with ``seeds``."""
    return _mix64(seeds.to(torch.int64) + _int64((position + 1) * _MIX1))


def gumbel_noise(seeds: torch.Tensor, position: int, vocab_size: int, *, chunk: int = 1 << 22) -> torch.Tensor:
    """``[B, V]`` float32 standard Gumbel noise, a pure function of ``(seeds[b], position, v)``."""
    rows = position_keys(seeds, position)
    out = torch.empty(rows.shape[0], vocab_size, dtype=torch.float32, device=seeds.device)
    step = max(1, chunk // max(vocab_size, 1))  # bounds the int64 temporaries to ~chunk elements
    vocab = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seeds.device) * _GOLDEN
    for start in range(0, rows.shape[0], step):
        z = _mix64(rows[start : start + step, None] + vocab)
        # the top 24 bits, centred in their interval: a float32-exact uniform in (0, 1)
        u = (((z >> 40) & (2**24 - 1)).to(torch.float32) + 0.5) * 2.0**-24
        out[start : start + step] = -torch.log(-torch.log(u))
    return out


def sample_tokens(logits: torch.Tensor, seeds: torch.Tensor, position: int, temperature: float = 1.0, *,
                  top_k=None, top_p=None, min_p=None, sampler: str = "vllm", impl: str = "auto") -> torch.Tensor:  # fmt: skip
    """``[B]`` tokens drawn from ``softmax(logits / temperature)`` (``logits [B, V]``) by Gumbel-max with the
    noise of ``gumbel_noise``: ``impl="triton"`` (``auto`` on CUDA) in one pass over the logits
    (``rlhf_fast.kernels.sampling``), ``"torch"`` with ``gumbel_noise``. Both hash the same integers; their
    ``log``s may differ in the last bit, which decides only between near-exact ties.

    ``top_k``, ``top_p``, ``min_p``, ``sampler``: truncated sampling, as in :func:`rlhf_fast.logprobs` (a
    number or a ``[B]`` tensor each; off values are bitwise no-ops): only kept tokens are drawn, in their
    renormalised proportions. The row's threshold costs a few more reads of the row (Triton: no sort)."""
    trunc = truncation.check_truncation(top_k, top_p, min_p, sampler, logits.shape[:-1], logits.shape[-1],
                                        logits.device)  # fmt: skip
    impl = resolve(impl, logits.device)
    tau = None if trunc is None else truncation.thresholds(impl)(as_btv(logits), trunc, temperature)
    if impl == "triton":
        from .kernels.sampling import gumbel_argmax

        return gumbel_argmax(logits, position_keys(seeds.to(logits.device), position), temperature, tau)
    noise = gumbel_noise(seeds.to(logits.device), position, logits.shape[-1])
    z = logits.float() / temperature
    if tau is not None:
        truncation.mask_below_(z, tau)
    return (z + noise).argmax(-1)
