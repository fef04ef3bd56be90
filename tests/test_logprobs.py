"""rf.logprobs against float64, through both impls (Triton runs under the interpreter on CPU)."""

import importlib

import pytest
import torch
from conftest import DEVICE, IMPLS, SEEDS, random_cases
from hypothesis import example, given
from hypothesis import strategies as st
from reference import assert_no_worse, logprobs_f64, logprobs_plain_same_dtype

import rlhf_fast as rf

LOW_PRECISION = [torch.bfloat16, torch.float16]
ALL_DTYPES = [torch.float32] + LOW_PRECISION


def check_logprobs(logits, labels, impl, *, temperature=1.0, ignore_index=-100, grads=("logp", "entropy")):
    """Outputs and the gradient of ``sum(g1 * logp + g2 * entropy)`` against float64.

    The bar is plain PyTorch in the input's dtype (for float32: the usual log_softmax, which is
    accurate): our error must be no worse than its error plus a small margin. For float32 inputs the
    result must also match float64 tightly.
    """
    x = logits.detach().clone().requires_grad_(True)
    logp, ent = rf.logprobs(x, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=True, impl=impl)
    assert logp.dtype == ent.dtype == torch.float32
    assert logp.shape == ent.shape == labels.shape

    g_logp = torch.randn(labels.shape, device=x.device) if "logp" in grads else None
    g_ent = torch.randn(labels.shape, device=x.device) if "entropy" in grads else None
    loss = sum((out * g).sum() for out, g in ((logp, g_logp), (ent, g_ent)) if g is not None)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape

    ref_logp, ref_ent, ref_grad = logprobs_f64(logits, labels, temperature=temperature, ignore_index=ignore_index)
    plain_logp, plain_ent, plain_grad = logprobs_plain_same_dtype(
        logits, labels, temperature=temperature, ignore_index=ignore_index
    )
    ref_g = ref_grad(g_logp, g_ent)
    # x / T rounds (T != 1) by up to an ulp of the largest |x / T|; an error that size is the input's
    finite_x = logits.float()[torch.isfinite(logits)]
    z_max = finite_x.abs().max().item() / temperature if finite_x.numel() else 0.0
    z_rounding = 0.0 if temperature == 1.0 else 2 * torch.finfo(torch.float32).eps * z_max
    pairs = {
        "logp": (logp, plain_logp, ref_logp),
        "entropy": (ent, plain_ent, ref_ent),
        "grad": (grad, plain_grad(g_logp, g_ent), ref_g),
    }
    for name, (ours, plain, ref) in pairs.items():
        finite = torch.isfinite(ref)
        # -inf / NaN positions must agree exactly (e.g. a label on a masked vocabulary entry)
        assert torch.equal(torch.isfinite(ours), finite), name
        assert torch.equal(ours[~finite].double(), ref[~finite]) or torch.isnan(ref[~finite]).all(), name
        scale = assert_no_worse(name, ours[finite], plain[finite], ref[finite], input_rounding=z_rounding)
        ours, ref = ours[finite], ref[finite]
        if logits.dtype == torch.float32:
            torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5 * scale, msg=name)
    return logp, ent, grad


def _labels(shape, V, device, ignore_frac=0.0, ignore_index=-100):
    labels = torch.randint(0, V, shape, device=device)
    if ignore_frac:
        labels[torch.rand(shape, device=device) < ignore_frac] = ignore_index
    return labels


# ----------------------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(3, 47, 123), (5, 2100), (1, 1, 1), (2, 3, 2, 17), (4097,)])
def test_shapes_dtypes(impl, dtype, shape, device):
    logits = (torch.randn(shape, device=device) * 4).to(dtype)
    labels = _labels(shape[:-1], shape[-1], device, ignore_frac=0.2)
    check_logprobs(logits, labels, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temperature(impl, temperature, dtype, device):
    logits = (torch.randn(4, 9, 301, device=device) * 3).to(dtype)
    check_logprobs(logits, _labels((4, 9), 301, device), impl, temperature=temperature)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grads", [("logp",), ("entropy",)])
def test_gradient_through_one_output(impl, grads, device):
    logits = torch.randn(6, 2500, device=device) * 2
    check_logprobs(logits, _labels((6,), 2500, device, ignore_frac=0.3), impl, grads=grads)


# ------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_all_negative_logits(impl, dtype, device):
    # A max started at 0 instead of -inf returns log-probs > 0 here.
    logits = (torch.randn(5, 7, 333, device=device) - 60.0).to(dtype)
    logp, _, _ = check_logprobs(logits, _labels((5, 7), 333, device), impl, temperature=0.6)
    assert (logp <= 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e4), (torch.bfloat16, 3e4), (torch.float16, 6e4)])
def test_very_large_logits(impl, dtype, offset, device):
    # lse - E[z] cancels at large offsets; exp(z) without a max shift overflows.
    logits = (torch.randn(4, 3, 2049, device=device) * 5 + offset).to(dtype)
    logp, ent, _ = check_logprobs(logits, _labels((4, 3), 2049, device), impl)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_masked_vocab_minus_inf(impl, dtype, device):
    N, V = 12, 1500
    logits = (torch.randn(N, V, device=device) * 3).to(dtype)
    masked = torch.rand(N, V, device=device) < 0.7
    masked[0] = True  # row 0: a single finite entry, a one-hot distribution with zero entropy
    masked[0, 5] = False
    masked[1, 1024:] = True  # a whole trailing block masked
    logits[masked] = -float("inf")
    labels = torch.stack([torch.multinomial((~masked[i]).float(), 1)[0] for i in range(N)])
    labels[2] = -100
    logp, ent, grad = check_logprobs(logits, labels, impl, temperature=0.8)
    assert not torch.isnan(logp).any() and not torch.isnan(ent).any() and not torch.isnan(grad).any()
    assert ent[0].item() == 0.0 and logp[0].item() == 0.0
    assert (grad[masked] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_label_on_masked_entry_is_minus_inf(impl, device):
    logits = torch.randn(3, 100, device=device)
    logits[1, 7] = -float("inf")
    labels = torch.tensor([3, 7, 9], device=device)
    logp = rf.logprobs(logits, labels, impl=impl)
    assert logp[1].item() == -float("inf") and torch.isfinite(logp[[0, 2]]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_propagates(impl, device):
    logits = torch.randn(4, 700, device=device, requires_grad=True)
    with torch.no_grad():
        logits[2, 650] = float("nan")
    logp, ent = rf.logprobs(logits, torch.tensor([1, 2, 3, 4], device=device), return_entropy=True, impl=impl)
    assert torch.isnan(logp[2]) and torch.isnan(ent[2])
    assert torch.isfinite(logp[[0, 1, 3]]).all() and torch.isfinite(ent[[0, 1, 3]]).all()
    (logp.sum() + ent.sum()).backward()
    assert torch.isnan(logits.grad[2]).all() and torch.isfinite(logits.grad[[0, 1, 3]]).all()


# -------------------------------------------------------------------------------- labels and layout


@pytest.mark.parametrize("impl", IMPLS)
def test_ignore_index(impl, device):
    logits = torch.randn(4, 10, 257, device=device)
    labels = _labels((4, 10), 257, device)
    labels[0] = -100
    labels[2, 3:] = -100
    logp, ent, grad = check_logprobs(logits, labels, impl)
    assert (logp[labels == -100] == 0).all()
    # entropy is defined (and differentiable) on ignored rows too
    assert (ent[labels == -100] > 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_ignore_index_inside_vocab(impl, device):
    logits = torch.randn(30, 64, device=device)
    labels = _labels((30,), 64, device)
    logp, _, _ = check_logprobs(logits, labels, impl, ignore_index=5)
    assert (logp[labels == 5] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(impl, dtype, device):
    base = (torch.randn(3, 12, 1030, device=device) * 2).to(dtype)
    labels_full = _labels((3, 12), 1000, device)
    cases = {
        "shifted slice": (base[:, :-1, :1000], labels_full[:, 1:]),  # logits[:, :-1] with a vocab slice
        "transposed rows": (base[:, :, :1000].transpose(0, 1), labels_full.t()),
        "vocab-strided": (base[:, :, ::2][..., :500], labels_full % 500),  # last-dim stride 2
    }
    for name, (logits, labels) in cases.items():
        assert not logits.is_contiguous(), name
        check_logprobs(logits, labels, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_labels(impl, device):
    logits = torch.randn(7, 300, device=device)
    labels = _labels((7,), 300, device).int()
    ref = rf.logprobs(logits, labels.long(), impl=impl)
    torch.testing.assert_close(rf.logprobs(logits, labels, impl=impl), ref, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(impl, dtype, device):
    logits = (torch.randn(2, 5, 3001, device=device) * 2).to(dtype)[:, :-1]  # a strided view, in place too
    labels = _labels((2, 4), 3001, device, ignore_frac=0.25)
    x = logits.detach().clone().requires_grad_(True)
    logp, ent = rf.logprobs(x, labels, return_entropy=True, impl=impl)
    g1, g2 = torch.randn_like(logp), torch.randn_like(ent)
    (expected,) = torch.autograd.grad((logp * g1 + ent * g2).sum(), x)

    buf = logits.detach().clone()
    y = buf.requires_grad_(True)
    logp, ent = rf.logprobs(y, labels, return_entropy=True, impl=impl, inplace_backward=True)
    (grad,) = torch.autograd.grad((logp * g1 + ent * g2).sum(), y)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    assert grad.data_ptr() == buf.data_ptr()  # written over the logits buffer: no new [N, V] tensor
    torch.testing.assert_close(buf.detach(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_no_grad(impl, device):
    logp, ent = rf.logprobs(torch.randn(0, 50, device=device), torch.zeros(0, dtype=torch.long, device=device),
                            return_entropy=True, impl=impl)  # fmt: skip
    assert logp.shape == ent.shape == (0,)
    out = rf.logprobs(torch.randn(2, 0, 9, device=device), torch.zeros(2, 0, dtype=torch.long, device=device), impl=impl)
    assert out.shape == (2, 0)
    with torch.no_grad():
        logp = rf.logprobs(torch.randn(3, 11, device=device, requires_grad=True), torch.ones(3, dtype=torch.long,
                           device=device), impl=impl)  # fmt: skip
    assert not logp.requires_grad


def test_impls_agree(device):
    if len(IMPLS) < 2:
        pytest.skip("Triton is not available here")
    logits = torch.randn(16, 5000, device=device, dtype=torch.bfloat16)
    labels = _labels((16,), 5000, device, ignore_frac=0.2)
    outs = [rf.logprobs(logits, labels, return_entropy=True, impl=i, temperature=1.3) for i in IMPLS]
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- log-probs only (no entropy work)


def _logp_and_grad(logits, labels, g_logp, return_entropy, **kw):
    """``logp`` and the gradient of ``sum(g_logp * logp)`` (with a zero entropy gradient where returned)."""
    x = logits.detach().clone().requires_grad_(True)
    if not return_entropy:
        logp = rf.logprobs(x, labels, **kw)
        return logp, torch.autograd.grad(logp, x, g_logp)[0]
    logp, ent = rf.logprobs(x, labels, return_entropy=True, **kw)
    return logp, torch.autograd.grad((logp, ent), x, (g_logp, torch.zeros_like(ent)))[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.9])
@pytest.mark.parametrize("inplace", [False, True])
def test_logp_only_matches_float64_and_with_entropy(impl, dtype, temperature, inplace, device):
    """return_entropy=False: the float64 logp and logits gradient, and those of return_entropy=True with a
    zero entropy gradient (the path that computes the entropy terms); ignored rows get logp 0 and no gradient."""
    logits = (torch.randn(3, 29, 517, device=device) * 3).to(dtype)
    labels = _labels((3, 29), 517, device, ignore_frac=0.3)
    labels[0, :4] = -100  # ignored rows for certain, whatever the seed
    g_logp = torch.randn(labels.shape, device=device)
    kw = dict(temperature=temperature, impl=impl, inplace_backward=inplace)

    logp, grad = _logp_and_grad(logits, labels, g_logp, False, **kw)
    assert isinstance(logp, torch.Tensor) and logp.dtype == torch.float32 and logp.shape == labels.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    logp_full, grad_full = _logp_and_grad(logits, labels, g_logp, True, **kw)

    ignored = labels == -100
    assert (logp[ignored] == 0).all()
    assert (grad[ignored] == 0).all()  # no entropy term: nothing flows into an ignored row

    ref_logp, _, ref_grad = logprobs_f64(logits, labels, temperature=temperature)
    plain_logp, _, plain_grad = logprobs_plain_same_dtype(logits, labels, temperature=temperature)
    z_max = logits.float().abs().max().item() / temperature
    z_rounding = 0.0 if temperature == 1.0 else 2 * torch.finfo(torch.float32).eps * z_max  # as check_logprobs
    cases = (("logp", logp, logp_full, plain_logp, ref_logp),
             ("grad", grad, grad_full, plain_grad(g_logp, None), ref_grad(g_logp, None)))
    for name, ours, full, plain, ref in cases:
        scale = assert_no_worse(name, ours, plain, ref, input_rounding=z_rounding)
        if dtype == torch.float32:
            torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5 * scale, msg=name)
        # Against the entropy path: float rounding apart (the 1/T folded elsewhere), one ulp of the dtype.
        tol = 1e-6 if ours.dtype == torch.float32 else torch.finfo(ours.dtype).eps
        torch.testing.assert_close(ours.float(), full.float(), rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_logp_only_masked_vocab(impl, device):
    """-inf entries without the entropy path's masking: probability 0, gradient exactly 0, no NaN."""
    logits = torch.randn(6, 1300, device=device) * 3
    masked = torch.rand(6, 1300, device=device) < 0.6
    masked[1, 1024:] = True  # a whole trailing block masked
    logits[masked] = -float("inf")
    labels = torch.stack([torch.multinomial((~masked[i]).float(), 1)[0] for i in range(6)])
    g_logp = torch.randn(6, device=device)
    logp, grad = _logp_and_grad(logits, labels, g_logp, False, temperature=0.8, impl=impl)
    ref_logp, _, ref_grad = logprobs_f64(logits, labels, temperature=0.8)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    assert not torch.isnan(grad).any() and (grad[masked] == 0).all()
    torch.testing.assert_close(grad.double(), ref_grad(g_logp, None), rtol=1e-5, atol=1e-6)


def _spy_entropy_work(monkeypatch, impl):
    """Record, call by call, whether the forward and the backward do the entropy work: for torch, what the
    chunk helpers of rlhf_fast/_softmax_torch.py are asked for; for triton, which ``WITH_ENTROPY``
    specialisation the kernels' heuristic picks at each launch."""
    seen = {"forward": [], "backward": []}
    if impl == "torch":
        # the module (rf.logprobs is the op).
        mod = importlib.import_module("rlhf_fast.logprobs_op")
        stats, grad, logp_grad = mod.softmax_stats_, mod.softmax_grad_, mod.logp_grad_

        def spy_stats(z, labels, with_entropy=True):
            seen["forward"].append(with_entropy)
            return stats(z, labels, with_entropy)

        def spy_grad(*args):
            seen["backward"].append(True)
            return grad(*args)

        def spy_logp_grad(*args):
            seen["backward"].append(False)
            return logp_grad(*args)

        monkeypatch.setattr(mod, "softmax_stats_", spy_stats)
        monkeypatch.setattr(mod, "softmax_grad_", spy_grad)
        monkeypatch.setattr(mod, "logp_grad_", spy_logp_grad)
        return seen
    mod = importlib.import_module("rlhf_fast.kernels.logprobs")
    for key, kernel in (("forward", mod._logprobs_fwd_kernel), ("backward", mod._logprobs_bwd_kernel)):

        def spy_run(*args, _kernel=kernel, _run=kernel.run, _seen=seen[key], **kwargs):
            named = {**dict(zip(_kernel.arg_names, args)), **kwargs}
            _seen.append(_kernel.values["WITH_ENTROPY"](named))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", spy_run)  # triton.heuristics' launch goes through run
    return seen


@pytest.mark.parametrize("impl", IMPLS)
def test_logp_only_skips_the_entropy(impl, monkeypatch, device):
    """No entropy asked for: neither the forward nor the backward does entropy work (rf.sequence_logprobs
    included); asked for, the forward does, and the backward only when a gradient reaches the entropy."""
    logits = torch.randn(2, 13, 300, device=device, requires_grad=True)
    labels = _labels((2, 13), 300, device, ignore_frac=0.2)
    seen = _spy_entropy_work(monkeypatch, impl)

    def run(fn):
        for calls in seen.values():
            calls.clear()
        fn()
        return {k: set(v) for k, v in seen.items()}

    def backward(*outputs):
        sum(o.sum() for o in outputs).backward()

    off, on = {"forward": {False}, "backward": {False}}, {"forward": {True}, "backward": {True}}
    assert run(lambda: backward(rf.logprobs(logits, labels, temperature=0.8, impl=impl))) == off
    assert run(lambda: backward(rf.sequence_logprobs(logits, labels, impl=impl))) == off
    assert run(lambda: backward(*rf.logprobs(logits, labels, return_entropy=True, impl=impl))) == on
    # The entropy returned but unused by the loss: no gradient reaches it, so no entropy terms backward.
    unused = run(lambda: backward(rf.logprobs(logits, labels, return_entropy=True, impl=impl)[0]))
    assert unused == {"forward": {True}, "backward": {False}}


# ----------------------------------------------------------------------------------- unseen cases


@random_cases(max_examples=12)
@given(
    n=st.integers(1, 9),
    V=st.integers(1, 2600),
    dtype=st.sampled_from(ALL_DTYPES),
    temperature=st.floats(0.25, 4.0),
    scale=st.sampled_from([0.1, 1.0, 8.0, 40.0]),
    shift=st.floats(-500, 500),
    ignore_frac=st.sampled_from([0.0, 0.5]),
    seed=SEEDS,
)
# Found by hypothesis in CI: a product by the rounded 1/T biased the entropy at large logit spreads.
@example(n=3, V=113, dtype=torch.float32, temperature=0.625, scale=40.0, shift=403.0, ignore_frac=0.0, seed=59)
def test_random_cases(impl, n, V, dtype, temperature, scale, shift, ignore_frac, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=gen) * scale + shift).to(dtype).to(DEVICE)
    labels = torch.randint(0, V, (n,), generator=gen).to(DEVICE)
    labels[torch.rand(n, generator=gen).to(DEVICE) < ignore_frac] = -100
    check_logprobs(logits, labels, impl, temperature=temperature)


# --------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(logits=torch.randint(0, 5, (3, 8))), "logits"),
        (dict(logits=torch.randn(3, 8, dtype=torch.float64)), "logits"),
        (dict(logits=torch.randn(())), "logits"),
        (dict(logits=torch.randn(3, 0)), "logits"),
        (dict(logits=[[0.0, 1.0]]), "logits"),
        (dict(labels=torch.zeros(3, dtype=torch.float32)), "labels"),
        (dict(labels=torch.zeros(3, dtype=torch.bool)), "labels"),
        (dict(labels=torch.zeros(4, dtype=torch.long)), "labels"),
        (dict(labels=torch.zeros(3, 1, dtype=torch.long)), "labels"),
        (dict(labels=torch.tensor([0, 8, 1])), "labels"),
        (dict(labels=torch.tensor([0, -1, 1])), "labels"),
        (dict(labels=torch.tensor([0, -100, 1]), ignore_index=-1), "labels"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=True), "temperature"),
        (dict(temperature=torch.tensor(1.0)), "temperature"),
        (dict(ignore_index=1.5), "ignore_index"),
        (dict(impl="cuda"), "impl"),
        (dict(impl=None), "impl"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, arg):
    args = dict(logits=torch.randn(3, 8), labels=torch.tensor([0, 7, -100]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        rf.logprobs(args.pop("logits"), args.pop("labels"), **args)


@pytest.mark.cuda
def test_bad_device_mix():
    with pytest.raises(ValueError, match="labels"):
        rf.logprobs(torch.randn(3, 8, device="cuda"), torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------- GPU-only big shapes


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_big_vocab_cuda(impl, dtype):
    logits = (torch.randn(2, 257, 151936, device="cuda") * 3).to(dtype)
    labels = _labels((2, 257), 151936, "cuda", ignore_frac=0.1)
    check_logprobs(logits, labels, impl, temperature=0.9)


@pytest.mark.cuda
def test_int64_offsets_cuda():
    """N * V > 2^31: rows past the int32 range must be right (checked against float64 on those rows)."""
    V = 151936
    N = (2**31) // V + 64
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * N * V * 2 + (1 << 30):
        pytest.skip("not enough GPU memory for an N*V > 2^31 case")
    logits = torch.empty(N, V, device="cuda", dtype=torch.bfloat16).normal_(0, 3).requires_grad_(True)
    labels = torch.randint(0, V, (N,), device="cuda")
    logp, ent = rf.logprobs(logits, labels, return_entropy=True, impl="triton")
    g = torch.randn(N, device="cuda")
    (logp * g + ent).sum().backward()
    tail = slice(N - 40, N)  # offsets beyond 2^31 elements
    ref_logp, ref_ent, ref_grad = logprobs_f64(logits[tail], labels[tail])
    torch.testing.assert_close(logp[tail].double(), ref_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent[tail].double(), ref_ent, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits.grad[tail].double(), ref_grad(g[tail], torch.ones_like(g[tail])),
                               rtol=2e-2, atol=2e-3)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_all_minus_inf_row_is_nan_not_a_distribution(impl, device):
    """A row with no finite entry has no softmax: NaN, as PyTorch's log_softmax gives, in both impls."""
    logits = torch.randn(3, 40, device=device)
    logits[1] = -float("inf")
    logp, ent = rf.logprobs(logits, torch.tensor([0, 1, 2], device=device), return_entropy=True, impl=impl)
    assert torch.isnan(logp[1]) and torch.isnan(ent[1])
    assert torch.isnan(torch.log_softmax(logits[1], -1)).all()
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(ent[[0, 2]]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_of_logits_whose_difference_overflows(impl, device):
    """``z - max`` overflows to -inf for -3e38 beside 3e38: p = 0 there, so entropy 0 and gradient finite.

    The Triton kernel gave NaN (``e^-inf * -inf``) where the torch impl gave 0.
    """
    x = torch.tensor([[3e38, -3e38, 0.0, 1.0]], device=device, requires_grad=True)
    logp, ent = rf.logprobs(x, torch.tensor([2], device=device), return_entropy=True, impl=impl)
    assert ent.item() == 0.0 and logp.item() == torch.tensor(-3e38).item()  # 0 - 3e38 - log(1)
    (logp.sum() + ent.sum()).backward()
    # p = one-hot at entry 0: d logp_2 = [v == 2] - p_v; the entropy's gradient is -p_v (log p_v + H) = 0.
    torch.testing.assert_close(x.grad, torch.tensor([[-1.0, 0.0, 1.0, 0.0]], device=device))


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_twice_raises(impl, device):
    """The first backward overwrites the logits with their gradient: a second one must raise, not read
    the gradient as logits (the Triton impl returned a gradient off by 0.53)."""
    x = torch.randn(3, 7, device=device, requires_grad=True)
    logp = rf.logprobs(x * 1.0, torch.tensor([1, 2, 3], device=device), impl=impl, inplace_backward=True)
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        logp.sum().backward()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32])
def test_small_integer_labels(impl, dtype, device):
    """Any integer label dtype gives the int64 result (the torch impl's gather() raised on int8/int16/uint8;
    a uint8 label 156 must not be taken for ignore_index -100)."""
    x = torch.randn(4, 200, device=device, requires_grad=True)
    labels = torch.tensor([1, 156, 7, 0], device=device)
    if dtype == torch.int8:
        labels[1] = -100  # ignored
    small = labels.to(dtype)
    for fn in (lambda lab: rf.logprobs(x, lab, return_entropy=True, impl=impl),
               lambda lab: (rf.sequence_logprobs(x[None], lab[None], impl=impl),)):  # fmt: skip
        outs, ref = fn(small), fn(labels)
        for o, r in zip(outs, ref):
            assert torch.equal(o, r)
        (g,) = torch.autograd.grad(outs[0].sum(), x)
        (g_ref,) = torch.autograd.grad(ref[0].sum(), x)
        assert torch.equal(g, g_ref)
    if dtype == torch.uint8:
        assert rf.logprobs(x, small, impl=impl)[1] != 0  # label 156 is a token, not ignore_index


def test_meta_tensors():
    """Meta tensors (shapes only) give meta results instead of failing on ``.item()`` in the label check."""
    x = torch.empty(2, 3, 11, device="meta", requires_grad=True)
    labels = torch.empty(2, 3, dtype=torch.long, device="meta")
    logp, ent = rf.logprobs(x, labels, return_entropy=True)
    assert logp.device.type == "meta" and logp.shape == (2, 3) and ent.shape == (2, 3)
    assert rf.sequence_logprobs(x, labels).shape == (2,)
    loss, _ = rf.ppo_loss_from_logits(x, labels, torch.empty(2, 3, device="meta"), torch.empty(2, 3, device="meta"),
                                      torch.empty(2, 3, device="meta"))  # fmt: skip
    assert loss.device.type == "meta" and loss.shape == ()
    adv, ret = rf.gae(torch.empty(2, 3, device="meta"), torch.empty(2, 3, device="meta"),
                      torch.empty(2, 3, device="meta"))  # fmt: skip
    assert adv.shape == ret.shape == (2, 3)
    assert rf.masked_whiten(torch.empty(2, 3, device="meta"), torch.empty(2, 3, device="meta")).shape == (2, 3)
