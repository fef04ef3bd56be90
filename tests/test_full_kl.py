"""rf.full_kl against float64, through both impls."""

import pytest
import torch
from conftest import DEVICE, FLOAT_DTYPES, IMPLS, SEEDS, random_cases
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_no_worse

import rlhf_fast as rf
from rlhf_fast.reference import full_kl_reference


def kl_reference(logits, ref_logits, temperature=1.0):
    """``(kl, grad_fn)`` by log_softmax in the dtype of ``logits`` (float64 for the ground truth)."""
    x = logits.detach().clone().requires_grad_(True)
    kl = full_kl_reference(x, ref_logits, temperature=temperature, dtype=x.dtype)

    def grad(g):
        return torch.autograd.grad((kl * g.to(kl.dtype)).sum(), x, retain_graph=True)[0]

    return kl.detach(), grad


def check_full_kl(logits, ref_logits, impl, temperature=1.0):
    x = logits.detach().clone().requires_grad_(True)
    kl = rf.full_kl(x, ref_logits, temperature=temperature, impl=impl)
    assert kl.dtype == torch.float32 and kl.shape == logits.shape[:-1]
    g = torch.randn_like(kl)
    (grad,) = torch.autograd.grad((kl * g).sum(), x)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    ref_kl, ref_grad = kl_reference(logits.double(), ref_logits.double(), temperature)
    plain_kl, plain_grad = kl_reference(logits, ref_logits, temperature)
    assert_no_worse("kl", kl, plain_kl, ref_kl)
    # dKL/dx_v = p_v (log p_v - log q_v - KL) g / T carries the float32 KL's own rounding into every element:
    # a few ulps of |KL| (4e-6 per ulp at 33 nats), which plain PyTorch's float32 KL has as well. Which of the
    # two KLs lands a couple of ulps closer to float64 is chance, so allow 4 ulps of |KL| through p g / T.
    p_max = torch.softmax(logits.double() / temperature, -1).amax(-1)
    kl_scale = (ref_kl.abs() * p_max * g.double().abs()).nan_to_num(0.0, posinf=0.0)  # an infinite KL: no grad bar
    kl_rounding = 4 * torch.finfo(torch.float32).eps * kl_scale.max() / temperature
    assert_no_worse("grad", grad, plain_grad(g), ref_grad(g), abs_margin=kl_rounding.item() if kl.numel() else 0.0)
    if logits.dtype == torch.float32:
        torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-5, atol=1e-5)
    return kl, grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 123), (5, 2500), (1, 1)])
def test_against_float64(impl, dtype, shape, device):
    logits = (torch.randn(shape, device=device) * 3).to(dtype)
    ref = (logits.float() + torch.randn(shape, device=device)).to(dtype)
    check_full_kl(logits, ref, impl, temperature=0.8)


@pytest.mark.parametrize("impl", IMPLS)
def test_identical_distributions_have_zero_kl(impl, device):
    logits = torch.randn(4, 9, 333, device=device) * 5
    kl, grad = check_full_kl(logits, logits + 7.5, impl)  # a shift leaves the softmax unchanged
    assert kl.abs().max() < 1e-5 and grad.abs().max() < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_vocab_and_large_logits(impl, device):
    logits = torch.randn(6, 1500, device=device) * 4 + 2e3
    ref = torch.randn(6, 1500, device=device) * 4 - 50
    logits[0, :1000] = -float("inf")  # masked in the policy: adds nothing
    logits[1, 10:20] = ref[1, 10:20] = -float("inf")  # masked in both
    # T = 1: at logits near 2e3, x / T itself rounds by ~6e-5 in float32, and which of two equally good
    # roundings (x / T or x * (1 / T)) lands closer to float64 is a coin toss, not a property of the kernel.
    kl, grad = check_full_kl(logits, ref, impl, temperature=1.0)
    assert torch.isfinite(kl).all() and (kl >= 0).all() and not torch.isnan(grad).any()
    assert (grad[0, :1000] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_support_mismatch_is_inf(impl, device):
    logits, ref = torch.randn(2, 50, device=device), torch.randn(2, 50, device=device)
    ref[1, 3] = -float("inf")  # q = 0 where p > 0
    kl = rf.full_kl(logits, ref, impl=impl)
    assert torch.isfinite(kl[0]) and kl[1].item() == float("inf")


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_and_mixed_dtypes(impl, device):
    base = torch.randn(3, 10, 520, device=device)
    logits = base[:, :-1, :500]
    ref = torch.randn(3, 9, 500, device=device).to(torch.bfloat16).transpose(0, 1).transpose(0, 1)
    check_full_kl(logits, ref.float(), impl)
    kl = rf.full_kl(logits, ref, impl=impl)  # bf16 reference with float32 logits
    torch.testing.assert_close(kl, rf.full_kl(logits, ref.float(), impl=impl), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_gradient_to_reference(impl, device):
    logits = torch.randn(4, 30, device=device, requires_grad=True)
    ref = torch.randn(4, 30, device=device, requires_grad=True)
    rf.full_kl(logits, ref, impl=impl).sum().backward()
    assert logits.grad is not None and ref.grad is None


@random_cases(max_examples=10)
@given(
    n=st.integers(1, 8),
    V=st.integers(1, 2600),
    dtype=FLOAT_DTYPES,
    temperature=st.floats(0.3, 3.0),
    spread=st.sampled_from([0.01, 1.0, 10.0]),
    seed=SEEDS,
)
def test_random_cases(impl, n, V, dtype, temperature, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=gen) * 3).to(dtype).to(DEVICE)
    ref = (logits.float().cpu() + spread * torch.randn(n, V, generator=gen)).to(dtype).to(DEVICE)
    check_full_kl(logits, ref, impl, temperature=temperature)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(logits=torch.randn(3, 8, dtype=torch.float64)), "logits"),
        (dict(ref_logits=torch.randn(3, 9)), "ref_logits"),
        (dict(ref_logits=torch.randint(0, 3, (3, 8))), "ref_logits"),
        (dict(logits=torch.randn(3, 0), ref_logits=torch.randn(3, 0)), "logits"),
        (dict(temperature=-0.5), "temperature"),
        (dict(impl="gpu"), "impl"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, arg):
    args = dict(logits=torch.randn(3, 8), ref_logits=torch.randn(3, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        rf.full_kl(args.pop("logits"), args.pop("ref_logits"), **args)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_big_vocab_cuda(impl):
    logits = (torch.randn(2, 129, 151936, device="cuda") * 3).to(torch.bfloat16)
    ref = (logits.float() + torch.randn_like(logits, dtype=torch.float32)).to(torch.bfloat16)
    check_full_kl(logits, ref, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_logit_gap_that_overflows(impl, device):
    """-3e38 beside 3e38: ``z - max`` overflows to -inf for a finite logit, p = 0 there and adds nothing.

    The Triton kernels gave NaN (``0 * -inf``) for the KL and every gradient entry; the torch impl gives 0.
    """
    x = torch.tensor([[3e38, -3e38, 0.0, 1.0]], device=device, requires_grad=True)
    ref = torch.tensor([[3e38, -3e38, 0.0, 2.0]], device=device)
    kl = rf.full_kl(x, ref, impl=impl)
    kl.sum().backward()
    assert kl.item() == 0.0  # both are one-hot at entry 0
    assert torch.equal(x.grad, torch.zeros_like(x))
