"""One mask semantics for every op that takes a mask: entries are non-negative token weights.

``"token-mean"`` is ``sum(m L) / sum(m)``, every metric a weighted mean, ``masked_whiten`` a weighted mean
and variance; 0 means "not a token" and such tokens contribute nothing, gradients included, whatever the
other inputs hold there. Negative, NaN or infinite weights, and masks that are no tensor, are a
``ValueError`` naming ``mask``. The references below are float64 formulas written out here.
"""

import pytest
import torch
from conftest import IMPLS

import rlhf_fast as rf
from rlhf_fast.reference import logprobs_reference

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
# The mask: weights other than 0/1, a zero, and a row with every weight nonzero.
MASK = torch.tensor([[0.5, 2.0, 1.0, 0.0], [1.0, 1.0, 3.0, 1.0]])


def agg64(L, m, agg):
    """The four modes over float64 per-token values ``L`` and weights ``m``, straight from the API text."""
    L, m = L.double(), m.double()
    B, T = L.shape
    mL = torch.where(m != 0, m * L, 0.0)
    if agg == "token-mean":
        return mL.sum() / m.sum()
    if agg == "seq-mean-token-sum-norm":
        return mL.sum() / (B * T)
    rows = m.sum(1) > 0
    per_row = mL.sum(1) / m.sum(1) if agg == "seq-mean-token-mean" else mL.sum(1)
    return per_row[rows].mean()


def wmean64(x, m):
    m = m.double()
    return torch.where(m != 0, m * x.double(), 0.0).sum() / m.sum()


def _batch(seed=0, B=2, T=4, V=9):
    g = torch.Generator().manual_seed(seed)
    return dict(
        logits=torch.randn(B, T, V, generator=g) * 2,
        labels=torch.randint(0, V, (B, T), generator=g),
        old_logp=-torch.rand(B, T, generator=g) * 3,
        ref_logp=-torch.rand(B, T, generator=g) * 3,
        adv=torch.randn(B, T, generator=g),
        values=torch.randn(B, T, generator=g),
        old_values=torch.randn(B, T, generator=g),
        returns=torch.randn(B, T, generator=g),
    )


def _ppo64(d, m, agg, clip=0.2, kl_coef=0.1, entropy_coef=0.01):
    """Float64 PPO loss from logits (k3 KL, entropy bonus) and its weighted metrics."""
    logp, ent = logprobs_reference(d["logits"].double(), d["labels"])
    lr = logp - d["old_logp"].double()
    ratio = lr.exp()
    A = d["adv"].double()
    unclipped, clipped = -A * ratio, -A * ratio.clamp(1 - clip, 1 + clip)
    k = logp - d["ref_logp"].double()
    kl = torch.expm1(-k) + k
    L = torch.maximum(unclipped, clipped) + kl_coef * kl - entropy_coef * ent
    metrics = {
        "clipfrac": wmean64((clipped > unclipped).double(), m),
        "approx_kl": wmean64(-lr, m),
        "ratio_mean": wmean64(ratio, m),
        "entropy": wmean64(ent, m),
        "kl": wmean64(kl, m),
    }
    return agg64(L, m, agg), metrics


def _check_against(loss, metrics, ref_loss, ref_metrics, what):
    """A loss and every metric of ``_ppo64`` against its float64 values."""
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6, msg=what)
    for k, v in ref_metrics.items():
        torch.testing.assert_close(metrics[k].double(), v, rtol=1e-5, atol=1e-6, msg=f"{what} {k}")


def _check_composition(d, m, agg, ref_loss, ref_metrics):
    """The composition: ppo_policy_loss + aggregate of the KL and entropy terms, the same weights ``m``."""
    logp, ent = rf.logprobs(d["logits"], d["labels"], return_entropy=True)
    pg, metrics = rf.ppo_policy_loss(logp, d["old_logp"], d["adv"], m, agg=agg)
    kl = rf.kl_penalty(logp, d["ref_logp"], estimator="k3")
    loss = pg + 0.1 * rf.aggregate(kl, m, agg=agg) - 0.01 * rf.aggregate(ent, m, agg=agg)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for k in ("clipfrac", "approx_kl", "ratio_mean"):
        torch.testing.assert_close(metrics[k].double(), ref_metrics[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("agg", AGGS)
def test_every_policy_loss_reads_the_mask_as_weights(agg):
    """The issue's case: ppo_loss_from_logits (weights) and ppo_policy_loss / aggregate (any nonzero = 1)
    used to disagree, 0.383024 against 0.486880. Now all equal the float64 weighted formula."""
    d = _batch()
    ref_loss, ref_metrics = _ppo64(d, MASK, agg)
    for impl in IMPLS:
        loss, metrics = rf.ppo_loss_from_logits(d["logits"], d["labels"], d["old_logp"], d["adv"], MASK,
                                                ref_logp=d["ref_logp"], kl_coef=0.1, entropy_coef=0.01, agg=agg,
                                                impl=impl)  # fmt: skip
        _check_against(loss, metrics, ref_loss, ref_metrics, impl)
    _check_composition(d, MASK, agg, ref_loss, ref_metrics)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [None, 0.3])
def test_value_loss_weights(agg, clip):
    d = _batch(1)
    loss = rf.value_loss(d["values"], d["old_values"], d["returns"], MASK, clip=clip, agg=agg)
    v, old, R = (d[k].double() for k in ("values", "old_values", "returns"))
    L = (v - R) ** 2
    if clip is not None:
        L = torch.maximum(L, (old + (v - old).clamp(-clip, clip) - R) ** 2)
    torch.testing.assert_close(loss.double(), agg64(0.5 * L, MASK, agg), rtol=1e-6, atol=1e-7)


# Weights summing to less than 1: the whole batch, one row, and a row with no token at all.
SMALL_MASKS = [
    torch.tensor([[0.1, 0.1, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]]),
    torch.tensor([[0.1, 0.2, 0.0, 0.3], [0.5, 1.0, 2.0, 0.25]]),
    torch.tensor([[0.05, 0.0, 0.0, 0.0], [0.0, 0.01, 0.02, 0.0]]),
]


def test_weights_below_one_are_a_mean():
    """The issue's repro: a mask of 0.1s is a weighted mean of [1, 2, 3], -2.0; the denominator was clamped at 1
    (-0.6). An all-zero mask still gives a loss of 0 and a zero, finite gradient."""
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = rf.ppo_policy_loss(logp, logp.detach(), torch.tensor([[1.0, 2.0, 3.0]]), mask=torch.tensor([[0.1] * 3]))
    torch.testing.assert_close(loss, torch.tensor(-2.0))
    for agg in AGGS:
        loss, metrics = rf.ppo_policy_loss(logp, logp.detach(), torch.ones(1, 3), mask=torch.zeros(1, 3), agg=agg)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(1, 3)), agg
        assert all(torch.isfinite(v) for v in metrics.values()), agg
        logp.grad = None


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("mask", range(len(SMALL_MASKS)))
def test_weights_below_one_every_op(agg, mask):
    """Every op's loss and its metrics against the float64 formula, with weights summing to < 1 (over the batch
    or over a row): ppo_loss_from_logits and linear_ppo_loss in both impls (the Triton kernel takes the same
    aggregation weights), ppo_policy_loss, aggregate, value_loss."""
    m = SMALL_MASKS[mask]
    d = _batch(4)
    H = 6
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(2, 4, H, generator=g), torch.randn(9, H, generator=g)
    d["logits"] = hidden @ weight.T
    ref_loss, ref_metrics = _ppo64(d, m, agg)
    kw = dict(ref_logp=d["ref_logp"], kl_coef=0.1, entropy_coef=0.01, agg=agg)
    for impl in IMPLS:
        from_logits = rf.ppo_loss_from_logits(d["logits"], d["labels"], d["old_logp"], d["adv"], m, impl=impl, **kw)
        linear = rf.linear_ppo_loss(hidden, weight, d["labels"], d["old_logp"], d["adv"], m, impl=impl, **kw)
        for name, (loss, metrics) in (("ppo_loss_from_logits", from_logits), ("linear_ppo_loss", linear)):
            _check_against(loss, metrics, ref_loss, ref_metrics, f"{name} {impl}")
    _check_composition(d, m, agg, ref_loss, ref_metrics)
    v, old, R = (d[k].double() for k in ("values", "old_values", "returns"))
    L = torch.maximum((v - R) ** 2, (old + (v - old).clamp(-0.3, 0.3) - R) ** 2)
    vl = rf.value_loss(d["values"], d["old_values"], d["returns"], m, clip=0.3, agg=agg)
    torch.testing.assert_close(vl.double(), agg64(0.5 * L, m, agg), rtol=1e-6, atol=1e-7)


def test_masked_whiten_weights():
    x = _batch(2)["values"]
    out = rf.masked_whiten(x, MASK)
    m, xd = MASK.double(), x.double()
    mean = (m * xd).sum() / m.sum()
    var = (m * (xd - mean) ** 2).sum() / (m.sum() - 1)
    ref = torch.where(m != 0, (xd - mean) / torch.sqrt(var + 1e-8), 0.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # A 0/1 mask is the plain unbiased whitening of the selected entries (unchanged).
    sel = MASK != 0
    torch.testing.assert_close(rf.masked_whiten(x, sel.float()), rf.masked_whiten(x, sel))
    with pytest.raises(ValueError, match="mask"):
        rf.masked_whiten(x, torch.tensor([[0.5, 0.25, 0, 0], [0, 0, 0, 0.0]]))  # weights sum to <= 1


# ------------------------------------------------------------------------------- bad masks: ValueError


def _mask_ops(mask, impl):
    d = _batch()
    return {
        "ppo_loss_from_logits": lambda: rf.ppo_loss_from_logits(d["logits"], d["labels"], d["old_logp"], d["adv"],
                                                                mask, impl=impl),
        "ppo_policy_loss": lambda: rf.ppo_policy_loss(d["old_logp"], d["old_logp"], d["adv"], mask),
        "value_loss": lambda: rf.value_loss(d["values"], None, d["returns"], mask),
        "aggregate": lambda: rf.aggregate(d["values"], mask),
        "masked_whiten": lambda: rf.masked_whiten(d["values"], mask),
        "gae": lambda: rf.gae(d["adv"], d["values"], mask, impl=impl),
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", ["negative", "nan", "inf", "int_negative", "list"])
def test_bad_masks_raise_value_error_naming_mask(bad, impl):
    m = MASK.clone()
    if bad == "negative":
        m[1, 0] = -1.0  # used to flip the token's sign in ppo_loss_from_logits
    elif bad == "nan":
        m[0, 0] = float("nan")
    elif bad == "inf":
        m[0, 0] = float("inf")
    elif bad == "int_negative":
        m = torch.tensor([[1, 1, 0, 0], [1, -1, 1, 1]], dtype=torch.int8)
    else:
        m = [[1, 1, 1, 0], [1, 1, 1, 1]]  # a Python list: ppo_loss_from_logits raised AttributeError
    for name, call in _mask_ops(m, impl).items():
        with pytest.raises(ValueError, match="^mask"):
            call()


# ------------------------------------------------- masked tokens contribute nothing, gradients included


def _poison(t, m, value):
    return torch.where(m == 0, torch.full_like(t, value), t)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_masked_tokens_contribute_nothing(value, impl):
    """NaN or ±inf in any per-token input at masked-out tokens changes neither a loss nor a gradient.

    The torch impl of ppo_loss_from_logits gave NaN gradients (``where(w != 0, w * L, 0)`` differentiates
    to ``0 * inf``) from NaN/±inf advantages or -inf old log-probs there; the Triton kernel did not.
    """
    d = _batch(3)
    clean = {k: v.clone() for k, v in d.items()}
    dirty = {k: (_poison(v, MASK, value) if v.dim() == 2 and v.is_floating_point() else v.clone())
             for k, v in d.items()}  # fmt: skip

    def run(inputs, op):
        x = inputs["logits"].clone().requires_grad_(True)
        v = inputs["values"].clone().requires_grad_(True)
        lp = inputs["old_logp"].clone().requires_grad_(True)
        if op == "ppo_loss_from_logits":
            for kl_estimator in ("k1", "k2", "k3", "abs"):
                loss, metrics = rf.ppo_loss_from_logits(
                    x, inputs["labels"], inputs["old_logp"], inputs["adv"], MASK, ref_logp=inputs["ref_logp"],
                    kl_coef=0.1, kl_estimator=kl_estimator, entropy_coef=0.01, dual_clip=3.0, impl=impl)
                loss.backward()
            return [loss, *metrics.values()], [x.grad]
        if op == "ppo_policy_loss":
            loss, metrics = rf.ppo_policy_loss(lp, inputs["ref_logp"], inputs["adv"], MASK, dual_clip=3.0,
                                               is_weights=inputs["returns"].abs())  # fmt: skip
            loss.backward()
            return [loss, *metrics.values()], [lp.grad]
        if op == "value_loss":
            loss = rf.value_loss(v, inputs["old_values"], inputs["returns"], MASK, clip=0.2)
        elif op == "aggregate":
            loss = sum(rf.aggregate(v, MASK, agg=agg) for agg in AGGS)
        elif op == "masked_whiten":
            loss = (rf.masked_whiten(v, MASK) * torch.arange(8.0).view(2, 4)).sum()
        else:  # gae: no gradient; its outputs must not change
            return list(rf.gae(inputs["adv"], inputs["values"], MASK, gamma=0.9, impl=impl)), []
        loss.backward()
        return [loss], [v.grad]

    ops = ["ppo_loss_from_logits", "gae"] if impl != "torch" else [
        "ppo_loss_from_logits", "ppo_policy_loss", "value_loss", "aggregate", "masked_whiten", "gae"]
    for op in ops:
        outs, grads = run(dirty, op)
        ref_outs, ref_grads = run(clean, op)
        for o, r in zip(outs + grads, ref_outs + ref_grads):
            assert torch.isfinite(o).all(), op
            torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-7, msg=op)
