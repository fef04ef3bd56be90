"""rf.PolicyLossOptions: one checked, frozen object for the policy-loss options of rf.ppo_policy_loss,
rf.ppo_loss_from_logits and rf.linear_ppo_loss, taken as ``options=`` or as the same keywords."""

import dataclasses

import pytest
import torch
from conftest import IMPLS

import rlhf_fast as rf


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(loss_mode="grpo"), "loss_mode"),
        (dict(loss_mode=None), "loss_mode"),
        (dict(clip_low=0.0), "clip_low"),
        (dict(clip_low=None), "clip_low"),
        (dict(clip_low=True), "clip_low"),
        (dict(clip_high=float("nan")), "clip_high"),
        (dict(clip_high=-0.1), "clip_high"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(dual_clip=3.0, loss_mode="cispo"), "dual_clip"),
        (dict(delta=0.0), "delta"),
        (dict(delta=2.0, loss_mode="sapo"), "delta"),
        (dict(sapo_tau_pos=0.0), "sapo_tau_pos"),
        (dict(sapo_tau_neg=float("inf")), "sapo_tau_neg"),
        (dict(kl_coef=float("nan")), "kl_coef"),
        (dict(kl_coef="0.1"), "kl_coef"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(kl_bias_correction="yes"), "kl_bias_correction"),
        (dict(kl_bias_correction=1), "kl_bias_correction"),
        (dict(entropy_coef=None), "entropy_coef"),
        (dict(entropy_coef=True), "entropy_coef"),
        (dict(agg="mean"), "agg"),
        (dict(agg_norm=0.0), "agg_norm"),
        (dict(agg_norm=True), "agg_norm"),
        (dict(agg_norm=float("inf")), "agg_norm"),
        (dict(rollout_is="tis"), "rollout_is"),
        (dict(rollout_is="token_mask", rollout_is_cap=-1.0), "rollout_is_cap"),
        (dict(rollout_is_lower=0.5), "rollout_is_lower"),
        (dict(rollout_is="token_mask", rollout_is_lower=3.0), "rollout_is_lower"),
        (dict(rollout_is="icepop", rollout_is_cap=0.8), "rollout_is_lower"),  # the default 1 / cap >= cap
    ],
)
def test_object_rejects_each_bad_field_by_name(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        rf.PolicyLossOptions(**kwargs)


def test_object_is_frozen_hashable_and_compared_by_value():
    a = rf.PolicyLossOptions(loss_mode="gspo", clip_low=1, delta=2, agg_norm=3)
    b = rf.PolicyLossOptions(loss_mode="gspo", clip_low=1.0, delta=2.0, agg_norm=3.0)
    assert a == b and hash(a) == hash(b) and {a: "x"}[b] == "x"
    assert type(a.clip_low) is float and type(a.delta) is float and type(a.agg_norm) is float  # Triton gets floats
    assert a != dataclasses.replace(a, delta=2.5) and a != rf.PolicyLossOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.delta = 3.0
    with pytest.raises(ValueError, match="^clip_low"):
        dataclasses.replace(a, clip_low=-1.0)  # a copy is checked again
    # the fields keep what was given; the bounds the loss uses are derived
    assert rf.PolicyLossOptions(clip_low=0.3).clip_high is None
    assert rf.PolicyLossOptions(clip_low=0.3).clip_high_bound == 0.3
    assert rf.PolicyLossOptions(rollout_is="icepop", rollout_is_cap=4.0).rollout_is_lower_bound == 0.25


# ------------------------------------------------------------------------------ options= == the keywords

B, T, V, H = 2, 5, 11, 8
# Every field off its default, for the token-level route (the fused Triton kernel) and a sequence-level one.
FULL = dict(loss_mode="vanilla", clip_low=0.1, clip_high=0.3, dual_clip=2.5, delta=1.4, kl_coef=0.07,
            kl_estimator="k2", kl_bias_correction=True, entropy_coef=0.02, agg="seq-mean-token-mean", agg_norm=5.0,
            rollout_is="token_mask", rollout_is_cap=1.6, rollout_is_lower=0.7)  # fmt: skip
OPTION_SETS = {
    "vanilla": FULL,
    "sapo": dict(loss_mode="sapo", sapo_tau_pos=0.6, sapo_tau_neg=1.7, rollout_is="icepop", agg="seq-mean-token-sum",
                 kl_coef=0.05, kl_estimator="abs", entropy_coef=-0.01),  # fmt: skip
    "gspo": dict(FULL, loss_mode="gspo", rollout_is="sequence_truncate", rollout_is_lower=None),
}
NO_KL = ("kl_coef", "kl_estimator", "kl_bias_correction", "entropy_coef")


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, -1] = -100
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old = logp + 0.4 * torch.randn(B, T, generator=g)
    ref = logp + 0.4 * torch.randn(B, T, generator=g)
    rollout = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = (labels != -100).float()
    return hidden, weight, labels, old, ref, rollout, adv, mask


def _run(op: str, impl: str, seed: int, **kw):
    """``(loss, metrics, gradient)`` of one call of ``op`` on the inputs of ``seed``."""
    hidden, weight, labels, old, ref, rollout, adv, mask = _inputs(seed)
    if op == "ppo_policy_loss":
        x = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        x = x.detach().requires_grad_(True)
        loss, metrics = rf.ppo_policy_loss(x, old, adv, mask, rollout_logp=rollout, **kw)
    elif op == "ppo_loss_from_logits":
        x = (hidden @ weight.T).requires_grad_(True)
        loss, metrics = rf.ppo_loss_from_logits(x, labels, old, adv, mask, ref_logp=ref, rollout_logp=rollout,
                                                temperature=0.9, impl=impl, **kw)  # fmt: skip
    else:
        x = hidden.requires_grad_(True)
        loss, metrics = rf.linear_ppo_loss(x, weight, labels, old, adv, mask, ref_logp=ref, rollout_logp=rollout,
                                           temperature=0.9, impl=impl, **kw)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, x)
    return loss, metrics, grad


OPS = ["ppo_policy_loss", "ppo_loss_from_logits", "linear_ppo_loss"]


@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_options_object_gives_bitwise_the_keywords_result(op, impl, name):
    if op == "ppo_policy_loss" and impl != "torch":
        pytest.skip("rf.ppo_policy_loss has one implementation")
    kw = {k: v for k, v in OPTION_SETS[name].items() if not (op == "ppo_policy_loss" and k in NO_KL)}
    by_keywords = _run(op, impl, 0, **kw)
    by_object = _run(op, impl, 0, options=rf.PolicyLossOptions(**kw))
    assert torch.equal(by_keywords[0], by_object[0])
    assert by_keywords[1].keys() == by_object[1].keys()
    for key in by_keywords[1]:
        assert torch.equal(by_keywords[1][key], by_object[1][key]), key
    assert torch.equal(by_keywords[2], by_object[2])
    # and the options really reach the loss: the defaults give another loss and gradient
    default = _run(op, impl, 0, options=rf.PolicyLossOptions(rollout_is="token_truncate"))
    assert not torch.equal(default[0], by_object[0]) and not torch.equal(default[2], by_object[2])


@pytest.mark.parametrize("field,value", [("delta", 1.5), ("agg", "token-mean"), ("kl_coef", 0.0), ("rollout_is_cap", 3.0)])
@pytest.mark.parametrize("op", OPS)
def test_options_and_the_same_keyword_is_refused_naming_the_field(op, field, value):
    options = rf.PolicyLossOptions(rollout_is="token_truncate")
    with pytest.raises(ValueError, match=f"^{field} is given both as a keyword and by options="):
        _run(op, "torch", 0, options=options, **{field: value})


@pytest.mark.parametrize("op", OPS)
def test_unknown_keyword_and_bad_options_type(op):
    with pytest.raises(TypeError, match=f"{op}\\(\\) got an unexpected keyword argument 'clip'"):
        _run(op, "torch", 0, rollout_is="token_truncate", clip=0.2)
    with pytest.raises(ValueError, match="^options must be a rf.PolicyLossOptions"):
        _run(op, "torch", 0, options={"rollout_is": "token_truncate"})


@pytest.mark.parametrize("field,value", [("kl_coef", 0.1), ("entropy_coef", -0.01)])
def test_ppo_policy_loss_refuses_a_kl_or_entropy_term(field, value):
    logp, old, adv = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=f"^{field} must be 0 for rf.ppo_policy_loss"):
        rf.ppo_policy_loss(logp, old, adv, options=rf.PolicyLossOptions(**{field: value}))
    with pytest.raises(ValueError, match=f"^{field} must be 0 for rf.ppo_policy_loss"):
        rf.ppo_policy_loss(logp, old, adv, **{field: value})
    # zero is no term: accepted, and the same loss as without it
    zero = rf.ppo_policy_loss(logp, old, adv, **{field: 0.0})[0]
    assert torch.equal(zero, rf.ppo_policy_loss(logp, old, adv)[0])
