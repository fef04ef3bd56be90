"""The trainer / rollout mismatch metrics of the loss ops (rf.ppo_policy_loss, rf.ppo_loss_from_logits,
rf.linear_ppo_loss):
``rollout_kl_k3`` and ``rollout_ratio_outside_frac`` whenever ``rollout_logp`` is given, with or without
``rollout_is``, against float64 written out here. Direction (NeMo-RL's gen_kl_error, NVIDIA-NeMo/RL
nemo_rl/algorithms/loss_functions.py at commit b816b57be28b177ace79c363c73ee79ddbc4b309: "kl(P_gen ||
P_train) where log_ratio = prev_logprobs - generation_logprobs"): k3 = r - 1 - log r, r = pi_train / pi_rollout."""

import pytest
import torch
from conftest import IMPLS

import rlhf_fast as rf
from rlhf_fast.reference import logprobs_reference, truncated_logprobs_reference


def batch(B=3, T=7, V=29, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen) * 2
    labels = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T)
    mask[0, :2] = 0
    mask[2, 5:] = 0.5  # fractional weights count as weights
    old = torch.randn(B, T, generator=gen) - 3
    adv = torch.randn(B, T, generator=gen)
    with torch.no_grad():
        lp, _ = logprobs_reference(logits.double(), labels)
    # trainer / rollout log-ratios from tiny (k3 ~ d^2 / 2 cancels in float32) to beyond the band
    d = torch.tensor([1e-4, -3e-4, 2e-3, 0.05, -0.08, 0.12, -0.2] * B).view(B, T).double()
    rollout = (lp - d).float()
    rollout[0, 0] = -float("inf")  # garbage under mask 0: ignored
    return logits, labels, old, adv, mask, rollout


def expected(logp64, rollout, mask):
    m = mask.double()
    on = m != 0
    d = torch.where(on, logp64 - rollout.double(), 0.0)
    k3 = torch.exp(d) - 1 - d  # float64: exact enough at |d| >= 1e-4 for a 1e-6 relative check
    outside = (torch.exp(d) < 0.9) | (torch.exp(d) > 1.1)
    return (m * k3).sum() / m.sum(), (m * outside).sum() / m.sum()


def run(op, impl, logits, labels, old, adv, mask, **kw):
    if op == "logits":
        return rf.ppo_loss_from_logits(logits, labels, old, adv, mask, impl=impl, **kw)
    return rf.linear_ppo_loss(logits, torch.eye(logits.shape[-1]), labels, old, adv, mask, impl=impl, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["logits", "linear"])
@pytest.mark.parametrize("rollout_is", [None, "token_truncate"])
def test_mismatch_metrics_against_float64(op, impl, rollout_is):
    logits, labels, old, adv, mask, rollout = batch()
    kw = dict(rollout_logp=rollout) if rollout_is is None else dict(rollout_logp=rollout, rollout_is=rollout_is)
    loss, metrics = run(op, impl, logits, labels, old, adv, mask, **kw)
    lp64, _ = logprobs_reference(logits.double(), labels)
    kl, frac = expected(lp64, rollout, mask)
    assert kl > 0 and 0 < frac < 1
    torch.testing.assert_close(metrics["rollout_kl_k3"].double(), kl, rtol=2e-5, atol=0)
    torch.testing.assert_close(metrics["rollout_ratio_outside_frac"].double(), frac, rtol=1e-6, atol=0)
    if rollout_is is None:  # metrics only: the loss is the loss without rollout_logp, bitwise
        plain, plain_metrics = run(op, impl, logits, labels, old, adv, mask)
        assert torch.equal(loss, plain) and "rollout_is_mean" not in metrics
        assert all(torch.equal(plain_metrics[k], metrics[k]) for k in plain_metrics)
    else:
        assert "rollout_is_mean" in metrics


@pytest.mark.parametrize("op", ["logits", "linear"])
def test_mismatch_metrics_under_truncation_use_the_truncated_logprobs(op):
    logits, labels, old, adv, mask, _ = batch(seed=1)
    labels = logits.topk(3, -1).indices[..., 1]  # kept by top_k=5
    lp64, _ = truncated_logprobs_reference(logits.double(), labels, top_k=5)
    rollout = (lp64 - 0.05).float()
    _, metrics = run(op, "torch", logits, labels, old, adv, mask, rollout_logp=rollout, top_k=5)
    kl, frac = expected(lp64, rollout, mask)
    torch.testing.assert_close(metrics["rollout_kl_k3"].double(), kl, rtol=2e-5, atol=0)
    assert metrics["rollout_ratio_outside_frac"] == frac == 0  # e^0.05 = 1.051: inside the band


@pytest.mark.parametrize("rollout_is", [None, "token_truncate"])
def test_ppo_policy_loss_reports_the_mismatch_against_float64(rollout_is):
    """rf.ppo_policy_loss (from [B, T] log-probs) reports the same two metrics whenever rollout_logp is given;
    alone, it changes neither the loss, nor its gradient, nor the other metrics."""
    logits, labels, old, adv, mask, rollout = batch()
    lp64, _ = logprobs_reference(logits.double(), labels)
    logp = lp64.float().requires_grad_()
    kw = dict(rollout_logp=rollout) if rollout_is is None else dict(rollout_logp=rollout, rollout_is=rollout_is)
    loss, metrics = rf.ppo_policy_loss(logp, old, adv, mask, **kw)
    kl, frac = expected(logp.detach().double(), rollout, mask)
    assert kl > 0 and 0 < frac < 1
    torch.testing.assert_close(metrics["rollout_kl_k3"].double(), kl, rtol=2e-5, atol=0)
    torch.testing.assert_close(metrics["rollout_ratio_outside_frac"].double(), frac, rtol=1e-6, atol=0)
    if rollout_is is None:
        (grad,) = torch.autograd.grad(loss, logp)
        plain_logp = logp.detach().clone().requires_grad_()
        plain, plain_metrics = rf.ppo_policy_loss(plain_logp, old, adv, mask)
        (plain_grad,) = torch.autograd.grad(plain, plain_logp)
        assert torch.equal(loss, plain) and torch.equal(grad, plain_grad) and "rollout_is_mean" not in metrics
        assert set(metrics) == set(plain_metrics) | {"rollout_kl_k3", "rollout_ratio_outside_frac"}
        assert all(torch.equal(plain_metrics[k], metrics[k]) for k in plain_metrics)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_three_loss_ops_report_the_same_mismatch(impl):
    """On the same tokens (rf.ppo_policy_loss given the log-probs the other two compute), the three loss
    ops report the same mismatch metrics."""
    logits, labels, old, adv, mask, rollout = batch(seed=2)
    logp = rf.logprobs(logits, labels, impl=impl)
    _, from_logp = rf.ppo_policy_loss(logp, old, adv, mask, rollout_logp=rollout)
    _, from_logits = run("logits", impl, logits, labels, old, adv, mask, rollout_logp=rollout)
    _, from_hidden = run("linear", impl, logits, labels, old, adv, mask, rollout_logp=rollout)
    lp64, _ = logprobs_reference(logits.double(), labels)
    kl, frac = expected(lp64, rollout, mask)
    for metrics in (from_logp, from_logits, from_hidden):
        torch.testing.assert_close(metrics["rollout_kl_k3"].double(), kl, rtol=2e-5, atol=0)
        torch.testing.assert_close(metrics["rollout_ratio_outside_frac"].double(), frac, rtol=1e-6, atol=0)


def test_the_pairing_rule_present_only_with_rollout_logp():
    """rollout_logp alone is accepted by every loss op (metrics only); rollout_is always needs rollout_logp;
    no rollout_logp: no mismatch metrics."""
    logits, labels, old, adv, mask, rollout = batch()
    _, metrics = rf.ppo_loss_from_logits(logits, labels, old, adv, mask)
    _, with_rollout = rf.ppo_loss_from_logits(logits, labels, old, adv, mask, rollout_logp=rollout)
    assert {"rollout_kl_k3", "rollout_ratio_outside_frac"} <= with_rollout.keys()
    assert "rollout_kl_k3" not in metrics and "rollout_ratio_outside_frac" not in metrics
    _, plain = rf.ppo_policy_loss(old, old, adv, mask)
    assert "rollout_kl_k3" not in plain and "rollout_ratio_outside_frac" not in plain
    for op_call in (lambda **kw: rf.ppo_policy_loss(old, old, adv, mask, **kw),
                    lambda **kw: rf.ppo_loss_from_logits(logits, labels, old, adv, mask, **kw)):  # fmt: skip
        with pytest.raises(ValueError, match="rollout_logp"):
            op_call(rollout_is="token_mask")
