"""rf.ppo_loss_from_logits against the eager composition in float64, through both impls."""

import pytest
import torch
from conftest import IMPLS

import rlhf_fast as rf
from rlhf_fast._agg import AGG_MODES
from rlhf_fast.reference import kl_penalty_reference, logprobs_reference, ppo_loss_reference


def _batch(B, T, V, device, dtype=torch.float32, *, adv_shape="bt", holes=True, scale=2.0):
    logits = (torch.randn(B, T, V, device=device) * scale).to(dtype)
    labels = torch.randint(0, V, (B, T), device=device)
    with torch.no_grad():
        true_logp, _ = logprobs_reference(logits.double(), labels)
    # old/ref log-probs near the current ones, so that some ratios fall inside and some outside the clip
    old_logp = (true_logp + 0.3 * torch.randn(B, T, device=device, dtype=torch.float64)).float()
    ref_logp = (true_logp + 0.5 * torch.randn(B, T, device=device, dtype=torch.float64)).float()
    advantages = torch.randn((B, T) if adv_shape == "bt" else (B,), device=device)
    lengths = torch.randint(0, T + 1, (B,), device=device)
    lengths[0] = T
    mask = (torch.arange(T, device=device)[None] < lengths[:, None]).float()
    if holes:
        mask[:, 1::4] = 0  # holes, and a row (if lengths hit 0) with no token at all
    labels[mask == 0] = -100  # padding labels are ignored, as a trainer writes them
    return logits, labels, old_logp, advantages, mask, ref_logp


def check_ppo(impl, logits, labels, old_logp, advantages, mask, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss, metrics = rf.ppo_loss_from_logits(x, labels, old_logp, advantages, mask, impl=impl, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == logits.dtype

    xd = logits.detach().double().requires_grad_(True)
    ref_kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_loss = ppo_loss_reference(xd, labels, old_logp.double(), advantages.double(), mask, **ref_kw)
    (ref_grad,) = torch.autograd.grad(ref_loss, xd)
    tol = 1e-5 if logits.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * max(1e-3, ref_grad.abs().max().item()))
    return loss, metrics, grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_every_aggregation(impl, agg, device):
    batch = _batch(4, 9, 301, device)
    check_ppo(impl, *batch[:5], ref_logp=batch[5], kl_coef=0.1, entropy_coef=0.01, agg=agg)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_kl_estimators(impl, estimator, device):
    batch = _batch(3, 7, 257, device)
    check_ppo(impl, *batch[:5], ref_logp=batch[5], kl_coef=0.2, kl_estimator=estimator)


@pytest.mark.parametrize("impl", IMPLS)
def test_asymmetric_and_dual_clip_with_sequence_advantages(impl, device):
    logits, labels, old_logp, adv, mask, _ = _batch(6, 8, 200, device, adv_shape="b")
    labels = labels.clamp(min=0)
    mask = torch.ones_like(mask)
    mask[1, 3:] = 0
    # ratios from e^-2 to e^2: both clip bounds and the dual clip (ratio > 3 with A < 0) are active
    logp, _ = logprobs_reference(logits.double() / 0.7, labels)
    old_logp = (logp - torch.linspace(-2, 2, 48, device=device, dtype=torch.float64).view(6, 8)).float()
    adv[::2] = -adv[::2].abs()
    _, metrics, _ = check_ppo(impl, logits, labels, old_logp, adv, mask, clip_low=0.1, clip_high=0.28,
                              dual_clip=3.0, temperature=0.7)  # fmt: skip
    assert 0 < metrics["dual_clipfrac"] < 1 and 0 < metrics["clipfrac"] < 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_small_log_ratio_kl_is_accurate(impl, estimator, device):
    """k3 = e^-lr - 1 + lr cancels catastrophically in float32 for small lr; the op must not."""
    logits, labels, _, _, _, _ = _batch(4, 16, 100, device, holes=False)
    logp, _ = logprobs_reference(logits.double(), labels)
    ref_logp = (logp + torch.empty_like(logp).uniform_(-0.04, 0.04)).float()
    kw = dict(ref_logp=ref_logp, kl_coef=1.0, kl_estimator=estimator)
    loss, _ = rf.ppo_loss_from_logits(logits, labels, logp.float(), torch.zeros(4, 16, device=device), impl=impl, **kw)
    expected = kl_penalty_reference(logp, ref_logp.double(), estimator).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(impl, dtype, device):
    batch = _batch(3, 5, 2100, device, dtype=dtype)
    check_ppo(impl, *batch[:5], ref_logp=batch[5], kl_coef=0.05, entropy_coef=0.02)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_mask_and_non_contiguous(impl, device):
    logits, labels, old_logp, adv, _, ref = _batch(3, 8, 150, device, holes=False)
    wide = torch.randn(3, 9, 170, device=device)
    wide[:, :-1, :150] = logits
    check_ppo(impl, wide[:, :-1, :150], labels.clamp(min=0), old_logp, adv, None, ref_logp=ref, kl_coef=0.1)


@pytest.mark.parametrize("impl", IMPLS)
def test_metrics(impl, device):
    logits, labels, old_logp, adv, mask, ref = _batch(4, 10, 120, device)
    loss, metrics, _ = check_ppo(impl, logits, labels, old_logp, adv, mask, ref_logp=ref, kl_coef=0.1,
                                 clip_low=0.2, clip_high=0.3)  # fmt: skip
    logp, entropy = logprobs_reference(logits.double(), labels)
    m = mask > 0
    ratio = torch.exp(logp - old_logp.double())[m]
    a = adv.double()[m]
    clipped = (-a * ratio.clamp(0.8, 1.3)) > (-a * ratio)
    expected = {
        "clipfrac": clipped.double().mean(),
        "approx_kl": (old_logp.double() - logp)[m].mean(),
        "ratio_mean": ratio.mean(),
        "ratio_max": ratio.max(),
        "entropy": entropy[m].mean(),
        "kl": kl_penalty_reference(logp, ref.double(), "k3")[m].mean(),
    }
    for name, value in expected.items():
        torch.testing.assert_close(metrics[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
        assert not metrics[name].requires_grad


@pytest.mark.parametrize("impl", IMPLS)
def test_impls_agree(impl, device):
    if impl == "torch":
        pytest.skip("compares triton to torch")
    logits, labels, old_logp, adv, mask, ref = _batch(4, 16, 3000, device, dtype=torch.bfloat16)
    kw = dict(ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, dual_clip=2.5, agg="seq-mean-token-mean")
    outs = []
    for i in ("torch", "triton"):
        x = logits.clone().requires_grad_(True)
        loss, metrics = rf.ppo_loss_from_logits(x, labels, old_logp, adv, mask, impl=i, **kw)
        outs.append((loss, torch.autograd.grad(loss, x)[0], metrics))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1].float(), outs[1][1].float(), rtol=2e-2, atol=1e-4)
    for k in outs[0][2]:
        torch.testing.assert_close(outs[0][2][k], outs[1][2][k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_tokens_gives_zero_loss_not_nan(impl, device):
    logits, labels, old_logp, adv, mask, _ = _batch(2, 4, 50, device)
    x = logits.clone().requires_grad_(True)
    loss, metrics = rf.ppo_loss_from_logits(x, labels, old_logp, adv, torch.zeros_like(mask), impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(logits=torch.randn(2, 3, 5, dtype=torch.float64)), "logits"),
        (dict(logits=torch.randn(6, 5)), "logits"),
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "labels"),
        (dict(labels=torch.full((2, 3), 5)), "labels"),
        (dict(old_logp=torch.zeros(2, 4)), "old_logp"),
        (dict(old_logp=None), "old_logp"),
        (dict(advantages=torch.zeros(3)), "advantages"),
        (dict(mask=torch.ones(2, 4)), "mask"),
        (dict(ref_logp=torch.zeros(3, 3)), "ref_logp"),
        (dict(kl_coef=0.1), "ref_logp"),
        (dict(kl_estimator="k4", ref_logp=torch.zeros(2, 3)), "kl_estimator"),
        (dict(clip_low=0.0), "clip_low"),
        (dict(clip_high=-0.1), "clip_high"),
        (dict(dual_clip=0.9), "dual_clip"),
        (dict(agg="mean"), "agg"),
        (dict(temperature=0.0), "temperature"),
        (dict(entropy_coef="a"), "entropy_coef"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, arg):
    args = dict(logits=torch.randn(2, 3, 5), labels=torch.zeros(2, 3, dtype=torch.long),
                old_logp=torch.zeros(2, 3), advantages=torch.zeros(2, 3))  # fmt: skip
    args.update(kwargs)
    pos = [args.pop(k) for k in ("logits", "labels", "old_logp", "advantages")]
    with pytest.raises(ValueError, match=arg):
        rf.ppo_loss_from_logits(*pos, **args)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_empty_batch_raises(agg):
    """B = 0 is a ValueError naming the argument for every agg (with "seq-mean-token-sum-norm" it used to
    end in "logp is empty", an argument of another op)."""
    with pytest.raises(ValueError, match="^logits has no tokens"):
        rf.ppo_loss_from_logits(torch.randn(0, 3, 5), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3),
                                torch.zeros(0, 3), agg=agg)  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_big_vocab_cuda(impl):
    batch = _batch(2, 64, 151936, "cuda", dtype=torch.bfloat16)
    check_ppo(impl, *batch[:5], ref_logp=batch[5], kl_coef=0.05, entropy_coef=0.01)
