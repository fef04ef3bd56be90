"""rf.sequence_logprobs against float64, through both impls: the sum (or mean) of per-token log-probs."""

import pytest
import torch
from conftest import DEVICE, FLOAT_DTYPES, IMPLS, SEEDS, random_cases
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_no_worse, logprobs_f64, logprobs_plain_same_dtype

import rlhf_fast as rf
from rlhf_fast.reference import sequence_logprobs_reference


def per_sequence(token_fn, logits, labels, *, temperature, ignore_index, average):
    """``(seq, grad_fn)`` from a per-token ``(logp, entropy, grad)`` function, summed over T as the API says."""
    logp, _, grad = token_fn(logits, labels, temperature=temperature, ignore_index=ignore_index)
    count = (labels != ignore_index).sum(-1).clamp(min=1).to(logp.dtype)
    seq = logp.sum(-1) / count if average else logp.sum(-1)

    def seq_grad(g):
        w = g.to(logp.dtype) / count if average else g.to(logp.dtype)
        return grad(w.unsqueeze(-1).expand(logp.shape), None)

    return seq, seq_grad


def check_sequence(logits, labels, impl, *, temperature=1.0, ignore_index=-100, average=False):
    x = logits.detach().clone().requires_grad_(True)
    kw = dict(temperature=temperature, ignore_index=ignore_index, average=average)
    seq = rf.sequence_logprobs(x, labels, impl=impl, **kw)
    assert seq.dtype == torch.float32 and seq.shape == labels.shape[:-1]
    g = torch.randn_like(seq)
    (grad,) = torch.autograd.grad((seq * g).sum(), x)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    ref, ref_grad = per_sequence(logprobs_f64, logits, labels, **kw)
    plain, plain_grad = per_sequence(logprobs_plain_same_dtype, logits, labels, **kw)
    T = labels.shape[-1]
    for name, ours, bar, truth in (("seq", seq, plain, ref), ("grad", grad, plain_grad(g), ref_grad(g))):
        # T token log-probs summed: a sum of T roundings, not a worse algorithm
        scale = assert_no_worse(name, ours, bar, truth, rel_margin=2e-6 * T)
        if logits.dtype == torch.float32:
            torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=1e-5 * scale, msg=name)
    return seq, grad


def case(shape, dtype, ignore_frac=0.3, ignore_index=-100):
    logits = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], device=DEVICE)
    labels[torch.rand(shape[:-1], device=DEVICE) < ignore_frac] = ignore_index
    return logits, labels


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 123), (2, 3, 5, 37), (1, 1, 1)])
@pytest.mark.parametrize("average", [False, True])
def test_against_float64(impl, dtype, shape, average):
    check_sequence(*case(shape, dtype), impl, average=average, temperature=0.9)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("average", [False, True])
def test_rows_without_tokens_are_zero(impl, average):
    """A sequence with no valid label: 0 (also the mean, not 0 / 0), no gradient, no NaN anywhere."""
    logits, labels = case((4, 6, 50), torch.float32)
    labels[1] = -100
    seq, grad = check_sequence(logits, labels, impl, average=average)
    assert seq[1].item() == 0.0 and (grad[1] == 0).all() and torch.isfinite(seq).all()
    custom = labels.masked_fill(labels == -100, -1)  # the same with another ignore_index
    seq_custom, _ = check_sequence(logits, custom, impl, ignore_index=-1, average=average)
    torch.testing.assert_close(seq_custom, seq, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_average_is_sum_over_count(impl):
    logits, labels = case((3, 9, 40), torch.float32)
    total = rf.sequence_logprobs(logits, labels, impl=impl)
    mean = rf.sequence_logprobs(logits, labels, average=True, impl=impl)
    torch.testing.assert_close(mean, total / (labels != -100).sum(-1).clamp(min=1))


@pytest.mark.parametrize("impl", IMPLS)
def test_sliced_logits(impl):
    """The usual ``logits[:, :-1]`` slice, read in place."""
    logits, labels = case((2, 8, 77), torch.bfloat16)
    check_sequence(logits[:, :-1], labels[:, 1:], impl)


def test_reference_matches_float64():
    logits, labels = case((3, 7, 31), torch.float64)
    labels[0] = -100
    for average in (False, True):
        ref, _ = per_sequence(logprobs_f64, logits, labels, temperature=0.8, ignore_index=-100, average=average)
        torch.testing.assert_close(sequence_logprobs_reference(logits, labels, temperature=0.8, average=average), ref)


@random_cases(max_examples=10)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 12),
    V=st.integers(1, 300),
    dtype=FLOAT_DTYPES,
    average=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.5, 1.0]),
    seed=SEEDS,
)
def test_random_cases(impl, B, T, V, dtype, average, ignore_frac, seed):
    torch.manual_seed(seed)
    check_sequence(*case((B, T, V), dtype, ignore_frac), impl, average=average)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(logits=torch.randn(8)), "logits"),
        (dict(logits=torch.randn(2, 3, 8, dtype=torch.float64)), "logits"),
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "labels"),
        (dict(labels=torch.zeros(2, 3)), "labels"),
        (dict(labels=torch.full((2, 3), 8)), "labels"),
        (dict(temperature=0.0), "temperature"),
        (dict(ignore_index=1.5), "ignore_index"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, arg):
    args = dict(logits=torch.randn(2, 3, 8), labels=torch.zeros(2, 3, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        rf.sequence_logprobs(args.pop("logits"), args.pop("labels"), **args)
