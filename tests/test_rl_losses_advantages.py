"""rf.masked_whiten and rf.group_advantages against float64 written out from docs/API.md (Python loops and
``statistics``), sharing no code with the implementation; their bad inputs. (The losses: test_rl_losses.py.)"""

import math
import statistics

import pytest
import torch

import rlhf_fast as rf
from test_rl_losses import _right_padded

# ---------------------------------------------------------------------------------------- whiten


def whiten_f64(x, mask, shift_mean):
    flat, on = x.detach().double().reshape(-1).tolist(), mask.reshape(-1).tolist()
    xs = [v for v, keep in zip(flat, on) if keep]
    mean, var = statistics.fmean(xs), statistics.variance(xs)  # variance(): unbiased (n - 1)
    out = torch.zeros(x.numel(), dtype=torch.float64)
    for i, (v, keep) in enumerate(zip(flat, on)):
        if keep:
            out[i] = (v - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    return out.view(x.shape)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape", [(4, 23), (50,), (2, 3, 5)])
def test_masked_whiten(shift_mean, shape):
    x = torch.randn(shape) * 3 + 2
    mask = torch.rand(shape) > 0.3
    mask.view(-1)[:2] = True
    out = rf.masked_whiten(x, mask, shift_mean=shift_mean)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), whiten_f64(x, mask, shift_mean), rtol=1e-5, atol=1e-5)
    if shift_mean:
        sel = out[mask].double()
        assert abs(sel.mean().item()) < 1e-5 and abs(sel.var(unbiased=True).item() - 1) < 1e-4


def test_masked_whiten_gradient_padding_and_dtype():
    x = (torch.randn(3, 10) * 2).to(torch.bfloat16)
    mask = _right_padded(3, 10, min_len=2)
    x_dirty = x.clone()
    x_dirty[~mask] = float("nan")
    a = x.clone().requires_grad_(True)
    b = x_dirty.clone().requires_grad_(True)
    out_a, out_b = rf.masked_whiten(a, mask), rf.masked_whiten(b, mask)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    g = torch.randn(3, 10)
    (ga,) = torch.autograd.grad((out_a * g).sum(), a)
    (gb,) = torch.autograd.grad((out_b * g).sum(), b)
    assert ga.dtype == torch.bfloat16
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    # against float64 autograd of the definition
    xd = x.double().requires_grad_(True)
    sel = xd[mask]
    ref = (xd - sel.mean()) / torch.sqrt(sel.var(unbiased=True) + 1e-8)
    (gr,) = torch.autograd.grad((torch.where(mask, ref, 0.0) * g.double()).sum(), xd)
    torch.testing.assert_close(ga.double(), gr, rtol=1e-2, atol=1e-2)
    assert (ga[~mask] == 0).all()


@pytest.mark.parametrize("n", [0, 1])
def test_masked_whiten_needs_two_entries(n):
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask.view(-1)[:n] = True
    with pytest.raises(ValueError, match="mask"):
        rf.masked_whiten(torch.randn(3, 4), mask)


# ------------------------------------------------------------------------------------ group adv


@pytest.mark.parametrize("group_size", [2, 4, 7])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages(group_size, normalize_std):
    scores = torch.randn(group_size * 5)
    scores[:group_size] = 1.0  # a group of equal scores: advantages 0
    out = rf.group_advantages(scores, group_size, normalize_std=normalize_std)
    assert out.dtype == torch.float32 and out.shape == scores.shape
    ref = torch.zeros(scores.numel(), dtype=torch.float64)
    for start in range(0, scores.numel(), group_size):
        group = [s.item() for s in scores[start : start + group_size]]
        mean, std = statistics.fmean(group), statistics.stdev(group)  # stdev(): unbiased (n - 1)
        for i, s in enumerate(group):
            ref[start + i] = (s - mean) / (std + 1e-6) if normalize_std else s - mean
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert (out[:group_size] == 0).all()


def test_group_advantages_dtype_eps_and_gradient():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0], dtype=torch.bfloat16, requires_grad=True)
    out = rf.group_advantages(scores, 3, eps=0.5)
    # group 0: mean 1/3, unbiased std sqrt(1/3)
    assert out[0].item() == pytest.approx((2 / 3) / (math.sqrt(1 / 3) + 0.5), rel=1e-6)
    out.sum().backward()
    assert scores.grad.dtype == torch.bfloat16
    assert (rf.group_advantages(torch.randn(5), 1, normalize_std=False) == 0).all()


@pytest.mark.parametrize("group_size", [2, 3, 6])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_leave_one_out(group_size, normalize_std):
    """baseline="loo" (RLOO): each score minus the mean of the *other* scores of its group, written out
    in float64 (and over the same std as baseline="mean" when normalising)."""
    scores = torch.randn(group_size * 4, dtype=torch.float64).float()
    out = rf.group_advantages(scores, group_size, normalize_std=normalize_std, baseline="loo")
    ref = torch.zeros(scores.numel(), dtype=torch.float64)
    for start in range(0, scores.numel(), group_size):
        group = [s.item() for s in scores[start : start + group_size]]
        std = statistics.stdev(group)
        for i, s in enumerate(group):
            others = group[:i] + group[i + 1 :]
            a = s - sum(others) / len(others)
            ref[start + i] = a / (std + 1e-6) if normalize_std else a
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # a score's gradient: d A_i / d s_i = 1 and d A_i / d s_j = -1/(G-1) without the std
    if not normalize_std:
        x = scores[:group_size].clone().requires_grad_(True)
        (jac,) = torch.autograd.grad(rf.group_advantages(x, group_size, normalize_std=False, baseline="loo")[0], x)
        expected = torch.full((group_size,), -1.0 / (group_size - 1))
        expected[0] = 1.0
        torch.testing.assert_close(jac, expected)


def _group_advantages64(s, G, normalize_std, baseline, eps=1e-6):
    """Float64 group advantages by the docstring's formulas (no rescaling), differentiable."""
    g = s.view(-1, G)
    mean = g.mean(1, keepdim=True)
    b = (g.sum(1, keepdim=True) - g) / (G - 1) if baseline == "loo" else mean
    out = g - b
    if normalize_std:
        out = out / (((g - mean) ** 2).sum(1, keepdim=True) / (G - 1)).sqrt().add(eps)
    return out.reshape(-1)


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1.0, 1e12, 1e20, 1e30, 1e37])
@pytest.mark.parametrize("baseline", ["mean", "loo"])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_at_any_scale(scale, baseline, normalize_std):
    """Scores of any magnitude, value and gradient against float64. Before: the float32 squares overflowed at
    1e20 (std = inf: every advantage 0, the issue's repro) and lost their precision to underflow at 1e-30."""
    if scale == 1e20 and baseline == "mean" and normalize_std:
        out = rf.group_advantages(torch.tensor([1e20, -1e20, 3e19, 0.0]), 4)  # the repro
        ref = _group_advantages64(torch.tensor([1e20, -1e20, 3e19, 0.0], dtype=torch.float64), 4, True, "mean")
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0)
    G = 5
    scores = (torch.randn(4 * G, generator=torch.Generator().manual_seed(6)) * scale).requires_grad_(True)
    out = rf.group_advantages(scores, G, normalize_std=normalize_std, baseline=baseline)
    s64 = scores.detach().double().requires_grad_(True)
    ref = _group_advantages64(s64, G, normalize_std, baseline)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=0)
    w = torch.randn(4 * G, generator=torch.Generator().manual_seed(7))
    (grad,) = torch.autograd.grad((out * w).sum(), scores)
    (grad64,) = torch.autograd.grad((ref * w.double()).sum(), s64)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-5 * grad64.abs().max().item())


# ------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "x,mask,arg",
    [
        (torch.randn(3, 4, dtype=torch.float64), torch.ones(3, 4), "x"),
        (torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4), "x"),
        (torch.randn(3, 4), torch.ones(4, 3), "mask"),
        (torch.randn(3, 4), None, "mask"),
        (torch.randn(0), torch.ones(0), "mask"),
    ],
)
def test_masked_whiten_bad_inputs(x, mask, arg):
    with pytest.raises(ValueError, match=arg):
        rf.masked_whiten(x, mask)


@pytest.mark.parametrize(
    "scores,group_size,kwargs,arg",
    [
        (torch.randn(6, 1), 3, {}, "scores"),
        (torch.randn(0), 3, {}, "scores"),
        (torch.randn(6, dtype=torch.float64), 3, {}, "scores"),
        (torch.arange(6), 3, {}, "scores"),
        (torch.randn(6), 4, {}, "group_size"),
        (torch.randn(6), 0, {}, "group_size"),
        (torch.randn(6), 2.0, {}, "group_size"),
        (torch.randn(6), 1, {}, "group_size"),
        (torch.randn(6), 3, dict(eps=-1e-6), "eps"),
        (torch.randn(6), 3, dict(eps=float("nan")), "eps"),
        (torch.randn(6), 3, dict(baseline="median"), "baseline"),
        (torch.randn(6), 1, dict(baseline="loo", normalize_std=False), "group_size"),
    ],
)
def test_group_advantages_bad_inputs(scores, group_size, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        rf.group_advantages(scores, group_size, **kwargs)
