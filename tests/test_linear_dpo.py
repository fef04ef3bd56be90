"""rf.linear_dpo_loss against float64: the loss, its metrics and the gradients of hidden, weight and bias.

The float64 truth is rlhf_fast.reference's unfused path (lm_head logits -> log_softmax -> sequence sums ->
TRL's DPO loss), whose pieces test_preference.py and test_sequence_logprobs.py check against the API
formulas; the same path in the input dtype is the bar for bf16/fp16.
"""

import pytest
import torch
from conftest import DEVICE, FLOAT_DTYPES, IMPLS, SEEDS, random_cases
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_no_worse

import rlhf_fast as rf
from rlhf_fast.reference import linear_dpo_loss_reference


def unfused(hidden, weight, bias, labels, rc, rr, *, f64, **kw):
    """``(loss, grads_fn, metrics)`` of the unfused reference, in float64 or in the input dtype."""
    leaves = [t.detach().double() if f64 else t.detach().clone() for t in (hidden, weight, bias) if t is not None]
    leaves = [t.requires_grad_(True) for t in leaves]
    refs = [t.double() if f64 else t for t in (rc, rr)]
    b = leaves[2] if bias is not None else None
    loss, metrics = linear_dpo_loss_reference(leaves[0], leaves[1], labels, *refs, bias=b, **kw)

    def grads(g):
        return torch.autograd.grad((loss * g.to(loss.dtype)).sum(), leaves, retain_graph=True)

    return loss.detach(), grads, metrics


def check_linear_dpo(hidden, weight, bias, labels, rc, rr, impl, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias) if t is not None]
    refs = [t.detach().clone().requires_grad_(True) for t in (rc, rr)]
    b = leaves[2] if bias is not None else None
    loss, metrics = rf.linear_dpo_loss(leaves[0], leaves[1], labels, *refs, bias=b, impl=impl, **kw)
    reduction = kw.get("reduction", "mean")
    assert loss.dtype == torch.float32 and loss.shape == (rc.shape if reduction == "none" else ())
    g = torch.randn_like(loss) if reduction == "none" else torch.tensor(0.9, device=loss.device)
    grads = torch.autograd.grad((loss * g).sum(), leaves)
    for grad, leaf in zip(grads, leaves):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    ref_loss, ref_grads, ref_metrics = unfused(hidden, weight, bias, labels, rc, rr, f64=True, **kw)
    plain_loss, plain_grads, _ = unfused(hidden, weight, bias, labels, rc, rr, f64=False, **kw)
    names = ["loss", "d_hidden", "d_weight", "d_bias"]
    T = labels.shape[1]
    for name, ours, bar, ref in zip(names, [loss, *grads], [plain_loss, *plain_grads(g)], [ref_loss, *ref_grads(g)]):
        # sequence sums of T log-probs: T roundings more than one log-prob
        scale = assert_no_worse(name, ours, bar, ref, rel_margin=5e-6 * T)
        if hidden.dtype == torch.float32:
            torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=2e-5 * T * scale, msg=name)
    for key, ref in ref_metrics.items():
        assert not metrics[key].requires_grad
        # our float32 arithmetic on the (exactly upcast) inputs, whatever their dtype
        assert metrics[key].item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-4), key
    return loss, metrics


def case(B, T, H, V, dtype, *, bias=True, ignore_frac=0.3):
    hidden = torch.randn(2 * B, T, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) / H**0.5 * 2).to(dtype)
    b = (torch.randn(V, device=DEVICE) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (2 * B, T), device=DEVICE)
    labels[torch.rand(2 * B, T, device=DEVICE) < ignore_frac] = -100
    rc, rr = torch.randn(B, device=DEVICE) * 2 - 20, torch.randn(B, device=DEVICE) * 2 - 20
    return hidden, weight, b, labels, rc, rr


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,T,H,V", [(2, 5, 16, 37), (1, 3, 7, 130)])
def test_against_float64(impl, dtype, bias, B, T, H, V):
    check_linear_dpo(*case(B, T, H, V, dtype, bias=bias), impl, beta=0.5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_loss_types_and_averaging(impl, loss_type, label_smoothing, average_log_prob):
    hidden, weight, b, labels, rc, rr = case(2, 6, 16, 41, torch.float32)
    labels[1] = -100  # a sequence without response tokens: log-prob 0, also when averaged
    rc, rr = rc / 10, rr / 10  # averaged log-probs are per token: keep the reference on that scale too
    check_linear_dpo(hidden, weight, b, labels, rc, rr, impl, beta=0.2, loss_type=loss_type,
                     label_smoothing=label_smoothing, average_log_prob=average_log_prob)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_custom_ignore_index(impl, reduction):
    hidden, weight, b, labels, rc, rr = case(3, 4, 8, 29, torch.float32)
    labels = labels.masked_fill(labels == -100, -1)
    check_linear_dpo(hidden, weight, b, labels, rc, rr, impl, ignore_index=-1, reduction=reduction)


@pytest.mark.parametrize("impl", IMPLS)
def test_equals_dpo_loss_on_sequence_logprobs(impl):
    """The API's definition, composed from the public ops on built logits."""
    hidden, weight, b, labels, rc, rr = case(2, 5, 16, 37, torch.float32)
    loss, metrics = rf.linear_dpo_loss(hidden, weight, labels, rc, rr, bias=b, beta=0.3, impl=impl)
    seq = rf.sequence_logprobs(torch.nn.functional.linear(hidden, weight, b), labels, impl=impl)
    expected, expected_metrics = rf.dpo_loss(seq[:2], seq[2:], rc, rr, beta=0.3)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for key, value in expected_metrics.items():
        torch.testing.assert_close(metrics[key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["policy_chosen_logp"], seq[:2].mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["policy_rejected_logp"], seq[2:].mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_gradient_to_reference_log_probs(impl):
    hidden, weight, b, labels, rc, rr = case(2, 3, 8, 19, torch.float32)
    rc.requires_grad_(True)
    hidden.requires_grad_(True)
    rf.linear_dpo_loss(hidden, weight, labels, rc, rr, impl=impl)[0].backward()
    assert hidden.grad is not None and rc.grad is None


@random_cases(max_examples=6)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 6),
    H=st.integers(1, 20),
    V=st.integers(1, 90),
    dtype=FLOAT_DTYPES,
    bias=st.booleans(),
    loss_type=st.sampled_from(["sigmoid", "ipo", "hinge"]),
    seed=SEEDS,
)
def test_random_cases(impl, B, T, H, V, dtype, bias, loss_type, seed):
    torch.manual_seed(seed)
    check_linear_dpo(*case(B, T, H, V, dtype, bias=bias), impl, beta=0.1, loss_type=loss_type)


def _args(B=2, T=3, H=4, V=11):
    return dict(
        hidden=torch.randn(2 * B, T, H), weight=torch.randn(V, H), labels=torch.randint(0, V, (2 * B, T)),
        ref_chosen_logp=torch.randn(B), ref_rejected_logp=torch.randn(B),
    )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(hidden=torch.randn(3, 3, 4)), "hidden"),  # an odd number of rows
        (dict(hidden=torch.randn(0, 3, 4)), "hidden"),
        (dict(hidden=torch.randn(4, 4)), "hidden"),
        (dict(hidden=torch.randn(4, 3, 4, dtype=torch.float64)), "hidden"),
        (dict(weight=torch.randn(11, 5)), "weight"),
        (dict(bias=torch.randn(10)), "bias"),
        (dict(labels=torch.zeros(4, 2, dtype=torch.long)), "labels"),
        (dict(labels=torch.zeros(4, 3)), "labels"),
        (dict(labels=torch.full((4, 3), 11)), "labels"),
        (dict(ref_chosen_logp=torch.randn(4)), "ref_chosen_logp"),
        (dict(ref_rejected_logp=torch.randn(2, 1)), "ref_rejected_logp"),
        (dict(beta=float("nan")), "beta"),
        (dict(loss_type="orpo"), "loss_type"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(reduction="batchmean"), "reduction"),
        (dict(impl="gpu"), "impl"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, arg):
    args = _args()
    args.update(kwargs)
    names = ("hidden", "weight", "labels", "ref_chosen_logp", "ref_rejected_logp")
    tensors = [args.pop(n) for n in names]
    with pytest.raises(ValueError, match=arg):
        rf.linear_dpo_loss(*tensors, **args)
