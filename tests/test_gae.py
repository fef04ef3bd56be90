"""rf.gae against a float64 Python reverse loop, through both impls (Triton runs under the interpreter on CPU)."""

import pytest
import torch
from conftest import DEVICE, IMPLS

import rlhf_fast as rf
from rlhf_fast.gae_op import discounted_reverse_cumsum
from rlhf_fast.reference import gae_reference


def gae_f64(rewards, values, mask, gamma, lam):
    """The recursion in float64, skipping positions with mask == 0 (rlhf_fast.reference.gae_reference)."""
    r, v = rewards.detach().double().cpu(), values.detach().double().cpu()
    return gae_reference(r, v, None if mask is None else mask.cpu(), gamma=gamma, lam=lam)


def check_gae(rewards, values, mask, impl, gamma=1.0, lam=0.95, tol=2e-6):
    adv, ret = rf.gae(rewards, values, mask, gamma=gamma, lam=lam, impl=impl)
    assert adv.dtype == ret.dtype == torch.float32
    assert adv.shape == ret.shape == rewards.shape
    assert not adv.requires_grad and not ret.requires_grad
    ref_adv, ref_ret = gae_f64(rewards, values, mask, gamma, lam)
    for name, ours, ref in (("advantages", adv, ref_adv), ("returns", ret, ref_ret)):
        scale = 1.0 + ref.abs().max().item()
        torch.testing.assert_close(ours.double().cpu(), ref, rtol=0, atol=tol * scale, msg=name)
    if mask is not None:
        off = mask == 0
        assert (adv[off] == 0).all() and (ret[off] == 0).all()
    return adv, ret


def assert_identical(got, want):
    """Two ``(advantages, returns)`` pairs equal to the bit."""
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _right_padded(B, T, device, min_len=1):
    lengths = torch.randint(min_len, T + 1, (B,), device=device)
    return torch.arange(T, device=device)[None, :] < lengths[:, None]


def _inputs(B, T, device, dtype=torch.float32):
    rewards = torch.randn(B, T, device=device) * 0.1
    rewards[:, -1] += torch.randn(B, device=device)
    return rewards.to(dtype), torch.randn(B, T, device=device).to(dtype)


# ------------------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 70), (2, 301), (2, 1030)])
def test_no_mask(impl, shape, device):
    rewards, values = _inputs(*shape, device)
    check_gae(rewards, values, None, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.5, 0.0), (0.0, 0.7), (0.9, 1.0)])
def test_gamma_lam(impl, gamma, lam, device):
    rewards, values = _inputs(5, 37, device)
    check_gae(rewards, values, _right_padded(5, 37, device), impl, gamma=gamma, lam=lam)


@pytest.mark.parametrize("impl", IMPLS)
def test_right_padded(impl, device):
    rewards, values = _inputs(6, 129, device)
    mask = _right_padded(6, 129, device)
    mask[2] = True  # one full row
    check_gae(rewards, values, mask, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_left_padding_prompt_tokens_masked(impl, device):
    """Prompt (and pad) tokens before the response are masked: they change nothing for the response."""
    B, T = 5, 60
    rewards, values = _inputs(B, T, device)
    starts = torch.randint(0, 30, (B,), device=device)
    ends = starts + torch.randint(1, 30, (B,), device=device)
    t = torch.arange(T, device=device)[None, :]
    mask = (t >= starts[:, None]) & (t < ends[:, None])
    adv, _ = check_gae(rewards, values, mask, impl)
    # the same responses shifted to the front give the same advantages
    for b in range(B):
        s, e = starts[b].item(), ends[b].item()
        alone, _ = rf.gae(rewards[b : b + 1, s:e], values[b : b + 1, s:e], impl=impl)
        torch.testing.assert_close(adv[b, s:e], alone[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [50, 1100])
def test_holes_are_skipped(impl, T, device):
    """A masked hole inside a response (a tool output) joins its neighbours, as if they were adjacent.

    T = 1100 puts holes across the boundary between two scan tiles of the Triton kernel.
    """
    B = 3
    rewards, values = _inputs(B, T, device)
    mask = _right_padded(B, T, device, min_len=T // 2)
    mask &= torch.rand(B, T, device=device) > 0.3
    mask[0, 1000 % T : 1030 % T] = False  # a long hole (across the tile boundary at 1024 when T = 1100)
    adv, ret = check_gae(rewards, values, mask, impl, gamma=0.99, lam=0.9)
    for b in range(B):
        on = mask[b]
        packed_adv, packed_ret = rf.gae(rewards[b, on][None], values[b, on][None], gamma=0.99, lam=0.9, impl=impl)
        torch.testing.assert_close(adv[b, on], packed_adv[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret[b, on], packed_ret[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_rewards_on_masked_positions_are_dropped(impl, device):
    rewards, values = _inputs(2, 20, device)
    mask = torch.ones(2, 20, dtype=torch.bool, device=device)
    mask[:, 5:8] = False
    moved = rewards.clone()
    moved[:, 5:8] = 100.0
    assert_identical(rf.gae(rewards, values, mask, impl=impl), rf.gae(moved, values, mask, impl=impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_rows_and_mask_dtypes(impl, device):
    rewards, values = _inputs(4, 33, device)
    mask = _right_padded(4, 33, device)
    mask[1] = False  # no response token at all
    adv, ret = check_gae(rewards, values, mask, impl)
    assert (adv[1] == 0).all() and (ret[1] == 0).all()
    for m in (mask.float(), mask.long(), mask.to(torch.int32), mask.to(torch.uint8)):
        assert_identical(rf.gae(rewards, values, m, impl=impl), (adv, ret))


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked_and_empty(impl, device):
    rewards, values = _inputs(3, 9, device)
    adv, ret = rf.gae(rewards, values, torch.zeros(3, 9, device=device), impl=impl)
    assert (adv == 0).all() and (ret == 0).all()
    for shape in ((0, 7), (3, 0)):
        adv, ret = rf.gae(torch.zeros(shape, device=device), torch.zeros(shape, device=device), impl=impl)
        assert adv.shape == ret.shape == shape


# ---------------------------------------------------------------------------------- dtypes and layout


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(impl, dtype, device):
    """The inputs are rounded to bf16/fp16; the arithmetic is float32, so it matches float64 on them."""
    rewards, values = _inputs(4, 77, device, dtype)
    check_gae(rewards, values, _right_padded(4, 77, device), impl, gamma=0.99)


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes(impl, device):
    rewards, values = _inputs(3, 40, device)
    check_gae(rewards, values.to(torch.bfloat16), _right_padded(3, 40, device), impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous(impl, device):
    base_r, base_v = _inputs(6, 50, device)
    mask = _right_padded(6, 50, device)
    cases = {
        "column slice": (base_r[:, 1:45], base_v[:, :44], mask[:, 3:47]),  # row stride 50, unit last stride
        "transposed": (base_r[:, :6].t(), base_v[:, :6].t(), mask[:, :6].t()),  # last stride 50
        "every other row": (base_r[::2], base_v[::2], mask[::2]),
    }
    for name, (r, v, m) in cases.items():
        assert not r.is_contiguous(), name
        check_gae(r, v, m, impl, gamma=0.97)


@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_requiring_grad(impl, device):
    rewards, values = _inputs(2, 10, device)
    values.requires_grad_(True)
    adv, ret = rf.gae(rewards, values, impl=impl)
    assert not adv.requires_grad and not ret.requires_grad


# ------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("impl", IMPLS)
def test_garbage_in_padding_never_leaks(impl, device):
    rewards, values = _inputs(3, 40, device)
    mask = _right_padded(3, 40, device, min_len=5)
    mask[:, 2] = False  # and a hole
    clean = check_gae(rewards, values, mask, impl)
    r, v = rewards.clone(), values.clone()
    r[mask == 0] = float("nan")
    v[mask == 0] = float("inf")
    dirty = rf.gae(r, v, mask, impl=impl)
    assert_identical(clean, dirty)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_propagates(impl, device):
    rewards, values = _inputs(3, 30, device)
    rewards[1, 20] = float("nan")
    adv, ret = rf.gae(rewards, values, impl=impl)
    assert torch.isnan(adv[1, :21]).all() and torch.isnan(ret[1, :21]).all()
    assert torch.isfinite(adv[[0, 2]]).all() and torch.isfinite(ret[[0, 2]]).all()


def test_long_rows_torch_float32_accuracy(device):
    """T = 3000 (powers of gamma * lam underflow, 47 chunks): still float32-accurate against float64."""
    B, T = 3, 3000
    rewards, values = _inputs(B, T, device)
    for gamma, lam in ((1.0, 1.0), (1.0, 0.95), (0.999, 0.99)):
        check_gae(rewards, values, _right_padded(B, T, device, min_len=2500), "torch", gamma=gamma, lam=lam, tol=2e-6)


@pytest.mark.parametrize("L", [1, 15, 16, 17, 64, 1000])
@pytest.mark.parametrize("w", [0.0, 0.5, 0.95, 1.0])
def test_discounted_reverse_cumsum(L, w):
    x = torch.randn(3, L)
    ref = torch.zeros(3, L, dtype=torch.float64)
    acc = torch.zeros(3, dtype=torch.float64)
    for k in reversed(range(L)):
        acc = x[:, k].double() + w * acc
        ref[:, k] = acc
    torch.testing.assert_close(discounted_reverse_cumsum(x, w).double(), ref, rtol=0, atol=2e-6 * (1 + L**0.5))


def test_impls_agree(device):
    if len(IMPLS) < 2:
        pytest.skip("Triton is not available here")
    rewards, values = _inputs(4, 300, device, torch.bfloat16)
    mask = _right_padded(4, 300, device) & (torch.rand(4, 300, device=device) > 0.1)
    outs = [rf.gae(rewards, values, mask, gamma=0.995, lam=0.9, impl=i) for i in IMPLS]
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(rewards=torch.randn(3)), "rewards"),
        (dict(rewards=torch.randn(2, 3, 4)), "rewards"),
        (dict(rewards=torch.randn(3, 4, dtype=torch.float64)), "rewards"),
        (dict(rewards=torch.zeros(3, 4, dtype=torch.long)), "rewards"),
        (dict(rewards=[[0.0] * 4] * 3), "rewards"),
        (dict(values=torch.randn(3, 5)), "values"),
        (dict(values=torch.randn(4, 3)), "values"),
        (dict(values=torch.randn(3, 4, dtype=torch.float64)), "values"),
        (dict(mask=torch.ones(3, 5)), "mask"),
        (dict(mask=torch.ones(3)), "mask"),
        (dict(mask=[[1] * 4] * 3), "mask"),
        (dict(gamma=1.5), "gamma"),
        (dict(gamma=-0.1), "gamma"),
        (dict(gamma=float("nan")), "gamma"),
        (dict(gamma=None), "gamma"),
        (dict(gamma=True), "gamma"),
        (dict(lam=1.01), "lam"),
        (dict(lam=torch.tensor(0.9)), "lam"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, arg):
    args = dict(rewards=torch.randn(3, 4), values=torch.randn(3, 4), mask=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        rf.gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), **args)


@pytest.mark.cuda
def test_bad_device_mix():
    with pytest.raises(ValueError, match="values"):
        rf.gae(torch.randn(3, 4, device="cuda"), torch.randn(3, 4))


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_big_batch_cuda(impl):
    B, T = 64, 4099
    rewards, values = _inputs(B, T, DEVICE, torch.bfloat16)
    mask = _right_padded(B, T, DEVICE) & (torch.rand(B, T, device=DEVICE) > 0.05)
    check_gae(rewards, values, mask, impl, gamma=0.999, lam=0.95)
