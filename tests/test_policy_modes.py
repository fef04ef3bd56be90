"""The policy-loss options of issue 14 beyond the peers' comparisons (tests/test_policy_trl.py,
tests/test_policy_verl.py): low precision no worse than eager, masked tokens contribute nothing in every
mode, defaults unchanged, bad arguments."""

import pytest
import torch
from conftest import IMPLS
from reference import assert_no_worse, logprobs_plain_same_dtype
from test_policy_verl import _verl_loss, verl_agg

import rlhf_fast as rf

MODES = [
    ("vanilla", dict(dual_clip=3.0)),
    ("gspo", dict(agg="seq-mean-token-mean", clip_low=0.05, clip_high=0.06)),
    ("cispo", dict()),
    ("sapo", dict(agg="seq-mean-token-mean")),
    ("geo_mean", dict(agg="seq-mean-token-mean")),
]


def _batch(B=3, T=6, V=41, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    m = torch.ones(B, T)
    m[1, 4:] = 0
    m[2, 1] = 0
    labels[m == 0] = -100
    lp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * m
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    rollout = (old + 0.4 * torch.randn(B, T, generator=g)).float()
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    return logits, labels, old, ref, rollout, adv, m


def clean_then_garbage(m, old, adv, ref, rollout):
    """Copies of the per-token inputs ``(old, adv, ref, rollout)`` twice: as they are, then with garbage (NaN, inf)
    at every token of weight 0 (``m == 0``), where a loss must not look."""
    for garbage in (False, True):
        o, a, r, ro = old.clone(), adv.clone(), ref.clone(), rollout.clone()
        if garbage:
            off = m == 0
            o[off], a[off], r[off], ro[off] = float("nan"), float("inf"), -float("inf"), float("nan")
        yield o, a, r, ro


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode,kw", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_eager(impl, mode, kw, dtype):
    """bf16/fp16 logits: loss and gradient against float64 on the same rounded logits, no worse than the
    eager composition in the input dtype (log-softmax and the loss formulas in bf16/fp16)."""
    logits, labels, old, ref, _, adv, m = _batch(V=300, seed=1, dtype=dtype)
    agg = kw.get("agg", "token-mean")
    x = logits.clone().requires_grad_(True)
    loss, _ = rf.ppo_loss_from_logits(x, labels, old, adv, m, ref_logp=ref, kl_coef=0.1, entropy_coef=0.02,
                                      loss_mode=mode, impl=impl, **kw)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == dtype

    def composed(logits_in, cast):
        xx = logits_in.detach().clone().requires_grad_(True)
        lp_all = torch.log_softmax(xx, -1)
        logp = lp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * cast(m)
        ent = -(lp_all.exp() * lp_all).sum(-1)
        k = torch.exp(cast(ref) - logp) - 1 + (logp - cast(ref))
        mm = cast(m)
        total = _verl_loss(mode, logp, cast(old), cast(adv), mm, kw) + 0.1 * verl_agg(k, mm, agg) - 0.02 * verl_agg(ent, mm, agg)
        return total, torch.autograd.grad(total, xx)[0]

    ref_loss, ref_grad = composed(logits.double(), lambda t: t.double())
    eager_loss, eager_grad = composed(logits, lambda t: t.to(dtype))
    assert_no_worse("loss", loss, eager_loss, ref_loss)
    assert_no_worse("grad", grad, eager_grad, ref_grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode,kw", MODES)
@pytest.mark.parametrize("rollout_is", [None, "sequence_mask", "token_truncate"])
def test_masked_tokens_contribute_nothing(impl, mode, kw, rollout_is):
    """Garbage (NaN, inf) in every per-token input at tokens of weight 0 changes neither the loss, its
    gradient nor the metrics, in every mode, with the KL's bias correction and the rollout weights."""
    logits, labels, old, ref, rollout, adv, m = _batch(seed=2)
    extra = dict(rollout_logp=rollout, rollout_is=rollout_is) if rollout_is else {}
    outs = []
    for o, a, r, ro in clean_then_garbage(m, old, adv, ref, rollout):
        if rollout_is:
            extra["rollout_logp"] = ro
        x = logits.clone().requires_grad_(True)
        loss, metrics = rf.ppo_loss_from_logits(x, labels, o, a, m, ref_logp=r, kl_coef=0.1, entropy_coef=0.01,
                                                loss_mode=mode, kl_bias_correction=True, impl=impl, **kw, **extra)  # fmt: skip
        (grad,) = torch.autograd.grad(loss, x)
        outs.append((loss, grad, metrics))
    assert torch.isfinite(outs[1][0]) and torch.isfinite(outs[1][1]).all()
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for k in outs[0][2]:
        torch.testing.assert_close(outs[0][2][k], outs[1][2][k], msg=k)


@pytest.mark.parametrize("impl", IMPLS)
def test_defaults_are_todays_loss(impl):
    """The new arguments at their defaults give exactly the loss and gradient of the clipped objective
    (the fused kernel with impl="triton"), and explicit defaults equal omitted ones."""
    logits, labels, old, ref, _, adv, m = _batch(seed=3)
    outs = []
    for kw in ({}, dict(loss_mode="vanilla", delta=None, agg_norm=None, rollout_logp=None, rollout_is=None,
                        rollout_is_cap=2.0, kl_bias_correction=False)):  # fmt: skip
        x = logits.clone().requires_grad_(True)
        loss, metrics = rf.ppo_loss_from_logits(x, labels, old, adv, m, ref_logp=ref, kl_coef=0.1, impl=impl, **kw)
        outs.append((loss, torch.autograd.grad(loss, x)[0], metrics))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert set(outs[0][2]) == {"clipfrac", "approx_kl", "ratio_mean", "ratio_max", "entropy", "kl"}


def test_rollout_is_icepop_band_default():
    """icepop masks outside [1/cap, cap] by default; token_mask has no lower bound unless given."""
    logp = torch.zeros(1, 4)
    old = torch.zeros(1, 4)
    rollout = torch.log(torch.tensor([[1 / 0.3, 1 / 0.7, 1.0, 1 / 2.5]]))  # weights 0.3, 0.7, 1, 2.5
    adv = torch.ones(1, 4)
    _, icepop = rf.ppo_policy_loss(logp, old, adv, rollout_logp=rollout, rollout_is="icepop", rollout_is_cap=2.0)
    _, tmask = rf.ppo_policy_loss(logp, old, adv, rollout_logp=rollout, rollout_is="token_mask", rollout_is_cap=2.0)
    assert icepop["rollout_is_masked_frac"].item() == pytest.approx(0.5)  # 0.3 and 2.5
    assert icepop["rollout_is_mean"].item() == pytest.approx((0.7 + 1.0) / 4)
    assert tmask["rollout_is_masked_frac"].item() == pytest.approx(0.25)  # 2.5 only
    assert tmask["rollout_is_mean"].item() == pytest.approx((0.3 + 0.7 + 1.0) / 4)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(loss_mode="grpo"), "loss_mode"),
        (dict(loss_mode="cispo", delta=2.0), "delta"),
        (dict(loss_mode="sapo", dual_clip=3.0), "dual_clip"),
        (dict(delta=0.0), "delta"),
        (dict(agg_norm=0.0), "agg_norm"),
        (dict(agg_norm=True), "agg_norm"),
        (dict(rollout_is="token_truncate"), "rollout_logp"),
        (dict(rollout_logp=torch.zeros(2, 3), rollout_is="tis"), "rollout_is"),
        (dict(rollout_logp=torch.zeros(2, 4), rollout_is="token_mask"), "rollout_logp"),
        (dict(rollout_logp=torch.zeros(2, 3), rollout_is="token_mask", rollout_is_cap=-1.0), "rollout_is_cap"),
        (dict(rollout_logp=torch.zeros(2, 3), rollout_is="token_mask", rollout_is_lower=3.0), "rollout_is_lower"),
        (dict(sapo_tau_neg=0.0), "sapo_tau_neg"),
        (dict(rollout_is_lower=0.5), "rollout_is_lower"),
    ],
)
@pytest.mark.parametrize("op", ["ppo_policy_loss", "ppo_loss_from_logits"])
def test_bad_policy_arguments_raise(kwargs, arg, op):
    if op == "ppo_policy_loss":
        args = (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    else:
        args = (torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=arg):
        getattr(rf, op)(*args, **kwargs)


def test_kl_bias_correction_must_be_bool():
    with pytest.raises(ValueError, match="kl_bias_correction"):
        rf.ppo_loss_from_logits(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3),
                                torch.zeros(2, 3), kl_bias_correction="yes")  # fmt: skip
