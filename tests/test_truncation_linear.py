"""rf.linear_logprobs with truncated sampling (both impls, against a float64 reference of the truncated
distribution on hidden @ weight.T + bias: rlhf_fast/reference.py truncated_logprobs_reference, checked
against vLLM's and transformers' samplers in tests/test_truncation.py), and matmul_dtype on the linear ops."""

import pytest
import torch
from conftest import IMPLS

import rlhf_fast as rf
from rlhf_fast.reference import truncated_logprobs_reference

RTOL = 2e-5


def operands(N=12, H=8, V=53, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen)
    w = torch.randn(V, H, generator=gen)
    b = torch.randn(V, generator=gen)
    z = h @ w.T + b
    labels = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(-1)
    labels[1] = int(z[1].argmin())  # outside every kept set below
    labels[4] = -100
    return h.to(dtype), w.to(dtype), b.to(dtype), labels


def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def check(impl, dtype=torch.float32, temperature=0.9, **trunc):
    h0, w0, b0, labels = operands(dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(labels.shape, generator=gen), torch.randn(labels.shape, generator=gen)
    h, w, b = (t.clone().requires_grad_(True) for t in (h0, w0, b0))
    logp, ent = rf.linear_logprobs(h, w, labels, bias=b, temperature=temperature, return_entropy=True, impl=impl, **trunc)
    loss = (torch.where(torch.isfinite(logp), logp, 0.0) * g1).sum() + (ent * g2).sum()
    grads = torch.autograd.grad(loss, (h, w, b))
    h64, w64, b64 = (t.double().requires_grad_(True) for t in (h0, w0, b0))
    ref_logp, ref_ent = truncated_logprobs_reference(h64 @ w64.T + b64, labels, temperature=temperature, **trunc)
    ref_loss = (torch.where(torch.isfinite(ref_logp), ref_logp, 0.0) * g1.double()).sum() + (ref_ent * g2.double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, (h64, w64, b64))
    assert torch.equal(torch.isinf(logp), torch.isinf(ref_logp)) and logp[1] == -float("inf")
    fin = torch.isfinite(ref_logp)
    errs = {"logp": rel(logp.detach()[fin], ref_logp.detach()[fin]), "entropy": rel(ent.detach(), ref_ent.detach())}
    if dtype == torch.float32:
        errs.update({f"grad_{n}": rel(g, r) for n, g, r in zip("hwb", grads, ref_grads)})
    else:  # gradients stored in bf16: one rounding of the float64 ones, plus the float32 bar
        for g, r in zip(grads, ref_grads):
            assert ((g.double() - r).abs() <= torch.finfo(dtype).eps * r.abs() + RTOL * r.abs().max()).all()
    for name, err in errs.items():
        assert err <= RTOL, f"{name}: relative error {err:.3g}"
    return errs


CASES = {
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.1),
    "all_vllm": dict(top_k=9, top_p=0.85, min_p=0.05),
    "all_hf": dict(top_k=9, top_p=0.85, min_p=0.05, sampler="hf"),
    "rows": dict(top_k=torch.tensor([3, 0, 60, 7] * 3), top_p=torch.tensor([1.0, 0.7, 0.9] * 4)),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_linear_logprobs_against_float64(impl, case):
    check(impl, **CASES[case])


@pytest.mark.parametrize("impl", IMPLS)
def test_several_chunks_and_bf16(impl):
    """A chunk budget of a few rows: thresholds and statistics per chunk, the backward's recomputed chunks
    keep the same sets."""
    with rf.chunk_budget(4 * 53 * 2 * 5 / 2**20):  # 5 rows a chunk
        check(impl, top_k=9, top_p=0.85)
    check(impl, dtype=torch.bfloat16, top_k=9, top_p=0.85, min_p=0.02)


@pytest.mark.parametrize("impl", IMPLS)
def test_skip_ignored_and_return_entropy_false(impl):
    h, w, b, labels = operands()
    kw = dict(bias=b, top_k=9, top_p=0.85, impl=impl)
    full = rf.linear_logprobs(h, w, labels, **kw)
    skipped = rf.linear_logprobs(h, w, labels, skip_ignored=True, **kw)
    on = labels != -100
    torch.testing.assert_close(skipped[on], full[on], rtol=1e-6, atol=1e-6)
    assert skipped[4] == 0 and torch.isinf(full[1]) and torch.isinf(skipped[1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("off", [dict(top_k=0), dict(top_k=53, top_p=1.0, min_p=0.0, sampler="hf"),
                                 dict(top_k=torch.zeros(12, dtype=torch.int32))])  # fmt: skip
def test_off_values_are_bitwise_no_ops(impl, off):
    h0, w0, b0, labels = operands()
    outs = []
    for kw in ({}, off):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        logp, ent = rf.linear_logprobs(h, w, labels, bias=b0, return_entropy=True, impl=impl, **kw)
        outs.append((logp, ent, *torch.autograd.grad(logp.sum() + ent.sum(), (h, w))))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_bad_truncation_arguments_name_them():
    h, w, b, labels = operands()
    for kw, name in ((dict(top_k=-1), "top_k"), (dict(top_p=2.0), "top_p"), (dict(min_p=1.0), "min_p"),
                     (dict(top_k=2, sampler="nope"), "sampler")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            rf.linear_logprobs(h, w, labels, impl="torch", **kw)


# ------------------------------------------------------------------------------------------ matmul_dtype


def _linear_calls(h, w, labels, **kw):
    """Every linear op on one hidden / lm_head pair: ``{name: a float32 output}``."""
    B = h.shape[0] // 2
    T = h.shape[1]
    old = torch.full((h.shape[0], T), -3.0)
    adv = torch.linspace(-1, 1, h.shape[0] * T).view(h.shape[0], T)
    zeros = torch.zeros(B)
    return {
        "linear_logprobs": rf.linear_logprobs(h, w, labels, impl="torch", **kw),
        "linear_ppo_loss": rf.linear_ppo_loss(h, w, labels, old, adv, impl="torch", **kw)[0],
        "linear_full_kl": rf.linear_full_kl(h, w, h.flip(0), w.flip(0), impl="torch", **kw),
        "linear_dpo_loss": rf.linear_dpo_loss(h, w, labels, zeros, zeros, impl="torch", reduction="none", **kw)[0],
    }


def test_matmul_dtype_float32_ignores_bf16_autocast():
    """Under CPU bf16 autocast: ``matmul_dtype=torch.float32`` gives the float32 computation bitwise (same
    code path as without autocast), and differs from the default, which multiplies bf16 operands."""
    gen = torch.Generator().manual_seed(3)
    h, w = torch.randn(4, 5, 32, generator=gen), torch.randn(97, 32, generator=gen)
    labels = torch.randint(0, 97, (4, 5), generator=gen)
    fp32 = _linear_calls(h, w, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _linear_calls(h, w, labels, matmul_dtype=torch.float32)
        bf16 = _linear_calls(h, w, labels)
        bf16_explicit = _linear_calls(h, w, labels, matmul_dtype=None)
    for name in fp32:
        assert torch.equal(ours[name], fp32[name]), name
        assert not torch.equal(bf16[name], fp32[name]), name
        assert torch.equal(bf16_explicit[name], bf16[name]), name


def test_matmul_dtype_float32_upcasts_bf16_inputs_and_keeps_their_gradient_dtype():
    gen = torch.Generator().manual_seed(4)
    h, w = torch.randn(6, 16, generator=gen).bfloat16(), torch.randn(31, 16, generator=gen).bfloat16()
    labels = torch.randint(0, 31, (6,), generator=gen)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = rf.linear_logprobs(hh, ww, labels, matmul_dtype=torch.float32, impl="torch")
    logp.sum().backward()
    assert hh.grad.dtype == torch.bfloat16 and ww.grad.dtype == torch.bfloat16
    assert torch.equal(logp, rf.linear_logprobs(h.float(), w.float(), labels, impl="torch"))


@pytest.mark.parametrize("bad", [torch.bfloat16, torch.float64, "float32", 32])
@pytest.mark.parametrize("op", ["linear_logprobs", "linear_ppo_loss", "linear_full_kl", "linear_dpo_loss"])
def test_bad_matmul_dtype_names_it(op, bad):
    h, w = torch.randn(2, 3, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 3))
    with pytest.raises(ValueError, match="matmul_dtype"):
        if op == "linear_logprobs":
            rf.linear_logprobs(h, w, labels, matmul_dtype=bad)
        elif op == "linear_ppo_loss":
            rf.linear_ppo_loss(h, w, labels, torch.zeros(2, 3), torch.zeros(2, 3), matmul_dtype=bad)
        elif op == "linear_full_kl":
            rf.linear_full_kl(h, w, h, w, matmul_dtype=bad)
        else:
            rf.linear_dpo_loss(h, w, labels, torch.zeros(1), torch.zeros(1), matmul_dtype=bad)


def test_torch_compiled_chunk_bodies_with_truncation(monkeypatch):
    """A vocabulary past the compile rule (V >= 16384): the PyTorch route masks each chunk in place and runs
    the compiled statistics and gradient bodies, over several chunks, at T != 1, against float64."""
    from rlhf_fast import _fused_chunk

    if not _fused_chunk._compile_enabled():
        pytest.skip("torch.compile of the chunk bodies is off here")
    gen = torch.Generator().manual_seed(3)
    N, H, V = 24, 16, 16411
    h0, w0 = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen) * 0.5
    labels = torch.randint(0, V, (N,), generator=gen)
    z = h0 @ w0.T
    labels[:4] = z[:4].argmax(-1)  # kept: finite log-probs with a gradient
    g1, g2 = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    kw = dict(top_k=40, top_p=torch.rand(N, generator=gen) * 0.5 + 0.5, min_p=0.01)
    h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    with rf.chunk_budget(4 * V * 2 * 10 / 2**20):  # 10 rows a chunk
        logp, ent = rf.linear_logprobs(h, w, labels, temperature=0.7, return_entropy=True, impl="torch", **kw)
        grads = torch.autograd.grad((torch.where(torch.isfinite(logp), logp, 0.0) * g1).sum() + (ent * g2).sum(), (h, w))
    h64, w64 = h0.double().requires_grad_(True), w0.double().requires_grad_(True)
    ref_logp, ref_ent = truncated_logprobs_reference(h64 @ w64.T, labels, temperature=0.7, **kw)
    ref_grads = torch.autograd.grad((torch.where(torch.isfinite(ref_logp), ref_logp, 0.0) * g1.double()).sum()
                                    + (ref_ent * g2.double()).sum(), (h64, w64))  # fmt: skip
    assert torch.equal(torch.isinf(logp), torch.isinf(ref_logp)) and torch.isfinite(logp[:4]).all()
    assert torch.isinf(logp).any()  # some labels fall outside their kept sets
    fin = torch.isfinite(ref_logp)
    assert rel(logp.detach()[fin], ref_logp.detach()[fin]) <= RTOL
    assert rel(ent.detach(), ref_ent.detach()) <= RTOL
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) <= RTOL


@pytest.mark.parametrize("impl", IMPLS)
def test_truncated_ops_under_cpu_bf16_autocast(impl):
    """Truncated rf.linear_logprobs and rf.logprobs under CPU bf16 autocast (the mixed-precision path a GPU
    trainer takes): the lm_head multiplies bf16-rounded operands into float32 logits, as autocast's F.linear
    would, and everything after is the float32 truncated op: bitwise the same op on the rounded operands, with
    finite gradients in the inputs' dtype and -inf (no NaN) for a label outside the kept set."""
    h0, w0, b0, labels = operands()
    kw = dict(top_k=9, top_p=0.85, min_p=0.05, temperature=0.9)
    h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = rf.linear_logprobs(h, w, labels, return_entropy=True, impl=impl, **kw)
    rounded = rf.linear_logprobs(h0.bfloat16().float(), w0.bfloat16().float(), labels, return_entropy=True,
                                 impl=impl, **kw)  # fmt: skip
    assert torch.equal(logp, rounded[0]) and torch.equal(ent, rounded[1])
    assert logp[1] == -float("inf") and not torch.isnan(logp).any()
    (torch.where(torch.isfinite(logp), logp, 0.0).sum() + ent.sum()).backward()
    assert h.grad.dtype == torch.float32 and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()

    z = (h0 @ w0.T).bfloat16()
    x = z.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = rf.logprobs(x, labels, impl=impl, **kw)
    assert torch.equal(lp, rf.logprobs(z.float(), labels, impl=impl, **kw)) and not torch.isnan(lp).any()
    torch.where(torch.isfinite(lp), lp, 0.0).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
