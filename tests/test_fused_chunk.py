"""The compiled chunk bodies of the PyTorch linear ops (rlhf_fast/_fused_chunk.py) and their chunk budget.

The bodies compile only for big chunks, so the op tests never reach them; here the threshold is lowered to 0
and they run on the tests' small shapes: against float64 through ``rf.linear_logprobs``, and against their
eager twins on the edge cases (masked vocabulary, NaN, large logits). Compiling costs ~10-20 s once per
machine (Inductor caches its builds on disk).
"""

import pytest
import torch
from test_linear_logprobs import _case, check_linear

import rlhf_fast as rf
from rlhf_fast import _fused_chunk as fc
from rlhf_fast._softmax_torch import logp_grad_, softmax_grad_, softmax_stats_


@pytest.fixture
def compiled(monkeypatch):
    """Compile every chunk, whatever its size; fail (not fall back) if compilation fails."""
    monkeypatch.setattr(fc, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.delenv("RLHF_FAST_COMPILE", raising=False)
    yield
    assert not fc._compile_failed, "torch.compile of the chunk bodies failed: the eager fallback ran"


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprobs_compiled_against_float64(compiled, with_entropy, temperature):
    hidden, weight, bias, labels = _case((5, 23), 16, 301, torch.float32, "cpu")
    with rf.chunk_budget(2 * 4 * 301 * 17 / (1 << 20)):  # 17 rows a chunk: 7 chunks, the last one short
        assert fc.chunk_rows(301, 2) == 17
        if with_entropy:
            check_linear(hidden, weight, bias, labels, "torch", temperature=temperature)
        else:
            _check_logp_only(hidden, weight, bias, labels, temperature)
    assert f"stats{int(with_entropy)}" in fc._compiled and f"grad{int(with_entropy)}_into" in fc._compiled


def _check_logp_only(hidden, weight, bias, labels, temperature):
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logp = rf.linear_logprobs(*leaves[:2], labels, bias=leaves[2], temperature=temperature, impl="torch")
    g = torch.randn_like(logp)
    grads = torch.autograd.grad((logp * g).sum(), leaves)
    ref_leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    z = torch.nn.functional.linear(*ref_leaves) / temperature
    ignored = labels == -100
    ref = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_leaves)
    torch.testing.assert_close(logp.double(), ref, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-5)


def _edge_logits():
    x = torch.randn(6, 37) * 3
    x[0, 5:] = -float("inf")  # masked vocabulary
    x[1, 3] = float("nan")  # NaN propagates
    x[2] += 1e4  # large logits: max and log-normalizer kept apart
    x[3, :] = -float("inf")  # an all-masked row
    x[3, 0] = 0.0
    return x


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_bodies_match_their_eager_twins(compiled, with_entropy, temperature):
    x = _edge_logits()
    labels = torch.tensor([2, 0, 7, 0, 36, 11])
    got = fc.chunk_stats(x, labels, temperature, with_entropy)
    # the bodies scale by 1/T: feed the twins the same float32 z (at logits near 1e4 x / T and x * (1/T)
    # differ by an ulp of z, 5e-4, which moves the entropy by more than the bar)
    z = x * torch.tensor(1.0 / temperature)
    want = softmax_stats_(z.clone(), labels, with_entropy)
    for name, a, b in zip(("logp", "entropy", "row_max", "log_norm"), got, want):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5, equal_nan=True, msg=name)
    assert got[0][1].isnan() and not got[0][[0, 2, 3]].isnan().any()
    _, entropy, row_max, log_norm = want
    g_logp, g_ent = torch.randn(6), (torch.randn(6) if with_entropy else None)
    ours = fc.chunk_grad(x.clone(), row_max, log_norm, entropy, g_logp, g_ent, labels, temperature)
    if with_entropy:
        theirs = softmax_grad_(z, row_max, log_norm, entropy, g_logp, g_ent, labels, temperature)
    else:
        theirs = logp_grad_(z, row_max, log_norm, g_logp, labels, temperature)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert (ours[0, 5:] == 0).all() and ours[1].isnan().all() and not ours[[0, 2, 3]].isnan().any()


def test_small_chunks_stay_eager():
    hidden, weight, bias, labels = _case((4, 9), 8, 101, torch.float32, "cpu")
    before = dict(fc._compiled)
    rf.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, impl="torch")
    assert fc._compiled == before  # 36 x 101 logits: far below COMPILE_MIN_ELEMENTS, nothing compiled


def test_chunk_budget(monkeypatch):
    monkeypatch.delenv("RLHF_FAST_CHUNK_MIB", raising=False)
    assert fc.chunk_budget_mib() == fc.DEFAULT_CHUNK_MIB
    assert fc.chunk_rows(50000, 2) == fc.DEFAULT_CHUNK_MIB * (1 << 20) // (8 * 50000)
    monkeypatch.setenv("RLHF_FAST_CHUNK_MIB", "1")
    assert fc.chunk_rows(1 << 16, 2) == 2
    with rf.chunk_budget(4):
        assert fc.chunk_rows(1 << 16, 2) == 8
        with rf.chunk_budget(1e-9):
            assert fc.chunk_rows(1 << 16, 2) == 1  # at least one row
        assert fc.chunk_rows(1 << 16, 2) == 8
    assert fc.chunk_budget_mib() == 1
    for bad in (0, -1, "8", True, float("nan")):
        with pytest.raises(ValueError, match="mib"):
            with rf.chunk_budget(bad):
                pass
    monkeypatch.setenv("RLHF_FAST_CHUNK_MIB", "lots")
    with pytest.raises(ValueError, match="RLHF_FAST_CHUNK_MIB"):
        fc.chunk_budget_mib()
