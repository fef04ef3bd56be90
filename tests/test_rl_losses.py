"""rf.kl_penalty, rf.ppo_policy_loss, rf.value_loss, rf.aggregate against float64 (rf.masked_whiten and
rf.group_advantages: test_rl_losses_advantages.py).

The references are written token by token from docs/API.md (Python loops in float64), so that
they share no code with the implementation, the aggregation weights of ``rlhf_fast._agg`` included.
"""

import math

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast.reference import aggregate_reference

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


# -------------------------------------------------------------------------------------- references


def agg_weights_f64(mask, agg):
    """``w [B, T]`` float64 with ``agg(L) = sum(w * L)``, from the definitions, row by row."""
    m = mask.detach().double().cpu()
    B, T = m.shape
    w = torch.zeros(B, T, dtype=torch.float64)
    total = m.sum().item()
    rows = [b for b in range(B) if m[b].sum().item() > 0]
    for b in range(B):
        n_b = m[b].sum().item()
        for t in range(T):
            if m[b, t] == 0:
                continue
            if agg == "token-mean":
                w[b, t] = 1.0 / total
            elif agg == "seq-mean-token-mean":
                w[b, t] = 1.0 / n_b / len(rows)
            elif agg == "seq-mean-token-sum":
                w[b, t] = 1.0 / len(rows)
            else:
                w[b, t] = 1.0 / (B * T)
    return w


def ppo_f64(logp, old_logp, adv, mask, *, clip_low=0.2, clip_high=None, dual_clip=None, agg="token-mean",
            is_weights=None):  # fmt: skip
    """``(loss, dloss/dlogp, metrics)`` token by token in float64 (the gradient from the active branch)."""
    clip_high = clip_low if clip_high is None else clip_high
    lp, olp = logp.detach().double().cpu(), old_logp.detach().double().cpu()
    B, T = lp.shape
    A = adv.detach().double().cpu()
    if A.dim() == 1:
        A = A[:, None].expand(B, T)
    m = torch.ones(B, T) if mask is None else mask.detach().cpu().double()
    isw = None if is_weights is None else is_weights.detach().double().cpu()
    w = agg_weights_f64(m, agg)
    loss, grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    n, clipped, capped, kl, ratio_sum, ratio_max = 0, 0, 0, 0.0, 0.0, 0.0
    for b in range(B):
        for t in range(T):
            if m[b, t] == 0:
                continue
            a, r = A[b, t].item(), math.exp(lp[b, t].item() - olp[b, t].item())
            unclipped = -a * r
            clipped_loss = -a * min(max(r, 1 - clip_low), 1 + clip_high)
            if clipped_loss > unclipped:  # the clipped branch is active: no gradient through r
                L, dL_dr = clipped_loss, 0.0
                clipped += 1
            else:
                L, dL_dr = unclipped, -a
            if dual_clip is not None and a < 0 and L > -a * dual_clip:
                L, dL_dr = -a * dual_clip, 0.0
                capped += 1
            scale = 1.0 if isw is None else isw[b, t].item()
            loss += w[b, t].item() * scale * L
            grad[b, t] = w[b, t].item() * scale * dL_dr * r  # dr/dlogp = r
            n += 1
            kl += olp[b, t].item() - lp[b, t].item()
            ratio_sum += r
            ratio_max = max(ratio_max, r)
    n_ = max(n, 1)
    metrics = {"clipfrac": clipped / n_, "approx_kl": kl / n_, "ratio_mean": ratio_sum / n_, "ratio_max": ratio_max}
    if dual_clip is not None:
        metrics["dual_clipfrac"] = capped / n_
    return loss, grad, metrics


def value_f64(values, old_values, returns, mask, clip, agg):
    """``(loss, dloss/dvalues)`` token by token in float64."""
    v, ov, R = (x.detach().double().cpu() for x in (values, old_values, returns))
    B, T = v.shape
    m = torch.ones(B, T) if mask is None else mask.detach().cpu().double()
    w = agg_weights_f64(m, agg)
    loss, grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if m[b, t] == 0:
                continue
            e = v[b, t].item() - R[b, t].item()
            L, dL = 0.5 * e * e, e
            if clip is not None:
                d = v[b, t].item() - ov[b, t].item()
                e2 = ov[b, t].item() + min(max(d, -clip), clip) - R[b, t].item()
                if e2 * e2 > e * e:
                    L, dL = 0.5 * e2 * e2, (e2 if abs(d) < clip else 0.0)
            loss += w[b, t].item() * L
            grad[b, t] = w[b, t].item() * dL
    return loss, grad


def _ppo_inputs(B, T, dtype=torch.float32, spread=0.3):
    old = -torch.rand(B, T) * 3
    logp = (old + torch.randn(B, T) * spread).to(dtype)  # ratios from ~0.4 to ~2.5: many clipped tokens
    return logp, old.to(dtype), torch.randn(B, T)


def _right_padded(B, T, min_len=1):
    lengths = torch.randint(min_len, T + 1, (B,))
    return torch.arange(T)[None, :] < lengths[:, None]


def check_ppo(logp, old_logp, adv, mask, *, tol=1e-6, **kwargs):
    x = logp.detach().clone().requires_grad_(True)
    loss, metrics = rf.ppo_policy_loss(x, old_logp, adv, mask, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == logp.dtype
    ref_loss, ref_grad, ref_metrics = ppo_f64(logp, old_logp, adv, mask, **kwargs)
    assert abs(loss.item() - ref_loss) <= tol * (1 + abs(ref_loss)), (loss.item(), ref_loss)
    gtol = tol if logp.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.double(), ref_grad, rtol=gtol, atol=gtol * ref_grad.abs().max().item())
    assert set(ref_metrics) <= set(metrics)
    for k, v in ref_metrics.items():
        assert metrics[k].dtype == torch.float32 and metrics[k].shape == () and not metrics[k].requires_grad, k
        assert abs(metrics[k].item() - v) <= 1e-5 * (1 + abs(v)), (k, metrics[k].item(), v)
    return loss, grad, metrics


# ------------------------------------------------------------------------------------------- KL


def kl_f64(logp, ref_logp, estimator):
    """``(value, d/dlogp)`` elementwise in float64 (``d/dref_logp`` is minus the latter)."""
    lr = logp.detach().double() - ref_logp.detach().double()
    if estimator == "k1":
        return lr, torch.ones_like(lr)
    if estimator == "k2":
        return 0.5 * lr**2, lr
    if estimator == "k3":
        return torch.exp(-lr) - 1 + lr, 1 - torch.exp(-lr)
    return lr.abs(), torch.sign(lr)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 47), (5,), (2, 3, 7)])
def test_kl_penalty_values_and_gradients(estimator, dtype, shape):
    logp = (-torch.rand(shape) * 4).to(dtype).requires_grad_(True)
    ref = (logp.detach().float() + torch.randn(shape) * 0.7).to(dtype).requires_grad_(True)
    kl = rf.kl_penalty(logp, ref, estimator=estimator)
    assert kl.dtype == torch.float32 and kl.shape == logp.shape
    g = torch.randn(shape)
    g_logp, g_ref = torch.autograd.grad((kl * g).sum(), (logp, ref))
    assert g_logp.dtype == g_ref.dtype == dtype
    value, dvalue = kl_f64(logp, ref, estimator)
    torch.testing.assert_close(kl.double(), value, rtol=2e-6, atol=2e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is stored in the input's dtype
    torch.testing.assert_close(g_logp.double(), g.double() * dvalue, rtol=tol, atol=tol)
    torch.testing.assert_close(g_ref.double(), -g.double() * dvalue, rtol=tol, atol=tol)


def test_kl_penalty_ref_logp_without_grad():
    logp = torch.randn(4, 6, requires_grad=True)
    kl = rf.kl_penalty(logp, torch.randn(4, 6), estimator="k3")
    kl.sum().backward()
    assert logp.grad is not None


def test_k3_accurate_at_small_log_ratios():
    """exp(-lr) - 1 + lr cancels to lr^2/2: the naive float32 formula loses most digits below |lr| ~ 1e-2."""
    lr = torch.cat([torch.logspace(-7, 0.5, 200), -torch.logspace(-7, 0.5, 200), torch.tensor([0.0, 0.49, 0.5, 0.51])])
    ref_logp = -torch.rand(lr.shape) * 5
    logp = ref_logp + lr
    lr_rounded = logp.double() - ref_logp.double()  # what the op actually sees after float32 rounding
    ref = torch.expm1(-lr_rounded) + lr_rounded  # float64 expm1: relative error ~1e-16 / |lr|, enough here
    ours = rf.kl_penalty(logp, ref_logp, estimator="k3").double()
    rel = ((ours - ref).abs() / ref.clamp(min=1e-300)).max().item()
    assert rel < 2e-6, rel
    naive = (torch.exp(-(logp - ref_logp)) - 1 + (logp - ref_logp)).double()
    assert ((naive - ref).abs() / ref.clamp(min=1e-300)).max().item() > 1e-2  # the trap this avoids
    assert (ours >= 0).all()


def test_kl_penalty_large_log_ratios_and_nan():
    logp = torch.tensor([0.0, -80.0, -1.0, float("nan")], requires_grad=True)
    ref = torch.tensor([-80.0, 0.0, -1.0, 0.0])
    kl = rf.kl_penalty(logp, ref, estimator="k3")
    assert kl[0].item() == pytest.approx(79.0, rel=1e-6)  # exp(-80) - 1 + 80
    assert kl[1].item() == pytest.approx(math.exp(80) - 81, rel=1e-5)
    assert kl[2].item() == 0.0 and torch.isnan(kl[3])
    kl[:3].sum().backward()
    assert torch.isfinite(logp.grad[:3]).all()


# ------------------------------------------------------------------------------------------- PPO


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sequence_adv", [False, True])
def test_ppo_agg_modes(agg, dtype, per_sequence_adv):
    B, T = 5, 23
    logp, old, adv = _ppo_inputs(B, T, dtype)
    if per_sequence_adv:
        adv = adv[:, 0]
    mask = _right_padded(B, T)
    mask[3] = False  # a row with no response token
    loss, _, metrics = check_ppo(logp, old, adv, mask, agg=agg)
    assert 0 < metrics["clipfrac"].item() < 1


@pytest.mark.parametrize("clip_low,clip_high", [(0.2, None), (0.2, 0.28), (0.1, 0.5), (1.5, 0.2)])
def test_ppo_asymmetric_clip(clip_low, clip_high):
    logp, old, adv = _ppo_inputs(6, 31, spread=0.5)
    check_ppo(logp, old, adv, _right_padded(6, 31), clip_low=clip_low, clip_high=clip_high)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_ppo_dual_clip(agg):
    logp, old, adv = _ppo_inputs(6, 31, spread=1.0)  # ratios up to e^3: the dual clip caps many tokens
    _, _, metrics = check_ppo(logp, old, adv, _right_padded(6, 31), dual_clip=3.0, agg=agg)
    assert metrics["dual_clipfrac"].item() > 0
    _, metrics = rf.ppo_policy_loss(logp, old, adv)
    assert "dual_clipfrac" not in metrics


def test_ppo_is_weights():
    logp, old, adv = _ppo_inputs(4, 19)
    is_weights = torch.rand(4, 19) * 2
    check_ppo(logp, old, adv, _right_padded(4, 19), is_weights=is_weights, dual_clip=2.0, clip_high=0.3)
    # and the weights get a gradient when they ask for one
    w = is_weights.clone().requires_grad_(True)
    loss, _ = rf.ppo_policy_loss(logp, old, adv, is_weights=w)
    loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_ppo_no_mask_is_all_ones():
    logp, old, adv = _ppo_inputs(3, 11)
    a, ma = rf.ppo_policy_loss(logp, old, adv)
    b, mb = rf.ppo_policy_loss(logp, old, adv, torch.ones(3, 11))
    assert a.item() == b.item() and all(ma[k].item() == mb[k].item() for k in ma)
    check_ppo(logp, old, adv, None, agg="seq-mean-token-mean")


def test_ppo_metrics_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 9.0]]))  # ratios (old_logp = 0)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the ratio of 9 is padding
    loss, m = rf.ppo_policy_loss(logp, old, adv, mask)
    # token 0: A > 0, r = 1.5 > 1.2: clipped (-1.2); token 1: A > 0, r = 0.5: unclipped (-0.5); token 2: r = 1 (1)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.0) / 3, rel=1e-6)
    assert m["clipfrac"].item() == pytest.approx(1 / 3)
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    assert m["ratio_max"].item() == pytest.approx(1.5)
    assert m["approx_kl"].item() == pytest.approx(-(math.log(1.5) + math.log(0.5)) / 3, rel=1e-6)


def test_ppo_no_token_at_all():
    logp, old, adv = _ppo_inputs(3, 7)
    x = logp.clone().requires_grad_(True)
    for agg in AGGS:
        loss, metrics = rf.ppo_policy_loss(x, old, adv, torch.zeros(3, 7), agg=agg)
        assert loss.item() == 0.0
        assert all(v.item() == 0.0 for v in metrics.values())
        (g,) = torch.autograd.grad(loss, x)
        assert (g == 0).all()


def test_ppo_garbage_in_padding_never_leaks():
    logp, old, adv = _ppo_inputs(4, 13)
    mask = _right_padded(4, 13)
    mask[:, 0] = True
    clean = check_ppo(logp, old, adv, mask, dual_clip=3.0)
    lp, o, a = logp.clone(), old.clone(), adv.clone()
    lp[~mask], o[~mask], a[~mask] = 50.0, float("nan"), float("inf")
    x = lp.clone().requires_grad_(True)
    loss, metrics = rf.ppo_policy_loss(x, o, a, mask, dual_clip=3.0)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == clean[0].item()
    torch.testing.assert_close(grad, clean[1], rtol=0, atol=0)
    assert all(metrics[k].item() == clean[2][k].item() for k in metrics)


def test_ppo_nan_propagates():
    logp, old, adv = _ppo_inputs(2, 5)
    logp[1, 2] = float("nan")
    loss, metrics = rf.ppo_policy_loss(logp, old, adv)
    assert torch.isnan(loss) and torch.isnan(metrics["approx_kl"])


# ------------------------------------------------------------------------------------------ value


@pytest.mark.parametrize("clip", [None, 0.2, 1.0])
@pytest.mark.parametrize("agg", AGGS)
def test_value_loss(clip, agg):
    B, T = 4, 17
    old = torch.randn(B, T)
    values = (old + torch.randn(B, T) * 0.5).requires_grad_(True)
    returns = torch.randn(B, T)
    mask = _right_padded(B, T)
    mask[2] = False
    loss = rf.value_loss(values, old, returns, mask, clip=clip, agg=agg)
    assert loss.dtype == torch.float32 and loss.shape == ()
    (grad,) = torch.autograd.grad(loss, values)
    ref_loss, ref_grad = value_f64(values, old, returns, mask, clip, agg)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-6, atol=1e-7)


def test_value_loss_dtypes_and_padding():
    B, T = 3, 9
    old, returns = torch.randn(B, T), torch.randn(B, T)
    values = torch.randn(B, T).to(torch.bfloat16).requires_grad_(True)
    mask = _right_padded(B, T)
    mask[:, 0] = True
    loss = rf.value_loss(values, old, returns, mask, clip=0.3)
    (grad,) = torch.autograd.grad(loss, values)
    assert grad.dtype == torch.bfloat16
    ref_loss, _ = value_f64(values, old, returns, mask, 0.3, "token-mean")
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    r = returns.clone()
    r[~mask] = float("nan")
    loss2 = rf.value_loss(values, old, r, mask, clip=0.3)
    (grad2,) = torch.autograd.grad(loss2, values)
    assert loss2.item() == loss.item()
    torch.testing.assert_close(grad2, grad, rtol=0, atol=0)
    assert rf.value_loss(values, None, returns).item() > 0  # old_values is only read with clip



# ------------------------------------------------------------------------------------ bad inputs


def _ppo_args(**kw):
    args = dict(logp=torch.randn(3, 4), old_logp=torch.randn(3, 4), advantages=torch.randn(3, 4), mask=None)
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(logp=torch.randn(3)), "logp"),
        (dict(logp=torch.randn(3, 4, 2)), "logp"),
        (dict(logp=torch.randn(0, 4), old_logp=torch.randn(0, 4), advantages=torch.randn(0)), "logp"),
        (dict(logp=torch.randn(3, 0), old_logp=torch.randn(3, 0), advantages=torch.randn(3)), "logp"),
        (dict(logp=torch.randn(3, 4, dtype=torch.float64)), "logp"),
        (dict(logp=torch.zeros(3, 4, dtype=torch.long)), "logp"),
        (dict(old_logp=torch.randn(3, 5)), "old_logp"),
        (dict(old_logp=torch.randn(3, 4, dtype=torch.float64)), "old_logp"),
        (dict(advantages=torch.randn(4)), "advantages"),
        (dict(advantages=torch.randn(3, 5)), "advantages"),
        (dict(advantages=torch.randn(3, 4, 1)), "advantages"),
        (dict(advantages=torch.ones(3, 4, dtype=torch.long)), "advantages"),
        (dict(mask=torch.ones(3, 5)), "mask"),
        (dict(mask=[[1] * 4] * 3), "mask"),
        (dict(is_weights=torch.ones(3)), "is_weights"),
        (dict(is_weights=torch.ones(3, 4, dtype=torch.float64)), "is_weights"),
        (dict(clip_low=0.0), "clip_low"),
        (dict(clip_low=-0.2), "clip_low"),
        (dict(clip_low=None), "clip_low"),
        (dict(clip_low=float("inf")), "clip_low"),
        (dict(clip_high=0.0), "clip_high"),
        (dict(clip_high=float("nan")), "clip_high"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(dual_clip=-3.0), "dual_clip"),
        (dict(agg="mean"), "agg"),
        (dict(agg=None), "agg"),
    ],
)
def test_ppo_bad_inputs(kwargs, arg):
    args = _ppo_args(**kwargs)
    with pytest.raises(ValueError, match=arg):
        rf.ppo_policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"), **args)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(logp=torch.randn(3, 4).long()), "logp"),
        (dict(logp=[0.0]), "logp"),
        (dict(ref_logp=torch.randn(3, 5)), "ref_logp"),
        (dict(ref_logp=torch.randn(4)), "ref_logp"),
        (dict(ref_logp=torch.randn(3, 4, dtype=torch.float64)), "ref_logp"),
        (dict(estimator="k4"), "estimator"),
        (dict(estimator="K1"), "estimator"),
        (dict(estimator=None), "estimator"),
    ],
)
def test_kl_penalty_bad_inputs(kwargs, arg):
    args = dict(logp=torch.randn(3, 4), ref_logp=torch.randn(3, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        rf.kl_penalty(args.pop("logp"), args.pop("ref_logp"), **args)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(values=torch.randn(3)), "values"),
        (dict(values=torch.randn(0, 4), old_values=torch.randn(0, 4), returns=torch.randn(0, 4)), "values"),
        (dict(values=torch.randn(3, 4, dtype=torch.float64)), "values"),
        (dict(old_values=torch.randn(3, 5)), "old_values"),
        (dict(old_values=None), "old_values"),
        (dict(returns=torch.randn(4, 3)), "returns"),
        (dict(returns=torch.zeros(3, 4, dtype=torch.long)), "returns"),
        (dict(mask=torch.ones(4)), "mask"),
        (dict(clip=0.0), "clip"),
        (dict(clip=-1.0), "clip"),
        (dict(clip=float("nan")), "clip"),
        (dict(agg="sum"), "agg"),
    ],
)
def test_value_loss_bad_inputs(kwargs, arg):
    args = dict(values=torch.randn(3, 4), old_values=torch.randn(3, 4), returns=torch.randn(3, 4), mask=None, clip=0.2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        rf.value_loss(args.pop("values"), args.pop("old_values"), args.pop("returns"), args.pop("mask"), **args)


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_matches_the_written_out_modes(agg):
    """``rf.aggregate`` (public, for terms users add to the PPO loss) against the float64 formulas."""
    values = torch.randn(5, 9, dtype=torch.float64)
    mask = torch.rand(5, 9) > 0.4
    mask[2] = False  # an empty row
    got = rf.aggregate(values.float(), mask, agg=agg)
    assert float(got) == pytest.approx(float(aggregate_reference(values, mask, agg)), rel=1e-5, abs=1e-6)


def test_aggregate_rejects_bad_input():
    with pytest.raises(ValueError, match="agg"):
        rf.aggregate(torch.zeros(2, 3), agg="mean")
    with pytest.raises(ValueError, match="mask"):
        rf.aggregate(torch.zeros(2, 3), torch.ones(3, 2))
