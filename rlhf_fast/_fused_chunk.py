"""The per-chunk softmax work of the PyTorch linear ops, fused by ``torch.compile``, and their chunk size.

``rf.linear_logprobs``' PyTorch implementation streams ``hidden @ weight.T`` in chunks of rows. Per chunk it
does one matmul (``2·rows·H·V`` FLOPs) and then elementwise work over the ``[rows, V]`` logits: the row
statistics in forward, the ``dlogits`` in backward. At lm_head sizes ``H`` is small next to ``V`` (256-4096
against 32k-256k), so each logit costs only ``2H`` FLOPs of matmul and eager PyTorch's elementwise passes
(max, subtract, exp, sum, ... each a read and a write of the chunk) cost as much as the matmul itself
(measured on a 2-core AMD EPYC at 1024 x 50000: statistics 120 ms and dlogits 256 ms eager, 11 ms and 55 ms
compiled, against ~180 ms for the chunk's matmul). Compiled, each body is one loop over the chunk: the
statistics read it (twice, the second time from cache) and write ``[rows]`` vectors; the gradient reads it
once and writes ``dlogits``.

- Compilation costs seconds (Inductor writes and builds C++), so small vocabularies run the eager twins in
  ``_softmax_torch.py`` and the compiled bodies are built on the first chunk of a vocabulary of at least
  ``COMPILE_MIN_ELEMENTS / COMPILE_RULE_ROWS`` (16384) entries: a test or a toy model never compiles. ``dynamic=True``: one build
  serves every row count and vocabulary size. Where compilation fails (no C++ compiler, an unsupported
  platform) the eager twins run, after one warning. ``RLHF_FAST_COMPILE=0`` turns it off.
- The chunk size comes from a memory budget (:func:`chunk_budget_mib`, default :data:`DEFAULT_CHUNK_MIB`):
  the float32 ``[rows, V]`` temporaries a chunk holds at once fit in it.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from ._softmax_torch import logp_grad_, softmax_grad_, softmax_stats_
from .truncation import mask_below_

# Budget for a chunk's float32 [rows, V] temporaries. 192 MiB is 503 rows at V = 50000 with two temporaries
# (backward: the logits and dlogits). The logits product has K = H (256 here), and on 2 threads its rate
# grows with the rows per call (MKL packs the whole weight for each call): forward + backward of
# rf.linear_logprobs at 4096 x 256 x 50000 took 2.80 / 2.54 / 2.33 / 2.29 / 2.44 s with budgets of 64 / 128 /
# 192 / 256 / 512 MiB on the 2-core AMD EPYC (one run each, in one process). 192 MiB keeps the op's peak
# extra memory near 250 MiB there, a sixth of the naive composition's float32 logits and log-softmax.
DEFAULT_CHUNK_MIB = 192
_budget_mib: float | None = None  # set by chunk_budget(); None: RLHF_FAST_CHUNK_MIB or the default

# Smallest chunk (in logits) worth compiling for: 1M float32 logits take ~0.3 ms per eager pass, so a call
# this size loses nothing to eager, and the tests' shapes (at most ~10^5 logits) never compile.
COMPILE_MIN_ELEMENTS = 1 << 20


def chunk_budget_mib() -> float:
    """The memory budget (MiB) of a chunk's ``[rows, V]`` float32 temporaries in the PyTorch linear ops:
    the innermost :func:`chunk_budget` context, else ``RLHF_FAST_CHUNK_MIB``, else :data:`DEFAULT_CHUNK_MIB`."""
    if _budget_mib is not None:
        return _budget_mib
    env = os.environ.get("RLHF_FAST_CHUNK_MIB")
    if env is None:
        return DEFAULT_CHUNK_MIB
    try:
        value = float(env)
    except ValueError:
        raise ValueError(f"RLHF_FAST_CHUNK_MIB must be a number of MiB, got {env!r}") from None
    if not value > 0:
        raise ValueError(f"RLHF_FAST_CHUNK_MIB must be positive, got {env!r}")
    return value


@contextlib.contextmanager
def chunk_budget(mib: float):
    """Run the PyTorch linear ops with chunk temporaries of at most ``mib`` MiB (at least one row a chunk)::

        with rf.chunk_budget(512):  # bigger chunks: more memory, matmuls nearer the machine's peak
            logp = rf.linear_logprobs(hidden, weight, labels)
    """
    global _budget_mib
    if isinstance(mib, bool) or not isinstance(mib, (int, float)) or not mib > 0:
        raise ValueError(f"mib must be a positive number of MiB, got {mib!r}")
    previous, _budget_mib = _budget_mib, float(mib)
    try:
        yield
    finally:
        _budget_mib = previous


def chunk_rows(V: int, temporaries: int) -> int:
    """Rows per chunk so that ``temporaries`` float32 ``[rows, V]`` tensors fit in the budget."""
    return max(1, int(chunk_budget_mib() * (1 << 20)) // (4 * V * temporaries))


# Fewest rows a chunk of ``rf.linear_logprobs``' PyTorch forward multiplies and reduces: a shorter chunk (the
# last one, or a small call) is padded with zero rows, dropped afterwards. On CPU a row of ``h[:m] @ w.T`` is
# rounded differently when m < 12 (measured with this torch's MKL at H = 256, V = 50000 and H = 64, V = 2000:
# the rows past the last multiple of 4 differ from the same rows in a bigger product), and a reduction over a
# single row is split over the threads; from 12 rows on, every row comes out bitwise the same whatever m, its
# position and its neighbours. Padding costs at most 15 rows of work a call. See README "Batch invariance".
MIN_CHUNK_ROWS = 16


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` rows (``x`` itself when it has as many)."""
    n = x.shape[0]
    return x if n >= rows else torch.cat([x, x.new_zeros((rows - n, *x.shape[1:]))])


def chunk_buffer(step: int, N: int, V: int, device: torch.device) -> torch.Tensor:
    """One float32 ``[rows, V]`` buffer every chunk of a call reuses. A fresh tensor per chunk would cost its
    page faults every time: chunks are past glibc's largest mmap threshold (32 MiB), so each allocation is a
    new mapping (measured: ~0.3 s of a 3 s forward + backward at 4096 x 256 x 50000 on 2 cores)."""
    return torch.empty(min(step, N), V, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------- compiled bodies
# Each body is the twin of an eager function in _softmax_torch.py (same formulas, derived there and in
# kernels/logprobs.py), written out of place so that Inductor fuses it into one loop.


def _kept(z: torch.Tensor, tau: torch.Tensor | None) -> torch.Tensor:
    """``z`` with each row's entries below its ``tau`` at ``-inf`` (truncated sampling); ``z`` without ``tau``."""
    return z if tau is None else torch.where(z >= tau.unsqueeze(-1), z, torch.full_like(z, -float("inf")))


def _stats(x: torch.Tensor, labels: torch.Tensor, inv_t: torch.Tensor, with_entropy: bool, tau=None):
    """``(logp, entropy | None, row_max, log_norm)`` of ``softmax(x * inv_t)``; the twin of ``softmax_stats_``."""
    z = _kept(x * inv_t, tau)
    m = z.amax(dim=-1, keepdim=True)
    m = torch.where(m == -float("inf"), torch.zeros_like(m), m)  # an all -inf row: shift by 0
    d = z - m
    e = torch.exp(d)
    s = e.sum(-1)
    log_s = torch.log(s)
    d_label = d.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return d_label - log_s, None, m.squeeze(-1), log_s
    # H = log s - u / s with u = sum e^d d; a masked entry (d = -inf, e = 0) adds 0, NaN stays NaN
    u = torch.where(e == 0, torch.zeros_like(e), e * d).sum(-1)
    return d_label - log_s, log_s - u / s, m.squeeze(-1), log_s


def _grad(x, row_max, log_norm, entropy, g_logp, g_entropy, labels, inv_t: torch.Tensor, label_grad=None, tau=None):
    """``dL/dx`` for ``z = x * inv_t``; the twin of ``softmax_grad_`` (``entropy`` None: of ``logp_grad_``)."""
    logp_all = _kept(x * inv_t, tau) - row_max.unsqueeze(-1) - log_norm.unsqueeze(-1)
    p = torch.exp(logp_all)
    if entropy is None:
        g = -p * g_logp.unsqueeze(-1)
    else:
        g = -p * (g_logp.unsqueeze(-1) + g_entropy.unsqueeze(-1) * (logp_all + entropy.unsqueeze(-1)))
        g = torch.where(p == 0, torch.zeros_like(g), g)  # masked vocabulary: p = 0, log p = -inf
    one_hot = torch.arange(x.shape[-1], device=x.device).unsqueeze(0) == labels.unsqueeze(-1)
    g = torch.where(one_hot, g + (g_logp if label_grad is None else label_grad).unsqueeze(-1), g)
    return g * inv_t


def _grad_into(out, x, row_max, log_norm, entropy, g_logp, g_entropy, labels, inv_t: torch.Tensor,
               label_grad=None, tau=None) -> None:  # fmt: skip
    """``_grad`` stored into ``out``: Inductor writes a mutated input in place, so a caller that reuses one
    buffer for every chunk allocates (and page-faults) nothing per chunk."""
    out.copy_(_grad(x, row_max, log_norm, entropy, g_logp, g_entropy, labels, inv_t, label_grad, tau))


_compiled: dict[str, object] = {}
_compile_failed = False


def _compile_enabled() -> bool:
    return not _compile_failed and os.environ.get("RLHF_FAST_COMPILE", "1") != "0"


def _run_compiled(name: str, fn, *args) -> tuple[bool, object]:
    """``(True, torch.compile(fn)(*args))``, or ``(False, None)`` after a failure to compile (warned once)."""
    global _compile_failed
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    try:
        return True, _compiled[name](*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, never fail the op
        _compile_failed = True
        warnings.warn(f"rlhf_fast: torch.compile of the chunk bodies failed ({type(exc).__name__}: {exc}); "
                      "the PyTorch ops run eager from now on (set RLHF_FAST_COMPILE=0 to skip the attempt)",
                      RuntimeWarning, stacklevel=3)  # fmt: skip
        return False, None


# The compiled bodies run for every chunk of a vocabulary of at least COMPILE_MIN_ELEMENTS / COMPILE_RULE_ROWS
# entries (16384), the eager twins for smaller ones: the choice depends on V alone, never on the rows of the
# call, because the two round differently (a row must not change with the batch around it). Any LM vocabulary
# (32k-256k) compiles; the tests' toy vocabularies never do.
COMPILE_RULE_ROWS = 64


def _use_compiled(x: torch.Tensor) -> bool:
    return x.shape[-1] * COMPILE_RULE_ROWS >= COMPILE_MIN_ELEMENTS and x.device.type == "cpu" and _compile_enabled()


def _check_tau(tau, temperature: float) -> str:
    """The compiled bodies' name suffix of a call with ``tau`` (``""`` without)."""
    if tau is None:
        return ""
    if temperature != 1.0:  # the bodies scale by 1 / T, which may round otherwise than the division tau saw
        raise ValueError("tau needs the chunk already divided by the temperature (temperature=1.0)")
    return "_tau"


def chunk_stats(x: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool, tau=None):
    """``(logp, entropy | None, row_max, log_norm)`` of ``softmax(x / temperature)`` for a float32 chunk
    ``x [rows, V]`` (left unchanged) and labels in ``[0, V)``. ``tau [rows]`` (truncated sampling, with ``x``
    already divided by the temperature and ``temperature=1.0``): the softmax over each row's entries
    ``>= tau`` (a label below it gets ``-inf``), masked inside the body rather than by a pass of its own."""
    suffix = _check_tau(tau, temperature)
    if _use_compiled(x):
        ok, stats = _run_compiled(f"stats{int(with_entropy)}{suffix}", _stats, x, labels, _inv(temperature),
                                  with_entropy, tau)  # fmt: skip
        if ok:
            return stats
    z = x.clone() if temperature == 1.0 else x / temperature
    return softmax_stats_(z if tau is None else mask_below_(z, tau), labels, with_entropy)


def chunk_grad(x, row_max, log_norm, entropy, g_logp, g_entropy, labels, temperature: float,
               out: torch.Tensor | None = None, label_grad=None, tau=None) -> torch.Tensor:  # fmt: skip
    """``dL/dx`` for the float32 chunk ``x [rows, V]`` (overwritten) of ``softmax(x / temperature)``, with
    ``L = sum(g_logp * logp + g_entropy * entropy)``; ``entropy`` None: the log-prob terms alone.

    ``out``: a ``[rows, V]`` float32 buffer the compiled body writes the result into (returned); the eager
    twins ignore it and return ``x``, overwritten. ``label_grad``: see ``softmax_grad_``. ``tau``: as in
    :func:`chunk_stats` (the entries below it get no gradient; ``g_logp`` must be 0 on a row whose label is
    below it)."""
    suffix = _check_tau(tau, temperature)
    if _use_compiled(x):
        args = (x, row_max, log_norm, entropy, g_logp, g_entropy, labels, _inv(temperature), label_grad, tau)
        name = f"grad{int(entropy is not None)}{suffix}"
        if out is None:
            ok, result = _run_compiled(name, _grad, *args)
        else:
            ok, result = _run_compiled(name + "_into", _grad_into, out, *args)[0], out
        if ok:
            return result
    z = x if temperature == 1.0 else x.div_(temperature)
    z = z if tau is None else mask_below_(z, tau)
    if entropy is None:
        return logp_grad_(z, row_max, log_norm, g_logp, labels, temperature, label_grad)
    return softmax_grad_(z, row_max, log_norm, entropy, g_logp, g_entropy, labels, temperature, label_grad)


def _inv(temperature: float) -> torch.Tensor:
    # a tensor, not a Python float: a new temperature must not recompile the bodies
    return torch.tensor(1.0 / temperature, dtype=torch.float32)
