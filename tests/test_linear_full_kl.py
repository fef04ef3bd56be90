"""rf.linear_full_kl against float64 (the KL of the two materialised logits), through both impls."""

import importlib

import pytest
import torch
from conftest import IMPLS
from reference import assert_no_worse

import rlhf_fast as rf
from rlhf_fast.reference import full_kl_reference

lfk = importlib.import_module("rlhf_fast.linear_full_kl_op")  # the module (rf.linear_full_kl is the op)
linear_common = importlib.import_module("rlhf_fast._linear_common")


def _case(shape, H, H_ref, V, dtype, ref_dtype=None, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref_dtype = ref_dtype or dtype
    hidden = torch.randn(*shape, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 2 / H**0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    ref_hidden = torch.randn(*shape, H_ref, generator=g).to(ref_dtype)
    ref_weight = (torch.randn(V, H_ref, generator=g) * 2 / H_ref**0.5).to(ref_dtype)
    ref_b = (torch.randn(V, generator=g) * 0.5).to(ref_dtype) if bias else None
    return hidden, weight, b, ref_hidden, ref_weight, ref_b


def _unfused(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, f64):
    """KL of the materialised logits by log_softmax (float64, or in the input dtype), and its grads."""
    cast = (lambda t: t.detach().double()) if f64 else (lambda t: t.detach().clone())
    leaves = [cast(t).requires_grad_(True) for t in (hidden, weight, bias) if t is not None]
    b = leaves[2] if bias is not None else None
    z = torch.nn.functional.linear(leaves[0], leaves[1], b) / temperature
    zr = torch.nn.functional.linear(cast(ref_hidden).to(z.dtype), cast(ref_weight).to(z.dtype),
                                    None if ref_bias is None else cast(ref_bias).to(z.dtype)) / temperature  # fmt: skip
    kl = full_kl_reference(z, zr, mask_zero_probs=False, dtype=z.dtype)
    return kl.detach(), lambda g: torch.autograd.grad((kl * g.to(kl.dtype)).sum(), leaves, retain_graph=True)


def check(case, impl, temperature=1.0):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = case
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias) if t is not None]
    rh, rw = ref_hidden.clone().requires_grad_(True), ref_weight.clone().requires_grad_(True)
    kl = rf.linear_full_kl(leaves[0], leaves[1], rh, rw, bias=leaves[2] if bias is not None else None,
                           ref_bias=ref_bias, temperature=temperature, impl=impl)  # fmt: skip
    assert kl.dtype == torch.float32 and kl.shape == hidden.shape[:-1]
    g = torch.randn_like(kl)
    grads = torch.autograd.grad((kl * g).sum(), leaves)
    assert rh.grad is None and rw.grad is None
    for gr, t in zip(grads, leaves):
        assert gr.dtype == t.dtype and gr.shape == t.shape
    ref_kl, ref_grads = _unfused(*case, temperature, f64=True)
    plain_kl, plain_grads = _unfused(*case, temperature, f64=False)
    for name, o, p, r in zip(["kl", "d_hidden", "d_weight", "d_bias"], [kl, *grads], [plain_kl, *plain_grads(g)],
                             [ref_kl, *ref_grads(g)]):  # fmt: skip
        scale = assert_no_worse(name, o, p, r, rel_margin=5e-6)
        if hidden.dtype == torch.float32:
            torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=2e-5 * scale, msg=name)
    return kl


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_against_float64(impl, dtype, bias):
    check(_case((3, 11), 24, 16, 517, dtype, bias=bias), impl, temperature=0.9)


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes_and_chunks(impl, monkeypatch):
    """A bf16 reference model beside an fp32 policy; a tiny chunk budget splits the rows into many chunks,
    and no matmul ever builds more than a chunk's rows of logits (never the [N, V] tensor)."""
    case = _case((37,), 16, 8, 300, torch.float32, torch.bfloat16, seed=1)
    shapes = []
    real = linear_common._chunk_logits
    monkeypatch.setattr(linear_common, "_chunk_logits", lambda h, w, b, **k: shapes.append(h.shape[0]) or real(h, w, b, **k))
    with rf.chunk_budget(4 * 300 * lfk._CHUNK_TEMPORARIES * 8 / (1 << 20)):  # 8 rows a chunk
        check(case, impl)
    assert max(shapes) == 8 and len(shapes) == 4 * 5  # 5 chunks: policy and reference, forward and backward


@pytest.mark.parametrize("impl", IMPLS)
def test_same_model_has_zero_kl(impl):
    hidden, weight, bias, *_ = _case((4, 5), 12, 12, 99, torch.float32)
    h = hidden.clone().requires_grad_(True)
    kl = rf.linear_full_kl(h, weight, hidden, weight, bias=bias, ref_bias=bias + 3.0, impl=impl)  # a shift: same softmax
    (grad,) = torch.autograd.grad(kl.sum(), h)
    assert kl.abs().max() < 1e-5 and grad.abs().max() < 1e-5


def test_autocast_bf16_matches_casting_by_hand():
    """Under CPU bf16 autocast both sides' operands go to bf16 (as F.linear's), the KL stays float32."""
    case = _case((6,), 8, 8, 64, torch.float32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = rf.linear_full_kl(case[0], case[1], case[3], case[4], bias=case[2], ref_bias=case[5], impl="torch")
    bf = [t.to(torch.bfloat16) for t in case]
    expected = rf.linear_full_kl(bf[0], bf[1], bf[3], bf[4], bias=bf[2], ref_bias=bf[5], impl="torch")
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, expected)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(weight=torch.randn(9, 4)), "weight"),
        (dict(ref_weight=torch.randn(8, 3)), "ref_weight"),
        (dict(ref_hidden=torch.randn(3, 3)), "ref_hidden"),
        (dict(bias=torch.randn(8)), "bias"),
        (dict(ref_bias=torch.randn(9, dtype=torch.float16)), "ref_bias"),
        (dict(weight=torch.randn(9, 5, dtype=torch.bfloat16)), "weight"),
        (dict(temperature=0.0), "temperature"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, arg):
    args = dict(hidden=torch.randn(2, 5), weight=torch.randn(9, 5), ref_hidden=torch.randn(2, 3),
                ref_weight=torch.randn(9, 3))  # fmt: skip
    args.update(kwargs)
    pos = [args.pop(k) for k in ("hidden", "weight", "ref_hidden", "ref_weight")]
    with pytest.raises(ValueError, match=arg):
        rf.linear_full_kl(*pos, **args)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_real_shape_cuda(impl):
    """H = 4096, V = 151936 in bf16 on 300 rows, against float64 on the materialised logits."""
    case = [t.cuda() if t is not None else None for t in _case((300,), 4096, 2048, 151936, torch.bfloat16, seed=3)]
    check(case, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_vocabulary_in_softmax_parts(impl, monkeypatch):
    """``-inf`` bias entries (a masked vocabulary), with the in-place softmax work in parts of 3 rows of each
    chunk: an entry masked on both sides or on the policy's alone adds nothing (the KL and its gradients
    equal ``rf.full_kl``'s on the materialised logits, finite); one masked on the reference's alone makes the
    KL ``+inf``."""
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = _case((11,), 8, 8, 50, torch.float32, seed=3)
    bias, ref_bias = bias.clone(), ref_bias.clone()
    bias[[3, 7]] = -float("inf")  # 3 masked on both sides, 7 on the policy's alone
    ref_bias[3] = -float("inf")
    monkeypatch.setattr(lfk, "_SOFTMAX_ELEMENTS", 3 * 50)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    with rf.chunk_budget(4 * 50 * lfk._CHUNK_TEMPORARIES * 8 / (1 << 20)):  # 8 rows a chunk: parts 3 + 3 + 2
        kl = rf.linear_full_kl(leaves[0], leaves[1], ref_hidden, ref_weight, bias=leaves[2], ref_bias=ref_bias,
                               impl=impl)  # fmt: skip
    grads = torch.autograd.grad(kl.sum(), leaves)
    plain = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    want = rf.full_kl(torch.nn.functional.linear(*plain), torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias),
                      impl="torch")  # fmt: skip
    want_grads = torch.autograd.grad(want.sum(), plain)
    assert torch.isfinite(kl).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(kl, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    ref_bias[9] = -float("inf")  # masked on the reference's side alone
    kl = rf.linear_full_kl(hidden, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias, impl=impl)
    assert torch.isposinf(kl).all()
