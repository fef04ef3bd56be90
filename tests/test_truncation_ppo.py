"""Truncated sampling in the loss ops (rf.ppo_loss_from_logits, rf.linear_ppo_loss), both impls, against a
float64 reference: the truncated log-probs and entropy of rlhf_fast/reference.py
(truncated_logprobs_reference, itself checked against vLLM's and transformers' samplers in
tests/test_truncation.py), a token whose label is outside the kept set masked out (weight 0), then PPO's
clipped surrogate, KL penalty, entropy bonus and aggregation written out in float64."""

import pytest
import torch
from conftest import IMPLS

import rlhf_fast as rf
from rlhf_fast.reference import aggregate_reference, clipped_surrogate_reference, kl_penalty_reference
from rlhf_fast.reference import truncated_logprobs_reference

TRUNC = dict(top_k=6, top_p=0.9, min_p=0.02)


def batch(B=3, T=6, V=41, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen) * 2.5
    probs = torch.softmax(logits.reshape(-1, V), -1)
    labels = torch.multinomial(probs, 1, generator=gen).reshape(B, T)  # mostly inside the kept set
    labels[0, 2] = int(logits[0, 2].argmin())  # outside it whatever the setting: a missed token
    labels[1, 4] = int(logits[1, 4].argmin())
    labels[2, 0] = -100
    mask = torch.ones(B, T)
    mask[2, 0] = 0
    mask[2, 5] = 0
    labels[2, 5] = int(logits[2, 5].argmin())  # missed but masked out: not counted
    with torch.no_grad():
        lp, _ = truncated_logprobs_reference(logits.double(), labels, **TRUNC)
    base = torch.where(torch.isfinite(lp), lp, -3.0)
    old = (base + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).float()
    ref = (base + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)).float()
    adv = torch.randn(B, T, generator=gen)
    return logits, labels, old, adv, mask, ref


def reference(logits, labels, old, adv, mask, ref, *, kl_coef, entropy_coef, agg, temperature=1.0, **trunc):
    """Float64 ``(loss, metrics)``: missed tokens masked out, then the loss over the kept ones."""
    logp, ent = truncated_logprobs_reference(logits, labels, temperature=temperature, **trunc)
    m = mask.double()
    missed = torch.isinf(logp) & (m != 0)
    mk = m.masked_fill(missed, 0.0)
    lp = torch.where(mk != 0, logp, 0.0)  # nothing infinite reaches the arithmetic (nor its gradient)
    surr = clipped_surrogate_reference(lp, old.double(), adv.double())
    token = surr.loss + kl_coef * kl_penalty_reference(lp, ref.double(), "k3") - entropy_coef * ent
    loss = aggregate_reference(token, mk, agg)
    with torch.no_grad():
        n = mk.sum()
        metrics = {
            "truncation_miss_frac": (m * missed).sum() / m.sum(),
            "ratio_mean": (mk * surr.ratio).sum() / n,
            "approx_kl": (mk * (old.double() - lp)).sum() / n,
            "entropy": (mk * ent).sum() / n,
            "kl": (mk * kl_penalty_reference(lp, ref.double(), "k3")).sum() / n,
        }
    return loss, metrics


def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def check(op, impl, agg="token-mean", kl_coef=0.1, entropy_coef=0.01, temperature=0.8, **trunc):
    logits, labels, old, adv, mask, ref = batch()
    trunc = trunc or TRUNC
    kw = dict(ref_logp=ref, kl_coef=kl_coef, entropy_coef=entropy_coef, agg=agg, temperature=temperature, impl=impl, **trunc)
    if op == "logits":
        x = logits.clone().requires_grad_(True)
        loss, metrics = rf.ppo_loss_from_logits(x, labels, old, adv, mask, **kw)
        grads = torch.autograd.grad(loss, x)
        x64 = logits.double().requires_grad_(True)
        ref_loss, ref_metrics = reference(x64, labels, old, adv, mask, ref, kl_coef=kl_coef, entropy_coef=entropy_coef,
                                          agg=agg, temperature=temperature, **trunc)  # fmt: skip
        ref_grads = torch.autograd.grad(ref_loss, x64)
    else:  # hidden states: logits = hidden @ weight.T + bias
        gen = torch.Generator().manual_seed(5)
        B, T, V = logits.shape
        H = 8
        h0, w0, b0 = torch.randn(B, T, H, generator=gen), torch.randn(V, H, generator=gen), torch.randn(V, generator=gen)
        h, w, b = (t.clone().requires_grad_(True) for t in (h0, w0, b0))
        lab = labels.clone()
        z = (h0 @ w0.T + b0).double()
        lab[0, 2], lab[1, 4], lab[2, 5] = int(z[0, 2].argmin()), int(z[1, 4].argmin()), int(z[2, 5].argmin())
        loss, metrics = rf.linear_ppo_loss(h, w, lab, old, adv, mask, bias=b, **kw)
        grads = torch.autograd.grad(loss, (h, w, b))
        h64, w64, b64 = (t.double().requires_grad_(True) for t in (h0, w0, b0))
        ref_loss, ref_metrics = reference(h64 @ w64.T + b64, lab, old, adv, mask, ref, kl_coef=kl_coef,
                                          entropy_coef=entropy_coef, agg=agg, temperature=temperature, **trunc)  # fmt: skip
        ref_grads = torch.autograd.grad(ref_loss, (h64, w64, b64))
    assert 0 < ref_metrics["truncation_miss_frac"] < 1  # the batch has missed tokens, and kept ones
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    errs = {"loss": rel(loss, ref_loss)}
    errs.update({f"grad{i}": rel(g, r) for i, (g, r) in enumerate(zip(grads, ref_grads))})
    errs.update({k: rel(metrics[k], v) for k, v in ref_metrics.items()})
    for name, err in errs.items():
        assert err <= 2e-5, f"{name}: relative error {err:.3g}"
    return metrics, errs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["logits", "linear"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_loss_metrics_and_gradients_against_float64(op, impl, agg):
    check(op, impl, agg=agg)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["logits", "linear"])
def test_hf_sampler_and_per_row_tensors(op, impl):
    check(op, impl, top_k=torch.tensor([5, 0, 9]), top_p=torch.tensor([0.85, 0.7, 1.0]), min_p=0.05, sampler="hf")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["logits", "linear"])
@pytest.mark.parametrize("mode", ["gspo", "cispo", "sapo"])
def test_other_loss_modes_mask_missed_tokens(op, impl, mode):
    """Every loss mode: the op equals rf.ppo_policy_loss on the truncated log-probs with the missed tokens'
    mask set to 0 (and rf.logprobs' truncated log-probs are checked in float64 in tests/test_truncation.py)."""
    logits, labels, old, adv, mask, _ = batch(seed=2)
    x = logits.clone().requires_grad_(True)
    if op == "logits":
        loss, metrics = rf.ppo_loss_from_logits(x, labels, old, adv, mask, loss_mode=mode, impl=impl, **TRUNC)
    else:  # logits = hidden @ I: hidden is the logits
        eye = torch.eye(logits.shape[-1])
        loss, metrics = rf.linear_ppo_loss(x, eye, labels, old, adv, mask, loss_mode=mode, impl=impl, **TRUNC)
    (grad,) = torch.autograd.grad(loss, x)
    y = logits.clone().requires_grad_(True)
    lp = rf.logprobs(y, labels, impl="torch", **TRUNC)
    mk = mask.masked_fill(torch.isinf(lp), 0.0)
    ref_loss, ref_metrics = rf.ppo_policy_loss(torch.where(mk != 0, lp, 0.0), old, adv, mk, loss_mode=mode)
    (ref_grad,) = torch.autograd.grad(ref_loss, y)
    assert metrics["truncation_miss_frac"] > 0 and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    for k in ref_metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["logits", "linear"])
def test_every_token_missed_gives_zero_not_nan(op, impl):
    logits, labels, old, adv, mask, ref = batch()
    labels = logits.argmin(-1)  # every label outside the kept set
    x = logits.clone().requires_grad_(True)
    kw = dict(ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, impl=impl, **TRUNC)
    if op == "logits":
        loss, metrics = rf.ppo_loss_from_logits(x, labels, old, adv, **kw)
    else:
        loss, metrics = rf.linear_ppo_loss(x, torch.eye(logits.shape[-1]), labels, old, adv, **kw)
    loss.backward()
    assert loss.item() == 0.0 and metrics["truncation_miss_frac"].item() == 1.0
    assert (x.grad == 0).all() and all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["logits", "linear"])
@pytest.mark.parametrize("off", [dict(top_k=0), dict(top_k=41, top_p=1.0, min_p=0.0, sampler="hf"),
                                 dict(top_k=torch.zeros(3, dtype=torch.int64), top_p=torch.ones(3, 6))])  # fmt: skip
def test_off_values_are_bitwise_no_ops(op, impl, off):
    logits, labels, old, adv, mask, ref = batch()
    outs = []
    for kw in ({}, off):
        x = logits.clone().requires_grad_(True)
        common = dict(ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, impl=impl, **kw)
        if op == "logits":
            loss, metrics = rf.ppo_loss_from_logits(x, labels, old, adv, mask, **common)
        else:
            loss, metrics = rf.linear_ppo_loss(x, torch.eye(logits.shape[-1]), labels, old, adv, mask, **common)
        (grad,) = torch.autograd.grad(loss, x)
        outs.append((loss, metrics, grad))
    (l0, m0, g0), (l1, m1, g1) = outs
    assert torch.equal(l0, l1) and torch.equal(g0, g1) and m0.keys() == m1.keys()
    assert "truncation_miss_frac" not in m1  # absent when off (README "Truncated sampling")
    assert all(torch.equal(m0[k], m1[k]) for k in m0)


@pytest.mark.parametrize("op", [rf.ppo_loss_from_logits, rf.linear_ppo_loss])
@pytest.mark.parametrize("kw, name", [(dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(min_p=1.0), "min_p"),
                                      (dict(top_k=3, sampler="x"), "sampler"),
                                      (dict(top_p=torch.ones(5)), "top_p")])  # fmt: skip
def test_bad_truncation_arguments_name_them(op, kw, name):
    logits, labels, old, adv, mask, _ = batch()
    args = (logits, labels) if op is rf.ppo_loss_from_logits else (logits, torch.eye(logits.shape[-1]), labels)
    with pytest.raises(ValueError, match=name):
        op(*args, old, adv, mask, impl="torch", **kw)
