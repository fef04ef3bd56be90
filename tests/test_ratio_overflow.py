"""A log-ratio above ~88.72 (``exp`` overflows float32): every policy-loss op against float64, where the value and
gradient are finite (issue 22, item 5).

Before, ``exp(100) = inf`` turned branches that do not use the ratio into NaN: a clipped branch's zero gradient
times exp's ``inf`` (vanilla ``A = +1``, ``delta``, the dual clip, GSPO), ``-A r = 0 * inf`` at ``A = 0``, SAPO's
``4 s (1 - s) r`` and the KL's bias correction ``k r`` with ``k = 0``; one such token made its logits row's
gradient NaN, and for the linear ops ``d_hidden`` and all of ``d_weight``. The batch mixes the overflowed
token(s) with ordinary ones, whose gradients must stay float64's. The float64 reference is written out from
rlhf_fast/_policy.py's docstring; in float64 ``exp(100) = 2.7e43`` is finite.
"""

import pytest
import torch
from conftest import IMPLS

import rlhf_fast as rf

B, T, V, H = 2, 3, 4, 5
OVER = 100.0  # the overflowed token's log-ratio: exp(100) is inf in float32, 2.7e43 in float64

# (name, policy options, advantage of the overflowed token(s), whole row 0 overflowed)
CASES = [
    ("vanilla A=+1", dict(), 1.0, False),
    ("vanilla A=0", dict(), 0.0, False),
    ("delta A=+1", dict(delta=1.5), 1.0, False),
    ("delta A=0", dict(delta=1.5), 0.0, False),
    ("dual clip A=+1", dict(dual_clip=3.0), 1.0, False),
    ("dual clip A=-1", dict(dual_clip=3.0), -1.0, False),
    ("sapo A=+1", dict(loss_mode="sapo"), 1.0, False),
    ("sapo A=-1", dict(loss_mode="sapo"), -1.0, False),
    ("sapo A=0", dict(loss_mode="sapo"), 0.0, False),
    ("gspo row A=+1", dict(loss_mode="gspo"), 1.0, True),
    ("gspo row A=0", dict(loss_mode="gspo"), 0.0, True),
    ("kl bias, ref == logp, A=+1", dict(kl_bias_correction=True), 1.0, False),
    ("kl bias, ref == logp, A=0", dict(kl_bias_correction=True), 0.0, False),
    ("kl bias sapo, ref == logp", dict(kl_bias_correction=True, loss_mode="sapo"), 1.0, False),
]


def _inputs(a_over, whole_row):
    """Hidden states (the overflowed tokens' rows 0, so their logits are 0 and their log-prob is -log V in every
    impl, and a reference equal to it is exactly equal), the lm_head, labels, advantages, old and reference
    log-probs (float32), and which tokens overflow."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    over = torch.zeros(B, T, dtype=torch.bool)
    if whole_row:
        over[0] = True
    else:
        over[0, 1] = True
    hidden[over] = 0.0
    logp = torch.log_softmax((hidden @ weight.T).double(), -1).gather(-1, labels[..., None]).squeeze(-1).float()
    logp[over] = -torch.log(torch.tensor(float(V)))  # the float32 value every impl computes from zero logits
    adv = torch.randn(B, T, generator=g)
    adv[over] = a_over
    old = logp + 0.2 * torch.randn(B, T, generator=g)
    old[over] = logp[over] - OVER
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    ref[over] = logp[over]
    return hidden, weight, labels, adv, old, ref, over


def _loss64(logp, old, adv, ref, over, opts, kl_coef, entropy=None, entropy_coef=0.0):
    """Float64 token-mean loss from float64 ``logp [B, T]`` (differentiable), the other inputs float32.

    For the overflowed tokens with ``kl_bias_correction`` the reference is ``logp`` itself (``ref == logp``
    exactly, as in the float32 impls)."""
    old, adv, ref = old.double(), adv.double(), ref.double()
    ref = torch.where(over, logp.detach(), ref)
    lo = hi = 0.2
    mode = opts.get("loss_mode", "vanilla")
    lr = logp - old
    if mode == "gspo":
        ratio = torch.exp(lr.detach().mean(1, keepdim=True) + logp - logp.detach())
    else:
        ratio = torch.exp(lr)
    if mode == "sapo":
        tau = torch.where(adv > 0, 1.0, 1.05)
        L = -adv * (4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0))
    else:
        r1 = ratio if "delta" not in opts else torch.clamp(ratio, max=opts["delta"])
        L = torch.maximum(-adv * r1, -adv * torch.clamp(ratio, 1 - lo, 1 + hi))
        if "dual_clip" in opts:
            L = torch.where(adv < 0, torch.minimum(L, -adv * opts["dual_clip"]), L)
    k = logp - ref
    kl = torch.exp(-k) - 1 + k  # k3
    if opts.get("kl_bias_correction"):
        kl = kl * ratio
    L = L + kl_coef * kl
    if entropy is not None:
        L = L - entropy_coef * entropy
    return L.mean()


def _check(name, loss, grads, loss64, grads64):
    assert torch.isfinite(loss), name
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6, msg=name)
    for k, (g, g64) in enumerate(zip(grads, grads64)):
        assert torch.isfinite(g).all(), f"{name}: gradient {k} not finite"
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6, msg=f"{name}: gradient {k}")


# the KL's bias correction is an option of the from-logits and linear ops, not of ppo_policy_loss
POLICY_CASES = [c for c in CASES if "kl_bias_correction" not in c[1]]


@pytest.mark.parametrize("name,opts,a_over,whole_row", POLICY_CASES, ids=[c[0] for c in POLICY_CASES])
def test_ppo_policy_loss(name, opts, a_over, whole_row):
    hidden, weight, labels, adv, old, ref, over = _inputs(a_over, whole_row)
    logp = torch.log_softmax((hidden @ weight.T).double(), -1).gather(-1, labels[..., None]).squeeze(-1).float()
    logp[over] = -torch.log(torch.tensor(float(V)))
    lp = logp.clone().requires_grad_(True)
    loss, metrics = rf.ppo_policy_loss(lp, old, adv, **opts)
    (grad,) = torch.autograd.grad(loss, lp)
    lp64 = logp.double().requires_grad_(True)
    loss64 = _loss64(lp64, old, adv, ref, over, opts, 0.0)
    (grad64,) = torch.autograd.grad(loss64, lp64)
    _check(name, loss, [grad], loss64.detach(), [grad64])
    assert all(not v.isnan() for v in metrics.values()), metrics


def _from_logits64(hidden, weight, labels, adv, old, ref, over, opts, need_hidden):
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    logp_all = torch.log_softmax(h @ w.T, -1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    loss = _loss64(logp, old, adv, ref, over, opts, 0.1, entropy, 0.01)
    if need_hidden:
        return loss.detach(), torch.autograd.grad(loss, (h, w))
    x = (h @ w.T).detach().requires_grad_(True)
    logp_all = torch.log_softmax(x, -1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    loss = _loss64(logp, old, adv, ref, over, opts, 0.1, entropy, 0.01)
    return loss.detach(), torch.autograd.grad(loss, (x,))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,opts,a_over,whole_row", CASES, ids=[c[0] for c in CASES])
def test_from_logits_and_linear(impl, name, opts, a_over, whole_row):
    """``rf.ppo_loss_from_logits`` (the logits' gradient) and ``rf.linear_ppo_loss`` (``d_hidden``, ``d_weight``),
    with a k3 KL and an entropy bonus, loss and every gradient against float64."""
    hidden, weight, labels, adv, old, ref, over = _inputs(a_over, whole_row)
    kw = dict(ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, impl=impl, **opts)

    logits = (hidden.double() @ weight.double().T).float().requires_grad_(True)
    loss, metrics = rf.ppo_loss_from_logits(logits, labels, old, adv, **kw)
    (grad,) = torch.autograd.grad(loss, logits)
    loss64, grads64 = _from_logits64(hidden, weight, labels, adv, old, ref, over, opts, need_hidden=False)
    _check(f"ppo_loss_from_logits {impl} {name}", loss, [grad], loss64, grads64)
    assert all(not v.isnan() for v in metrics.values()), metrics

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, metrics = rf.linear_ppo_loss(h, w, labels, old, adv, **kw)
    grads = torch.autograd.grad(loss, (h, w))
    loss64, grads64 = _from_logits64(hidden, weight, labels, adv, old, ref, over, opts, need_hidden=True)
    _check(f"linear_ppo_loss {impl} {name}", loss, grads, loss64, grads64)
    assert all(not v.isnan() for v in metrics.values()), metrics
