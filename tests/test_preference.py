"""rf.pairwise_sigmoid_loss (both impls) and rf.dpo_loss against float64 written from the API formulas.

The float64 references use ``logaddexp(0, -x)`` for ``-log sigmoid(x)`` (exact in float64, no shared
code with the implementation); "plain PyTorch in the same dtype" is rlhf_fast.reference (TRL's code).
"""

import math

import pytest
import torch
from conftest import DEVICE, IMPLS, SEEDS, random_cases
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assert_no_worse

import rlhf_fast as rf
from rlhf_fast.reference import dpo_loss_reference, pairwise_sigmoid_loss_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]


def reduce_f64(losses, reduction):
    return losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else losses


def neg_log_sigmoid_f64(x):
    return torch.logaddexp(torch.zeros_like(x), -x)


# ------------------------------------------------------------------------------------ pairwise sigmoid


def pairwise_f64(chosen, rejected, margin, beta, reduction):
    """``(loss, [grads of chosen, rejected, margin tensor], metrics)`` in float64 for grad_output ``g``."""
    c = chosen.detach().double().requires_grad_(True)
    r = rejected.detach().double().requires_grad_(True)
    m = margin.detach().double().reshape(c.shape).requires_grad_(True) if isinstance(margin, torch.Tensor) else margin
    x = beta * (c - r) - (0.0 if m is None else m)
    loss = reduce_f64(neg_log_sigmoid_f64(x), reduction)
    d = (c - r).detach()
    metrics = {"accuracy": (d > 0).double().mean(), "margin": d.mean()}

    def grads(g):
        inputs = [c, r] + ([m] if isinstance(m, torch.Tensor) else [])
        return torch.autograd.grad((loss * g.double()).sum(), inputs, retain_graph=True)

    return loss.detach(), grads, metrics


def check_pairwise(chosen, rejected, impl, *, margin=None, beta=1.0, reduction="mean"):
    leaves = [chosen.detach().clone().requires_grad_(True), rejected.detach().clone().requires_grad_(True)]
    m = margin
    if isinstance(margin, torch.Tensor):
        m = margin.detach().clone().requires_grad_(True)
        leaves.append(m)
    loss, metrics = rf.pairwise_sigmoid_loss(
        leaves[0], leaves[1], margin=m, beta=beta, reduction=reduction, impl=impl, return_metrics=True
    )
    assert loss.dtype == torch.float32
    assert loss.shape == (chosen.shape if reduction == "none" else ())
    g = torch.randn_like(loss) if reduction == "none" else torch.tensor(1.3, device=loss.device)
    grads = torch.autograd.grad((loss * g).sum(), leaves)
    for grad, leaf in zip(grads, leaves):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape

    ref_loss, ref_grads, ref_metrics = pairwise_f64(chosen, rejected, margin, beta, reduction)
    plain = [t.detach().clone().requires_grad_(True) for t in leaves]
    plain_loss = pairwise_sigmoid_loss_reference(
        plain[0], plain[1], margin=plain[2] if len(plain) == 3 else margin, beta=beta, reduction=reduction
    )
    plain_grads = torch.autograd.grad((plain_loss * g.to(plain_loss.dtype)).sum(), plain)
    assert_no_worse("loss", loss, plain_loss, ref_loss)
    for name, ours, bar, ref in zip(["d_chosen", "d_rejected", "d_margin"], grads, plain_grads, ref_grads(g)):
        assert_no_worse(name, ours, bar, ref.reshape(ours.shape))
    if chosen.dtype == torch.float32:
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(ref_metrics["accuracy"].item(), abs=1e-6)
    assert metrics["margin"].item() == pytest.approx(ref_metrics["margin"].item(), rel=1e-5, abs=1e-5)
    return loss, grads, metrics


def scores(shape, dtype, scale=2.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype), (torch.randn(shape, device=DEVICE) * scale).to(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (37, 1), (1500,)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_pairwise_against_float64(impl, dtype, shape, reduction):
    chosen, rejected = scores(shape, dtype)
    check_pairwise(chosen, rejected, impl, beta=0.7, reduction=reduction)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(9,), (9, 1)])
@pytest.mark.parametrize("margin_kind", ["float", "pairs", "like_scores", "bf16"])
def test_pairwise_margins(impl, shape, margin_kind):
    chosen, rejected = scores(shape, torch.float32)
    margin = {
        "float": 0.8,
        "pairs": torch.rand(shape[0], device=DEVICE) * 3,  # [B] even for [B, 1] scores
        "like_scores": torch.rand(shape, device=DEVICE) * 3,
        "bf16": (torch.rand(shape[0], device=DEVICE) * 3).to(torch.bfloat16),
    }[margin_kind]
    check_pairwise(chosen, rejected, impl, margin=margin, beta=1.5, reduction="none")
    check_pairwise(chosen, rejected, impl, margin=margin, reduction="mean")


@pytest.mark.parametrize("impl", IMPLS)
def test_reward_model_output_shape(impl):
    """[B, 1] scores (a reward head's output): per-pair losses keep that shape, means are scalars."""
    chosen, rejected = scores((5, 1), torch.float32)
    none = rf.pairwise_sigmoid_loss(chosen, rejected, reduction="none", impl=impl)
    flat = rf.pairwise_sigmoid_loss(chosen[:, 0], rejected[:, 0], reduction="none", impl=impl)
    assert none.shape == (5, 1) and flat.shape == (5,)
    torch.testing.assert_close(none[:, 0], flat, rtol=0, atol=0)
    assert rf.pairwise_sigmoid_loss(chosen, rejected, impl=impl).shape == ()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pairwise_extreme_differences(impl, dtype):
    chosen = torch.tensor([400.0, -400.0, 0.0, 88.0, -88.0, 1e4, 3.0], device=DEVICE).to(dtype)
    rejected = torch.tensor([0.0, 0.0, 0.0, -1.0, 1.0, -1e4, 3.0], device=DEVICE).to(dtype)
    loss, grads, _ = check_pairwise(chosen, rejected, impl, reduction="none")
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    assert loss[1].item() == 400.0 and loss[0].item() == 0.0 and loss[2].item() == pytest.approx(math.log(2))
    c = chosen.detach().clone().requires_grad_(True)
    rf.pairwise_sigmoid_loss(c, rejected, impl=impl, reduction="sum").backward()
    assert c.grad[1].item() == -1.0 and c.grad[0].item() == 0.0 and c.grad[2].item() == -0.5


@pytest.mark.parametrize("impl", IMPLS)
def test_pairwise_non_contiguous(impl):
    base = torch.randn(40, 3, device=DEVICE)
    check_pairwise(base[::2, 0], base[1::2, 2], impl, margin=base[:20, 1], reduction="none")
    check_pairwise(base[:, :1], base[:, 1:2], impl)  # [B, 1] columns of a [B, 3] tensor


@pytest.mark.parametrize("impl", IMPLS)
def test_pairwise_nan_propagates(impl):
    chosen = torch.randn(6, device=DEVICE).requires_grad_(True)
    rejected = torch.randn(6, device=DEVICE)
    rejected[2] = float("nan")
    per_pair = rf.pairwise_sigmoid_loss(chosen, rejected, reduction="none", impl=impl)
    assert per_pair.isnan().tolist() == [False, False, True, False, False, False]
    per_pair.sum().backward()
    assert chosen.grad.isnan().tolist() == [False, False, True, False, False, False]
    loss, metrics = rf.pairwise_sigmoid_loss(chosen, rejected, impl=impl, return_metrics=True)
    assert loss.isnan() and metrics["accuracy"].isnan() and metrics["margin"].isnan()


@pytest.mark.parametrize("impl", IMPLS)
def test_pairwise_empty_batch(impl):
    chosen = torch.empty(0, device=DEVICE, requires_grad=True)
    rejected = torch.empty(0, device=DEVICE)
    loss, metrics = rf.pairwise_sigmoid_loss(chosen, rejected, reduction="sum", impl=impl, return_metrics=True)
    assert loss.item() == 0.0 and metrics["accuracy"].isnan()
    loss.backward()
    assert chosen.grad.shape == (0,)
    assert rf.pairwise_sigmoid_loss(chosen, rejected, reduction="none", impl=impl).shape == (0,)


@pytest.mark.parametrize("impl", IMPLS)
def test_pairwise_metrics(impl):
    chosen = torch.tensor([1.0, 2.0, 3.0, 4.0], device=DEVICE)
    rejected = torch.tensor([0.0, 2.0, 5.0, 1.0], device=DEVICE)  # a win, a tie, a loss, a win
    _, metrics = rf.pairwise_sigmoid_loss(chosen, rejected, margin=10.0, beta=3.0, impl=impl, return_metrics=True)
    assert metrics["accuracy"].item() == 0.5  # ties count as wrong; beta and margin do not enter
    assert metrics["margin"].item() == pytest.approx((1 + 0 - 2 + 3) / 4)
    assert not metrics["accuracy"].requires_grad


def test_pairwise_impls_agree():
    if "triton" not in IMPLS:
        pytest.skip("no Triton")
    chosen, rejected = scores((1100,), torch.bfloat16, scale=5.0)
    margin = torch.rand(1100, device=DEVICE)
    a = rf.pairwise_sigmoid_loss(chosen, rejected, margin=margin, reduction="none", impl="torch")
    b = rf.pairwise_sigmoid_loss(chosen, rejected, margin=margin, reduction="none", impl="triton")
    torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@random_cases(max_examples=15)
@given(
    n=st.integers(1, 2100),
    dtype=st.sampled_from(DTYPES),
    beta=st.floats(-3.0, 3.0),
    margin_kind=st.sampled_from(["none", "float", "tensor"]),
    reduction=st.sampled_from(REDUCTIONS),
    spread=st.sampled_from([0.01, 1.0, 30.0]),
    seed=SEEDS,
)
def test_pairwise_random_cases(impl, n, dtype, beta, margin_kind, reduction, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    chosen = (torch.randn(n, generator=gen) * spread).to(dtype).to(DEVICE)
    rejected = (torch.randn(n, generator=gen) * spread).to(dtype).to(DEVICE)
    margin = {"none": None, "float": 0.5, "tensor": torch.rand(n, generator=gen).to(DEVICE)}[margin_kind]
    check_pairwise(chosen, rejected, impl, margin=margin, beta=beta, reduction=reduction)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(chosen=torch.randn(4, dtype=torch.float64)), "chosen"),
        (dict(chosen=torch.randn(4, 2), rejected=torch.randn(4, 2)), "chosen"),
        (dict(chosen=torch.randn(2, 2, 1), rejected=torch.randn(2, 2, 1)), "chosen"),
        (dict(rejected=torch.randn(5)), "rejected"),
        (dict(rejected=torch.randn(4, 1)), "rejected"),
        (dict(rejected=torch.randint(0, 3, (4,))), "rejected"),
        (dict(margin=torch.rand(3)), "margin"),
        (dict(margin=torch.rand(4, 2)), "margin"),
        (dict(margin=float("nan")), "margin"),
        (dict(margin="1"), "margin"),
        (dict(beta=float("inf")), "beta"),
        (dict(beta=None), "beta"),
        (dict(reduction="avg"), "reduction"),
        (dict(chosen=torch.empty(0), rejected=torch.empty(0)), "chosen"),  # a mean of nothing
        (dict(impl="gpu"), "impl"),
    ],
)
def test_pairwise_bad_inputs_raise_value_error(kwargs, arg):
    args = dict(chosen=torch.randn(4), rejected=torch.randn(4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        rf.pairwise_sigmoid_loss(args.pop("chosen"), args.pop("rejected"), **args)


# ------------------------------------------------------------------------------------------------- DPO

DPO_CASES = [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)]


def dpo_f64(pc, pr, rc, rr, *, beta, loss_type, eps, reduction):
    """``(loss, grads_fn, metrics)`` in float64, written from the API formulas."""
    pc, pr = (t.detach().double().requires_grad_(True) for t in (pc, pr))
    rc, rr = rc.double(), rr.double()
    delta = (pc - rc) - (pr - rr)
    z = beta * delta
    if loss_type == "sigmoid":
        losses = (1 - eps) * neg_log_sigmoid_f64(z) + eps * neg_log_sigmoid_f64(-z)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        losses = torch.clamp(1 - z, min=0)
    loss = reduce_f64(losses, reduction)
    cr, rjr = (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()
    metrics = {
        "chosen_rewards": cr.mean(),
        "rejected_rewards": rjr.mean(),
        "reward_accuracy": (cr > rjr).double().mean(),
        "reward_margin": (cr - rjr).mean(),
    }

    def grads(g):
        return torch.autograd.grad((loss * g.double()).sum(), [pc, pr], retain_graph=True)

    return loss.detach(), grads, metrics


def dpo_inputs(B, dtype, spread=3.0):
    pc, pr = ((torch.randn(B, device=DEVICE) * spread - 40).to(dtype) for _ in range(2))
    rc, rr = ((p.float() + torch.randn(B, device=DEVICE)).to(dtype) for p in (pc, pr))  # a nearby reference
    return pc, pr, rc, rr


def check_dpo(pc, pr, rc, rr, *, beta=0.1, loss_type="sigmoid", eps=0.0, reduction="mean"):
    leaves = [pc.detach().clone().requires_grad_(True), pr.detach().clone().requires_grad_(True)]
    refs = [rc.detach().clone().requires_grad_(True), rr.detach().clone().requires_grad_(True)]
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps, reduction=reduction)
    loss, metrics = rf.dpo_loss(*leaves, *refs, **kw)
    assert loss.dtype == torch.float32 and loss.shape == (pc.shape if reduction == "none" else ())
    g = torch.randn_like(loss) if reduction == "none" else torch.tensor(0.7, device=loss.device)
    (loss * g).sum().backward()
    assert refs[0].grad is None and refs[1].grad is None  # the reference is a constant
    for leaf in leaves:
        assert leaf.grad.dtype == leaf.dtype
    ref_loss, ref_grads, ref_metrics = dpo_f64(pc, pr, rc, rr, beta=beta, loss_type=loss_type, eps=eps,
                                               reduction=reduction)  # fmt: skip
    plain = [t.detach().clone().requires_grad_(True) for t in (pc, pr)]
    plain_loss, _ = dpo_loss_reference(*plain, rc, rr, **kw)
    plain_grads = torch.autograd.grad((plain_loss * g.to(plain_loss.dtype)).sum(), plain)
    assert_no_worse("loss", loss, plain_loss, ref_loss)
    for name, leaf, bar, ref in zip(["d_chosen", "d_rejected"], leaves, plain_grads, ref_grads(g)):
        assert_no_worse(name, leaf.grad, bar, ref)
    for key, ref in ref_metrics.items():
        assert metrics[key].dtype == torch.float32 and not metrics[key].requires_grad
        assert metrics[key].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5), key
    return loss, leaves, metrics


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type,eps", DPO_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("B", [1, 13])
def test_dpo_against_float64(dtype, loss_type, eps, reduction, B):
    check_dpo(*dpo_inputs(B, dtype), beta=0.3, loss_type=loss_type, eps=eps, reduction=reduction)


@pytest.mark.parametrize("loss_type,eps", DPO_CASES)
def test_dpo_at_initialisation(loss_type, eps):
    """Policy == reference (the first step): delta = 0 exactly, and the gradient is the one at z = 0."""
    pc, pr, _, _ = dpo_inputs(6, torch.float32)
    loss, leaves, metrics = check_dpo(pc, pr, pc, pr, beta=0.1, loss_type=loss_type, eps=eps)
    if loss_type == "sigmoid":
        assert loss.item() == pytest.approx(math.log(2))
        # d/dpc of -(1-eps) log sigmoid(z) - eps log sigmoid(-z) at z = 0: -beta (1 - 2 eps) / 2, over B = 6,
        # times check_dpo's grad_output 0.7
        torch.testing.assert_close(leaves[0].grad, torch.full_like(pc, -0.1 * (1 - 2 * eps) / 2 / 6 * 0.7))
    assert metrics["reward_accuracy"].item() == 0.0 and metrics["reward_margin"].item() == 0.0


@pytest.mark.parametrize("loss_type,eps", DPO_CASES)
def test_dpo_extreme_log_ratios(loss_type, eps):
    """Sequence log-probs thousands apart (z = +-400 at beta = 0.1): finite loss and gradient."""
    pc = torch.tensor([-10.0, -4010.0, -500.0], device=DEVICE)
    pr = torch.tensor([-4010.0, -10.0, -500.0], device=DEVICE)
    rc = torch.tensor([-10.0, -10.0, -1e4], device=DEVICE)
    rr = torch.tensor([-10.0, -10.0, -1e4], device=DEVICE)
    loss, leaves, _ = check_dpo(pc, pr, rc, rr, loss_type=loss_type, eps=eps, reduction="none")
    assert torch.isfinite(loss).all() and all(torch.isfinite(t.grad).all() for t in leaves)


def test_dpo_nan_propagates():
    pc, pr, rc, rr = dpo_inputs(4, torch.float32)
    pc[1] = float("nan")
    loss, metrics = rf.dpo_loss(pc, pr, rc, rr)
    assert loss.isnan() and metrics["rejected_rewards"].isfinite()
    assert all(metrics[k].isnan() for k in ("chosen_rewards", "reward_accuracy", "reward_margin"))


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 64),
    dtype=st.sampled_from(DTYPES),
    beta=st.floats(0.01, 2.0),
    case=st.sampled_from(DPO_CASES + [("sigmoid", 0.5)]),
    reduction=st.sampled_from(REDUCTIONS),
    spread=st.sampled_from([0.1, 3.0, 100.0]),
    seed=SEEDS,
)
def test_dpo_random_cases(B, dtype, beta, case, reduction, spread, seed):
    torch.manual_seed(seed)
    check_dpo(*dpo_inputs(B, dtype, spread), beta=beta, loss_type=case[0], eps=case[1], reduction=reduction)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(policy_chosen_logp=torch.randn(4, dtype=torch.float64)), "policy_chosen_logp"),
        (dict(policy_chosen_logp=torch.randn(4, 1)), "policy_chosen_logp"),
        (dict(policy_rejected_logp=torch.randn(5)), "policy_rejected_logp"),
        (dict(ref_chosen_logp=torch.randn(3)), "ref_chosen_logp"),
        (dict(ref_rejected_logp=torch.randint(0, 3, (4,))), "ref_rejected_logp"),
        (dict(beta=0.0), "beta"),
        (dict(beta=-0.1), "beta"),
        (dict(loss_type="kto"), "loss_type"),
        (dict(label_smoothing=0.7), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
        (dict(reduction="avg"), "reduction"),
        (dict(**{k: torch.empty(0) for k in ("policy_chosen_logp", "policy_rejected_logp", "ref_chosen_logp",
                                              "ref_rejected_logp")}), "policy_chosen_logp"),  # fmt: skip
    ],
)
def test_dpo_bad_inputs_raise_value_error(kwargs, arg):
    names = ("policy_chosen_logp", "policy_rejected_logp", "ref_chosen_logp", "ref_rejected_logp")
    args = {n: torch.randn(4) for n in names}
    args.update(kwargs)
    tensors = [args.pop(n) for n in names]
    with pytest.raises(ValueError, match=arg):
        rf.dpo_loss(*tensors, **args)


# ------------------------------------------------------------------------------- the naive references


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_references_match_float64_definitions(reduction):
    """rlhf_fast.reference (the trainers' ops="reference" mode and the benchmark baseline) is right too."""
    chosen, rejected = scores((11, 1), torch.float64)
    margin = torch.rand(11, dtype=torch.float64, device=DEVICE)
    ours = pairwise_sigmoid_loss_reference(chosen, rejected, margin=margin, beta=0.5, reduction=reduction)
    torch.testing.assert_close(ours, pairwise_f64(chosen, rejected, margin, 0.5, reduction)[0])
    pc, pr, rc, rr = dpo_inputs(9, torch.float64)
    for loss_type, eps in DPO_CASES:
        kw = dict(beta=0.2, loss_type=loss_type, reduction=reduction)
        loss, metrics = dpo_loss_reference(pc, pr, rc, rr, label_smoothing=eps, **kw)
        ref_loss, _, ref_metrics = dpo_f64(pc, pr, rc, rr, eps=eps, **kw)
        torch.testing.assert_close(loss, ref_loss)
        for key, value in ref_metrics.items():
            torch.testing.assert_close(metrics[key].double(), value)  # accuracy is float32, as in TRL
