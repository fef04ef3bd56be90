"""rf.linear_logprobs against float64: outputs and the gradients of hidden, weight and bias."""

import importlib

import pytest
import torch
from conftest import DEVICE, FLOAT_DTYPES, IMPLS, SEEDS, random_cases
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_no_worse

import rlhf_fast as rf
from rlhf_fast.reference import logprobs_reference


def _unfused(hidden, weight, bias, labels, *, temperature, ignore_index, f64):
    """The unfused path: logits = F.linear(...) (in float64, or in the input dtype), then log_softmax."""
    leaves = [t.detach().double() if f64 else t.detach().clone() for t in (hidden, weight, bias) if t is not None]
    leaves = [t.requires_grad_(True) for t in leaves]
    h, w = leaves[0], leaves[1]
    b = leaves[2] if bias is not None else None
    logits = torch.nn.functional.linear(h, w, b)
    logp, ent = logprobs_reference(logits, labels, temperature=temperature, ignore_index=ignore_index)

    def grads(g_logp, g_ent):
        loss = (logp * g_logp.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()
        return torch.autograd.grad(loss, leaves, retain_graph=True)

    return logp.detach(), ent.detach(), grads


def check_linear(hidden, weight, bias, labels, impl, *, temperature=1.0, ignore_index=-100):
    """Error against float64 no worse than the unfused PyTorch path in the input dtype, plus a margin."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias) if t is not None]
    b = leaves[2] if bias is not None else None
    logp, ent = rf.linear_logprobs(leaves[0], leaves[1], labels, bias=b, temperature=temperature,
                                   ignore_index=ignore_index, return_entropy=True, impl=impl)  # fmt: skip
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == labels.shape
    g_logp, g_ent = torch.randn_like(logp), torch.randn_like(ent)
    ours_grads = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), leaves)
    for g, t in zip(ours_grads, leaves):
        assert g.dtype == t.dtype and g.shape == t.shape

    kw = dict(temperature=temperature, ignore_index=ignore_index)
    ref_logp, ref_ent, ref_grads = _unfused(hidden, weight, bias, labels, f64=True, **kw)
    plain_logp, plain_ent, plain_grads = _unfused(hidden, weight, bias, labels, f64=False, **kw)
    names = ["logp", "entropy", "d_hidden", "d_weight", "d_bias"]
    ours = [logp, ent, *ours_grads]
    plain = [plain_logp, plain_ent, *plain_grads(g_logp, g_ent)]
    refs = [ref_logp, ref_ent, *ref_grads(g_logp, g_ent)]
    for name, o, p, r in zip(names, ours, plain, refs):
        scale = assert_no_worse(name, o, p, r, rel_margin=5e-6)
        if hidden.dtype == torch.float32:
            torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=2e-5 * scale, msg=name)
    return logp, ent


def _case(shape, H, V, dtype, device, *, bias=True, ignore_frac=0.2, scale=1.0):
    hidden = (torch.randn(*shape, H, device=device) * scale).to(dtype)
    weight = (torch.randn(V, H, device=device) / H**0.5 * 2).to(dtype)
    b = (torch.randn(V, device=device) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_frac] = -100
    return hidden, weight, b, labels


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,H,V", [((3, 47), 19, 1003), ((129,), 64, 257), ((1,), 1, 1)])
def test_against_float64(impl, dtype, bias, shape, H, V, device):
    hidden, weight, b, labels = _case(shape, H, V, dtype, device, bias=bias)
    check_linear(hidden, weight, b, labels, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_temperature(impl, temperature, device):
    hidden, weight, b, labels = _case((2, 33), 24, 515, torch.float32, device)
    check_linear(hidden, weight, b, labels, impl, temperature=temperature)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_negative_logits(impl, dtype, device):
    hidden, weight, _, labels = _case((40,), 16, 700, dtype, device)
    b = torch.full((700,), -80.0, device=device, dtype=dtype)  # every logit far below 0
    logp, _ = check_linear(hidden, weight, b, labels, impl, temperature=0.7)
    assert (logp <= 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits(impl, device):
    hidden, weight, _, labels = _case((25,), 32, 900, torch.float32, device, scale=30.0)
    check_linear(hidden, weight, None, labels, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_and_custom_index(impl, device):
    hidden, weight, b, labels = _case((5, 11), 8, 300, torch.float32, device, ignore_frac=0.5)
    labels[labels == -100] = 3
    logp, ent = check_linear(hidden, weight, b, labels, impl, ignore_index=3)
    assert (logp[labels == 3] == 0).all() and (ent > 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_logprobs_on_built_logits(impl, device):
    hidden, weight, b, labels = _case((4, 9), 40, 333, torch.float32, device)
    ours = rf.linear_logprobs(hidden, weight, labels, bias=b, return_entropy=True, impl=impl, temperature=0.9)
    ref = rf.logprobs(hidden @ weight.T + b, labels, return_entropy=True, impl=impl, temperature=0.9)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_hidden(impl, device):
    hidden, weight, b, labels = _case((6, 20), 30, 401, torch.float32, device)
    check_linear(hidden[:, ::2], weight, b, labels[:, ::2], impl)
    check_linear(hidden.transpose(0, 1), weight, b, labels.t(), impl)


@random_cases(max_examples=8)
@given(
    n=st.integers(1, 70),
    H=st.integers(1, 70),
    V=st.integers(1, 1100),
    dtype=FLOAT_DTYPES,
    bias=st.booleans(),
    temperature=st.floats(0.3, 3.0),
    seed=SEEDS,
)
def test_random_cases(impl, n, H, V, dtype, bias, temperature, seed):
    torch.manual_seed(seed)
    hidden, weight, b, labels = _case((n,), H, V, dtype, DEVICE, bias=bias)
    check_linear(hidden, weight, b, labels, impl, temperature=temperature)


# ----------------------------------------------------------------------- log-probs only (no entropy work)


def _leaves(hidden, weight, bias):
    return [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias) if t is not None]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.9])
def test_logp_only_matches_float64_and_with_entropy(impl, dtype, bias, temperature, device):
    """return_entropy=False: the same logp and gradients as float64, and as return_entropy=True with a zero
    entropy gradient (the path that computes the entropy terms); ignored rows get logp 0 and no gradient."""
    hidden, weight, b, labels = _case((3, 29), 24, 517, dtype, device, bias=bias, ignore_frac=0.3)
    labels[0, :4] = -100  # ignored rows for certain, whatever the seed
    kw = dict(temperature=temperature, ignore_index=-100, impl=impl)

    lite = _leaves(hidden, weight, b)
    logp = rf.linear_logprobs(lite[0], lite[1], labels, bias=lite[2] if bias else None, **kw)
    assert isinstance(logp, torch.Tensor) and logp.dtype == torch.float32 and logp.shape == labels.shape
    g_logp = torch.randn_like(logp)
    lite_grads = torch.autograd.grad((logp * g_logp).sum(), lite)

    full = _leaves(hidden, weight, b)
    logp_full, ent = rf.linear_logprobs(full[0], full[1], labels, bias=full[2] if bias else None,
                                        return_entropy=True, **kw)  # fmt: skip
    full_grads = torch.autograd.grad((logp_full, ent), full, (g_logp, torch.zeros_like(ent)))

    ignored = labels == -100
    assert (logp[ignored] == 0).all()
    assert (lite_grads[0][ignored] == 0).all()  # no entropy term: nothing flows into an ignored row

    ref_kw = dict(temperature=temperature, ignore_index=-100)
    ref_logp, _, ref_grads = _unfused(hidden, weight, b, labels, f64=True, **ref_kw)
    plain_logp, _, plain_grads = _unfused(hidden, weight, b, labels, f64=False, **ref_kw)
    zeros = torch.zeros_like(g_logp)
    names = ["logp", "d_hidden", "d_weight", "d_bias"]
    for name, o, f, p, r in zip(names, [logp, *lite_grads], [logp_full, *full_grads],
                                [plain_logp, *plain_grads(g_logp, zeros)], [ref_logp, *ref_grads(g_logp, zeros)]):
        assert o.dtype == f.dtype and o.shape == f.shape, name
        scale = assert_no_worse(name, o, p, r, rel_margin=5e-6)
        if dtype == torch.float32:
            torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=2e-5 * scale, msg=name)
        # Against the entropy path: float rounding apart (the 1/T folded elsewhere), one ulp of the dtype.
        tol = 1e-6 if o.dtype == torch.float32 else torch.finfo(o.dtype).eps
        torch.testing.assert_close(o.float(), f.float(), rtol=tol, atol=tol * scale, msg=name)


def _spy(monkeypatch, impl):
    """Record what the implementation's forward returns as entropy and what its backward gets as entropy."""
    # the module (rf.linear_logprobs is the op). Both
    # pairs are looked up at each call (_backend), so replacing the module attribute reaches them.
    if impl == "triton":
        mod = importlib.import_module("rlhf_fast.kernels.linear_logprobs")
        names = ("linear_logprobs_forward", "linear_logprobs_backward")
    else:
        mod = importlib.import_module("rlhf_fast.linear_logprobs_op")
        names = ("_torch_forward", "_torch_backward")
    seen = {}
    forward, backward = (getattr(mod, n) for n in names)

    def spy_forward(*args):
        out = forward(*args)
        seen["forward_entropy"] = out[1]
        return out

    def spy_backward(hidden, weight, bias, labels, row_max, log_norm, entropy, g_logp, g_entropy, *rest):
        seen["backward_entropy"], seen["backward_g_entropy"] = entropy, g_entropy
        return backward(hidden, weight, bias, labels, row_max, log_norm, entropy, g_logp, g_entropy, *rest)

    monkeypatch.setattr(mod, names[0], spy_forward)
    monkeypatch.setattr(mod, names[1], spy_backward)
    return seen


@pytest.mark.parametrize("impl", IMPLS)
def test_logp_only_skips_the_entropy(impl, monkeypatch, device):
    """No entropy asked for: the forward computes none and the backward gets none (the log-probs-only
    specialisation); asked for, it is computed, and its gradient terms run only when a gradient reaches it."""
    hidden, weight, b, labels = _case((2, 13), 16, 300, torch.float32, device)
    seen = _spy(monkeypatch, impl)
    h = hidden.requires_grad_(True)

    logp = rf.linear_logprobs(h, weight, labels, bias=b, temperature=0.8, impl=impl)
    logp.sum().backward()
    assert seen["forward_entropy"] is None
    assert seen["backward_entropy"] is None and seen["backward_g_entropy"] is None

    logp, ent = rf.linear_logprobs(h, weight, labels, bias=b, temperature=0.8, impl=impl, return_entropy=True)
    assert seen["forward_entropy"] is not None
    (logp.sum() + ent.sum()).backward()
    assert seen["backward_entropy"] is not None and seen["backward_g_entropy"] is not None

    logp, ent = rf.linear_logprobs(h, weight, labels, bias=b, temperature=0.8, impl=impl, return_entropy=True)
    logp.sum().backward()  # the entropy is returned but unused: no gradient reaches it
    assert seen["backward_entropy"] is None


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(hidden=torch.randn(4, 8, dtype=torch.float64)), "hidden"),
        (dict(weight=torch.randn(10, 7)), "weight"),
        (dict(weight=torch.randn(10)), "weight"),
        (dict(weight=torch.randn(10, 8, dtype=torch.bfloat16)), "weight"),
        (dict(weight=torch.randn(0, 8)), "weight"),
        (dict(bias=torch.randn(9)), "bias"),
        (dict(bias=torch.randn(10, dtype=torch.float16)), "bias"),
        (dict(labels=torch.tensor([0, 1, 2])), "labels"),
        (dict(labels=torch.tensor([0, 1, 2, 10])), "labels"),
        (dict(labels=torch.tensor([0.0, 1, 2, 3])), "labels"),
        (dict(temperature=0), "temperature"),
        (dict(ignore_index="x"), "ignore_index"),
        (dict(impl="fast"), "impl"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, arg):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), labels=torch.tensor([0, 9, -100, 3]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        rf.linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_real_shape_cuda(impl):
    """H = 4096, V = 151936 in bf16, against float64 on a few hundred rows."""
    hidden, weight, b, labels = _case((300,), 4096, 151936, torch.bfloat16, "cuda", bias=False)
    check_linear(hidden, weight, b, labels, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_rows_and_empty_hidden_size(impl, device):
    """N = 0 (Triton: ZeroDivisionError) gives empty outputs and zero weight gradients; H = 0 (a reshape
    error) gives the logits of the bias alone (uniform without one), with empty gradients."""
    w = torch.randn(9, 5, device=device, requires_grad=True)
    h = torch.empty(0, 4, 5, device=device, requires_grad=True)
    logp, ent = rf.linear_logprobs(h, w, torch.empty(0, 4, dtype=torch.long, device=device), return_entropy=True,
                                   impl=impl)  # fmt: skip
    assert logp.shape == ent.shape == (0, 4)
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and h.grad.shape == h.shape

    h0 = torch.empty(3, 0, device=device, requires_grad=True)
    w0 = torch.empty(9, 0, device=device, requires_grad=True)
    b = torch.randn(9, device=device, requires_grad=True)
    labels = torch.tensor([0, 4, -100], device=device)
    for bias in (None, b):
        logp, ent = rf.linear_logprobs(h0, w0, labels, bias=bias, return_entropy=True, impl=impl)
        ref_logp, ref_ent = logprobs_reference((torch.zeros(9, device=device) if bias is None else b.detach())
                                               .expand(3, 9).double(), labels)  # fmt: skip
        torch.testing.assert_close(logp.double(), ref_logp)
        torch.testing.assert_close(ent.double(), ref_ent)
        (logp.sum() + ent.sum()).backward()
        assert h0.grad.shape == (3, 0) and w0.grad.shape == (9, 0)
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_small_integer_labels_and_meta(impl, device):
    """int8/int16/uint8 labels give the int64 result; meta tensors give meta outputs (no ``.item()``)."""
    h, w = torch.randn(3, 4, device=device), torch.randn(200, 4, device=device)
    labels = torch.tensor([5, 156, 0], device=device)
    ref = rf.linear_logprobs(h, w, labels, return_entropy=True, impl=impl)
    for dtype in (torch.int16, torch.uint8, torch.int32):
        for o, r in zip(rf.linear_logprobs(h, w, labels.to(dtype), return_entropy=True, impl=impl), ref):
            assert torch.equal(o, r)
    small = labels[[0, 2]].to(torch.int8)
    assert torch.equal(rf.linear_logprobs(h[[0, 2]], w, small, impl=impl), ref[0][[0, 2]])
    if impl == "torch":
        meta = rf.linear_logprobs(torch.empty(2, 3, 4, device="meta"), torch.empty(200, 4, device="meta"),
                                  torch.empty(2, 3, dtype=torch.long, device="meta"))  # fmt: skip
        assert meta.device.type == "meta" and meta.shape == (2, 3)
