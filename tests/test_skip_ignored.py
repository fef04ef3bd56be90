"""``skip_ignored=True`` on the linear ops: the labeled rows get the results of ``skip_ignored=False`` (and of a
float64 reference), the ignored rows log-prob 0, entropy 0 and no gradient; both impls (Triton under the
interpreter on CPU: tiny shapes)."""

import pytest
import torch
from conftest import DEVICE, IMPLS

import rlhf_fast as rf
from rlhf_fast.reference import logprobs_reference

H, V = 16, 40


def _inputs(shape, *, ignore, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(V, H, generator=gen) * 2 / H**0.5).to(DEVICE, dtype)
    b = (torch.randn(V, generator=gen) * 0.5).to(DEVICE, dtype) if bias else None
    labels = torch.randint(0, V, shape, generator=gen).to(DEVICE)
    if ignore == "all":
        labels.fill_(-100)
    elif ignore == "half":  # prompt-like runs of ignored rows, and scattered ones
        labels[..., : shape[-1] // 2] = -100
        labels[..., -1] = -100
    return hidden, weight, b, labels


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _run(hidden, weight, bias, labels, impl, skip, *, temperature=1.0):
    """``(logp, entropy, d_hidden, d_weight, d_bias)`` of a loss on both outputs (the entropy's weight is 0 on
    ignored rows, so that both settings ask for the same gradient)."""
    h, w, b = _leaves(hidden, weight, bias)
    logp, ent = rf.linear_logprobs(h, w, labels, bias=b, temperature=temperature, return_entropy=True, impl=impl,
                                   skip_ignored=skip)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    g_logp = torch.randn(labels.shape, generator=gen).to(DEVICE)
    g_ent = torch.randn(labels.shape, generator=gen).to(DEVICE) * (labels != -100)
    inputs = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), inputs)
    return (logp, ent, *grads), (g_logp, g_ent)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape, ignore, bias, temperature", [
    ((2, 9), "half", True, 1.0), ((13,), "half", False, 0.7), ((3, 4), "none", True, 1.0), ((2, 5), "all", True, 1.3),
])  # fmt: skip
def test_linear_logprobs_labeled_rows_unchanged(impl, shape, ignore, bias, temperature):
    hidden, weight, b, labels = _inputs(shape, ignore=ignore, bias=bias)
    (lp, ent, dh, *dwb), (g_logp, g_ent) = _run(hidden, weight, b, labels, impl, True, temperature=temperature)
    (lp0, ent0, dh0, *dwb0), _ = _run(hidden, weight, b, labels, impl, False, temperature=temperature)
    on = labels != -100
    assert lp.shape == ent.shape == labels.shape and lp.dtype == ent.dtype == torch.float32
    # ignored rows: nothing computed, exactly zero, no gradient to their hidden states
    assert torch.equal(lp[~on], torch.zeros_like(lp[~on])) and torch.equal(ent[~on], torch.zeros_like(ent[~on]))
    assert torch.equal(dh[~on], torch.zeros_like(dh[~on]))
    # labeled rows: what skip_ignored=False gives them (same gradients: the entropy's weight is 0 off them)
    torch.testing.assert_close(lp[on], lp0[on], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent[on], ent0[on], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dh, dh0, rtol=1e-5, atol=1e-6)
    for g, g0 in zip(dwb, dwb0):
        torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-6)
    # and float64's
    h64, w64, b64 = _leaves(*(None if t is None else t.double() for t in (hidden, weight, b)))
    ref_lp, ref_ent = logprobs_reference(torch.nn.functional.linear(h64, w64, b64), labels, temperature=temperature)
    ref_ent = torch.where(on, ref_ent, 0.0)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    inputs = [t for t in (h64, w64, b64) if t is not None]
    ref_grads = torch.autograd.grad((ref_lp * g_logp.double()).sum() + (ref_ent * g_ent.double()).sum(), inputs)
    for name, g, r in zip(("d_hidden", "d_weight", "d_bias"), (dh, *dwb), ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_gives_zero_gradients(impl):
    hidden, weight, b, labels = _inputs((2, 5), ignore="all")
    h, w, bb = _leaves(hidden, weight, b)
    lp, ent = rf.linear_logprobs(h, w, labels, bias=bb, return_entropy=True, impl=impl, skip_ignored=True)
    assert not lp.any() and not ent.any()
    grads = torch.autograd.grad(lp.sum() + ent.sum(), (h, w, bb))
    assert all(g is not None and g.shape == t.shape and not g.any() for g, t in zip(grads, (h, w, bb)))


def test_autocast_bf16():
    """Under CPU autocast the kept rows see the same bf16 operands: the same results as without skipping."""
    hidden, weight, b, labels = _inputs((2, 9), ignore="half")
    outs = []
    for skip in (True, False):
        h, w, bb = _leaves(hidden, weight, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, ent = rf.linear_logprobs(h, w, labels, bias=bb, return_entropy=True, skip_ignored=skip)
        g = torch.autograd.grad((lp * torch.arange(lp.numel()).view(lp.shape)).sum(), (h, w, bb))
        assert lp.dtype == torch.float32 and all(x.dtype == torch.float32 for x in g)
        outs.append((lp, ent, *g))
    on = labels != -100
    torch.testing.assert_close(outs[0][0][on], outs[1][0][on], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[0][1][on], outs[1][1][on], rtol=1e-6, atol=1e-6)
    assert not outs[0][1][~on].any()
    for g, g0 in zip(outs[0][2:], outs[1][2:]):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-4)


def _ppo(hidden, weight, b, labels, mask, impl, skip, **kw):
    h, w, bb = _leaves(hidden, weight, b)
    gen = torch.Generator().manual_seed(2)
    old = (torch.randn(labels.shape, generator=gen) * 0.1 - 3).to(DEVICE)
    adv = torch.randn(labels.shape, generator=gen).to(DEVICE)
    loss, metrics = rf.linear_ppo_loss(h, w, labels, old, adv, mask, bias=bb, impl=impl, skip_ignored=skip, **kw)
    return loss, metrics, torch.autograd.grad(loss, (h, w, bb)), (old, adv)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo"])  # the fused chunk loop, and the composed route
def test_linear_ppo_loss(impl, loss_mode):
    hidden, weight, b, labels = _inputs((2, 9), ignore="half")
    mask = (labels != -100).float()
    kw = dict(loss_mode=loss_mode, entropy_coef=0.01, agg="seq-mean-token-mean", temperature=0.9)
    loss, metrics, grads, _ = _ppo(hidden, weight, b, labels, mask, impl, True, **kw)
    loss0, metrics0, grads0, _ = _ppo(hidden, weight, b, labels, mask, impl, False, **kw)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-7)
    for name in ("clipfrac", "approx_kl", "entropy"):
        torch.testing.assert_close(metrics[name], metrics0[name], rtol=1e-6, atol=1e-7, msg=name)
    for g, g0 in zip(grads, grads0):
        torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-7)
    assert not grads[0][labels == -100].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_ppo_loss_scores_unmasked_ignored_rows_with_zeros(impl):
    """Mask 1 on an ignored row: the loss is the formula with log-prob 0 and entropy 0 there."""
    hidden, weight, b, labels = _inputs((2, 9), ignore="half")
    mask = torch.ones(labels.shape, device=DEVICE)
    loss, _, _, (old, adv) = _ppo(hidden, weight, b, labels, mask, impl, True, entropy_coef=0.05)
    lp, ent = rf.linear_logprobs(hidden, weight, labels, bias=b, return_entropy=True, impl=impl)
    ent = torch.where(labels == -100, 0.0, ent)
    expected = rf.ppo_policy_loss(lp, old, adv, mask)[0] - 0.05 * rf.aggregate(ent, mask)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_dpo_loss(impl):
    hidden, weight, b, labels = _inputs((4, 7), ignore="half")
    ref_c, ref_r = torch.tensor([-9.0, -8.0], device=DEVICE), torch.tensor([-9.5, -7.0], device=DEVICE)
    out = []
    for skip in (True, False):
        h, w, bb = _leaves(hidden, weight, b)
        loss, metrics = rf.linear_dpo_loss(h, w, labels, ref_c, ref_r, bias=bb, impl=impl, skip_ignored=skip)
        out.append((loss, metrics["reward_margin"], *torch.autograd.grad(loss, (h, w, bb))))
    for a, c in zip(*out):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", ["linear_logprobs", "linear_ppo_loss", "linear_dpo_loss"])
def test_skip_ignored_must_be_a_bool(op):
    hidden, weight, _, labels = _inputs((2, 3), ignore="half")
    args = {"linear_logprobs": (), "linear_ppo_loss": (torch.zeros(2, 3), torch.zeros(2, 3)),
            "linear_dpo_loss": (torch.zeros(1), torch.zeros(1))}[op]  # fmt: skip
    with pytest.raises(ValueError, match="skip_ignored"):
        getattr(rf, op)(hidden, weight, labels, *args, skip_ignored=1)
