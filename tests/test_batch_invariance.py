"""Batch invariance (README "Batch invariance"): a row's outputs are bitwise the same alone, in a batch of 64 and
in that batch shuffled, for every op and impl the README claims it for.

Shapes matter here: on CPU the cases that broke invariance before were a matmul of fewer than 12 rows and a
reduction over a single row with V >= 32768 (PyTorch then splits the row's sum over threads), and the
compiled-or-eager choice of the chunk bodies (V >= 16384). The Triton interpreter's ``tl.dot`` is numpy's BLAS,
whose result for a row depends on the row's position in the tile: there the Triton linear op is checked with
the row kept at its position modulo BLOCK_N (batch size, neighbours, padding); a GPU checks every order.
"""

import pytest
import torch
from conftest import DEVICE, IMPLS, INTERPRETED

import rlhf_fast as rf

N = 64
ROWS = (0, 5, 37, 63)


def _equal(a, b) -> bool:
    return torch.equal(a, b) or (a.isnan().any().item() and torch.equal(a.nan_to_num(), b.nan_to_num()))


def assert_batch_invariant(f, rows=ROWS, n=N, seed=0):
    """``f(idx)`` returns a tuple of per-row outputs for the rows ``idx`` of the op's inputs: each checked row
    gives bitwise the same outputs alone, in the batch ``0..n-1`` and in the batch shuffled."""
    full = f(torch.arange(n, device=DEVICE))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    shuffled = f(perm)
    for r in rows:
        alone = f(torch.tensor([r], device=DEVICE))
        at = int((perm == r).nonzero())
        for k, (a, s, b) in enumerate(zip(alone, shuffled, full)):
            assert torch.equal(a[0], b[r]), f"output {k} of row {r}: alone != in the batch of {n}"
            assert torch.equal(s[at], b[r]), f"output {k} of row {r}: shuffled != in order"


def _linear_inputs(H, V, n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=gen).to(DEVICE)
    weight = (torch.randn(V, H, generator=gen) * H**-0.5).to(DEVICE)
    bias = (torch.randn(V, generator=gen) * 0.1).to(DEVICE)
    labels = torch.randint(0, V, (n,), generator=gen).to(DEVICE)
    return hidden, weight, bias, labels


# ------------------------------------------------------------------------------------------- torch, CPU


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the PyTorch path is claimed invariant on CPU")
@pytest.mark.parametrize("H, V", [(64, 2000), (64, 20000)])  # eager chunk bodies; compiled ones (V >= 16384)
def test_linear_logprobs_torch(H, V):
    """Before: a row alone was a 1-row matmul (rounded unlike the rows of a 64-row one), and at V = 20000 it went
    through the eager bodies while a batch of 64 (1.3M logits) went through the compiled ones."""
    hidden, weight, bias, labels = _linear_inputs(H, V)
    for b in (None, bias):
        assert_batch_invariant(lambda idx: rf.linear_logprobs(hidden[idx], weight, labels[idx], bias=b,
                                                              return_entropy=True, impl="torch"))  # fmt: skip
    # a partial last chunk: 21 rows with 8 rows a chunk (chunks of 8, 8 and 5 rows, each padded to 16)
    with rf.chunk_budget(8 * V * 4 * 2 / (1 << 20)):
        assert_batch_invariant(lambda idx: rf.linear_logprobs(hidden[idx], weight, labels[idx], return_entropy=True,
                                                              impl="torch"), rows=(0, 20), n=21)  # fmt: skip


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the PyTorch path is claimed invariant on CPU")
def test_skip_ignored_leaves_labeled_rows_bitwise_unchanged():
    """The compacted batch is another batch: with batch invariance the labeled rows see no difference at all."""
    hidden, weight, bias, labels = _linear_inputs(64, 2000)
    labels[:56] = -100  # a prompt, then 8 response rows, one of them padding: a 7-row product, not a 64-row one
    labels[60] = -100
    skip = rf.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, skip_ignored=True, impl="torch")
    full = rf.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, impl="torch")
    on = labels != -100
    assert torch.equal(skip[0], full[0]) and torch.equal(skip[1][on], full[1][on])


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the PyTorch path is claimed invariant on CPU")
@pytest.mark.parametrize("V", [300, 40000])  # V >= 32768: a single row's sums were split over the threads
def test_logprobs_full_kl_sequence_logprobs_torch(V):
    gen = torch.Generator().manual_seed(1)
    x, ref = torch.randn(N, 2, V, generator=gen) * 3, torch.randn(N, 2, V, generator=gen) * 3
    labels = torch.randint(0, V, (N, 2), generator=gen)
    labels[::3, 1] = -100
    assert_batch_invariant(lambda idx: rf.logprobs(x[idx], labels[idx], return_entropy=True, impl="torch"))
    assert_batch_invariant(lambda idx: rf.logprobs(x[idx, 0], labels[idx, 0], temperature=0.7, return_entropy=True,
                                                   impl="torch"))  # fmt: skip
    assert_batch_invariant(lambda idx: (rf.full_kl(x[idx, 0], ref[idx, 0], impl="torch"),))
    assert_batch_invariant(lambda idx: (rf.sequence_logprobs(x[idx], labels[idx], impl="torch"),))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the PyTorch path is claimed invariant on CPU")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T", [40, 64, 200, 256, 301, 512, 1000, 4099])
def test_gae_torch(T, threads):
    """Before: a row alone was a product of fewer than 12 rows (the chunk starts ``[1, n]``, and at T = 40 the
    chunks ``[3, 16]``), which MKL rounds unlike the same row of a bigger product: up to 9.5e-7 off at every T
    here but 64, in both outputs, one thread or two. Masks: none, right padding, holes (the packed path)."""
    gen = torch.Generator().manual_seed(T)
    rewards, values = torch.randn(N, T, generator=gen), torch.randn(N, T, generator=gen)
    right = (torch.arange(T)[None] < torch.randint(1, T + 1, (N, 1), generator=gen)).float()
    holes = (torch.rand(N, T, generator=gen) > 0.3).float()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (None, right, holes):
            assert_batch_invariant(lambda idx: rf.gae(rewards[idx], values[idx], None if m is None else m[idx],
                                                      gamma=0.99, lam=0.95, impl="torch"))  # fmt: skip
        for n in (2, 5, 17, 37):  # other batch sizes: the row alone against the row in the batch
            assert_batch_invariant(lambda idx: rf.gae(rewards[idx], values[idx], gamma=0.99, lam=0.95, impl="torch"),
                                   rows=(0, n - 1), n=n)  # fmt: skip
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the PyTorch path is claimed invariant on CPU")
def test_gae_torch_issue_repro():
    r, v = torch.randn(37, 301), torch.randn(37, 301)
    alone = rf.gae(r[:1], v[:1], gamma=0.99, lam=0.95, impl="torch")
    batch = rf.gae(r, v, gamma=0.99, lam=0.95, impl="torch")
    assert torch.equal(alone[0][0], batch[0][0]) and torch.equal(alone[1][0], batch[1][0])


# --------------------------------------------------------------------------------------------- triton


@pytest.mark.skipif("triton" not in IMPLS, reason="needs a GPU or the Triton interpreter")
def test_row_kernels_triton():
    """One program per row, launch configuration from V alone: logprobs, full_kl, sequence_logprobs, gae."""
    gen = torch.Generator().manual_seed(2)
    V = 300
    x, ref = (torch.randn(N, 2, V, generator=gen) * 3).to(DEVICE), (torch.randn(N, 2, V, generator=gen) * 3).to(DEVICE)
    labels = torch.randint(0, V, (N, 2), generator=gen).to(DEVICE)
    rows = (0, 37)  # the interpreter is slow: two rows
    assert_batch_invariant(lambda idx: rf.logprobs(x[idx], labels[idx], return_entropy=True, impl="triton"), rows)
    assert_batch_invariant(lambda idx: (rf.full_kl(x[idx], ref[idx], impl="triton"),), rows)
    assert_batch_invariant(lambda idx: (rf.sequence_logprobs(x[idx], labels[idx], impl="triton"),), rows)
    rewards, values = torch.randn(N, 40, generator=gen).to(DEVICE), torch.randn(N, 40, generator=gen).to(DEVICE)
    assert_batch_invariant(lambda idx: rf.gae(rewards[idx], values[idx], impl="triton"), rows)


@pytest.mark.parametrize("impl", IMPLS)
def test_elementwise_ops(impl):
    """The rows of the table's last "yes" line besides gae: per-pair losses, per-row draws and (PyTorch only, no
    kernel) the per-token KL estimators."""
    from rlhf_fast.sampling import row_seeds, sample_tokens

    gen = torch.Generator().manual_seed(3)
    chosen, rejected = torch.randn(N, generator=gen).to(DEVICE) * 3, torch.randn(N, generator=gen).to(DEVICE) * 3
    assert_batch_invariant(lambda idx: (rf.pairwise_sigmoid_loss(chosen[idx], rejected[idx], beta=0.7, margin=0.1,
                                                                 reduction="none", impl=impl),))  # fmt: skip
    logits, seeds = (torch.randn(N, 300, generator=gen) * 3).to(DEVICE), row_seeds(4, 2, range(N))
    assert_batch_invariant(lambda idx: (sample_tokens(logits[idx], seeds[idx.cpu()], 5, 0.8, impl=impl),))
    if impl == "torch":
        logp, ref = -torch.rand(N, 7, generator=gen).to(DEVICE) * 4, -torch.rand(N, 7, generator=gen).to(DEVICE) * 4
        for est in ("k1", "k2", "k3", "abs"):
            assert_batch_invariant(lambda idx: (rf.kl_penalty(logp[idx], ref[idx], estimator=est),))


def _block_n():
    from rlhf_fast.kernels._tuning import matmul_config

    return matmul_config(torch.float32).BLOCK_N


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's variant; a GPU runs the full one below")
def test_linear_logprobs_triton_interpreter():
    """Batch size, neighbours and padding, with the row at the same position in its tile (the interpreter's dot
    is numpy's BLAS, which rounds a row by its position). Before: the vocabulary splits depended on N (one
    split for 4 row blocks, four for one), so a row alone and the same row in a batch of 256 differed."""
    hidden, weight, bias, labels = _linear_inputs(16, 200, n=256)
    block = _block_n()

    def out(idx):
        return rf.linear_logprobs(hidden[idx], weight, labels[idx], bias=bias, return_entropy=True, impl="triton")

    full = out(torch.arange(256))
    others = torch.randperm(255, generator=torch.Generator().manual_seed(3)) + 1
    for r in (0, block, 3 * block):  # rows at position 0 of their tile
        alone = out(torch.tensor([r]))
        mixed = torch.cat([torch.tensor([r]), others[others != r]])  # the row first, other rows shuffled after it
        shuffled = out(mixed)
        for k in range(2):
            assert torch.equal(alone[k][0], full[k][r]), (k, r)
            assert torch.equal(shuffled[k][0], full[k][r]), (k, r)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprobs_triton_gpu(dtype):
    hidden, weight, bias, labels = _linear_inputs(512, 50000, n=1024)
    hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    assert_batch_invariant(lambda idx: rf.linear_logprobs(hidden[idx], weight, labels[idx], bias=bias,
                                                          return_entropy=True, impl="triton"), n=1024)  # fmt: skip


# ----------------------------------------------------------------------------------- the claims' limits


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU BLAS behaviour")
def test_a_short_matmul_rounds_rows_differently():
    """Why the PyTorch linear path pads short chunks: a row of ``h[:m] @ w.T`` with m < 12 can differ bitwise
    from the same row of a bigger product (this torch's CPU BLAS). If this ever stops failing to differ, the
    padding is no longer needed; the test above is what must hold."""
    gen = torch.Generator().manual_seed(4)
    h, w = torch.randn(64, 256, generator=gen), torch.randn(50000, 256, generator=gen)
    big = h @ w.t()
    short = [not torch.equal((h[:m] @ w.t())[m - 1], big[m - 1]) for m in (1, 2, 3, 5, 6, 7)]
    if not any(short):
        pytest.skip("this BLAS rounds short products like long ones")
    padded = torch.cat([h[:1], h.new_zeros(15, 256)]) @ w.t()
    assert torch.equal(padded[0], big[0])
