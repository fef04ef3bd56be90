"""An op's Triton launchers and their PyTorch twins take the same arguments (names, order, defaults), so that
the autograd Functions and rlhf_fast/_vocab_parallel.py call either one the same way, and given the same
arguments they agree. The backward's ``label_grad`` (what the label term adds at the label, in place of
``grad_logp``: a vocabulary shard's rows whose label another rank owns get 0) was once taken by the PyTorch
twins only, and the vocabulary-parallel code branched on the implementation to get around it.

Agreement is checked against the closed form in float64: with ``p = softmax(x / T)``,
``dL/dx_v = (label_grad [v == y] - g_logp p_v - g_H p_v (log p_v + H)) / T``.
"""

import importlib
import inspect

import pytest
import torch
from conftest import DEVICE, IMPLS

from rlhf_fast.kernels import linear_logprobs as linear_kernels
from rlhf_fast.kernels import logprobs as logprobs_kernels

# the public names rf.logprobs / rf.linear_logprobs shadow their modules' dotted names
logprobs_twins = importlib.import_module("rlhf_fast.logprobs_op")
linear_twins = importlib.import_module("rlhf_fast.linear_logprobs_op")

PAIRS = {
    "logprobs_forward": (logprobs_kernels.logprobs_forward, logprobs_twins._torch_forward),
    "logprobs_backward": (logprobs_kernels.logprobs_backward, logprobs_twins._torch_backward),
    "linear_logprobs_forward": (linear_kernels.linear_logprobs_forward, linear_twins._torch_forward),
    "linear_logprobs_backward": (linear_kernels.linear_logprobs_backward, linear_twins._torch_backward),
}
needs_triton = pytest.mark.skipif("triton" not in IMPLS, reason="needs a GPU or the Triton interpreter")
T = 0.7


def _arguments(fn):
    """``(name, kind, default)`` of each parameter; the first (the input tensor) by its kind only: the logits
    twin calls it ``x``, for any ``[B, T, V]`` view."""
    params = list(inspect.signature(fn).parameters.values())
    return [(None, params[0].kind, params[0].default)] + [(p.name, p.kind, p.default) for p in params[1:]]


@pytest.mark.parametrize("name", PAIRS)
def test_launcher_and_twin_take_the_same_arguments(name):
    launcher, twin = PAIRS[name]
    assert _arguments(launcher) == _arguments(twin)
    if name.endswith("backward"):
        assert "label_grad" in inspect.signature(launcher).parameters


def _case(N, V, seed):
    """Labels with one ignored row, ``grad_logp`` and a ``label_grad`` that equals it on some rows, is 0 on
    others (a shard's rows owned elsewhere) and differs on the rest; 0 on the ignored row, as ``grad_logp``."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[1] = -100
    g_logp = torch.randn(N, generator=gen)
    g_logp[1] = 0.0
    g_entropy = torch.randn(N, generator=gen)
    label_grad = torch.randn(N, generator=gen)
    label_grad[0::3], label_grad[1::3] = g_logp[0::3], 0.0
    return labels, g_logp, g_entropy, label_grad


def _reference(z64, labels, g_logp, g_entropy, label_grad, with_entropy):
    """float64 ``dL/dx`` of ``[N, V]`` logits (already divided by ``T``) from the closed form above."""
    logp = torch.log_softmax(z64, -1)
    p = logp.exp()
    g = -g_logp.double()[:, None] * p
    if with_entropy:
        H = -(p * logp).sum(-1, keepdim=True)
        g = g - g_entropy.double()[:, None] * p * (logp + H)
    keep = labels >= 0
    g[keep, labels[keep]] += label_grad.double()[keep]
    return g / T


@needs_triton
@pytest.mark.parametrize("with_entropy", [True, False])
def test_logprobs_backward_twins_agree_with_label_grad(with_entropy):
    N, V = 7, 45
    labels, g_logp, g_entropy, label_grad = _case(N, V, seed=1)
    x = torch.randn(1, N, V, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    labels, g_logp, g_entropy, label_grad = (t.to(DEVICE) for t in (labels, g_logp, g_entropy, label_grad))
    _, entropy, row_max, log_norm = logprobs_twins._torch_forward(x, labels, T, -100, with_entropy)
    g_h = g_entropy if with_entropy else None
    args = (labels, row_max, log_norm, entropy, g_logp, g_h, T, -100)
    expected = _reference(x[0].double() / T, labels, g_logp, g_entropy, label_grad, with_entropy)
    for backward in PAIRS["logprobs_backward"]:
        got = backward(x, *args, label_grad=label_grad)
        torch.testing.assert_close(got[0].double(), expected, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("with_entropy", [True, False])
def test_linear_logprobs_backward_twins_agree_with_label_grad(with_entropy):
    N, H, V = 9, 16, 45
    labels, g_logp, g_entropy, label_grad = _case(N, V, seed=3)
    labels[1] = 4  # the linear launchers take labels in [0, V) (the autograd Function maps ignored rows to 0)
    gen = torch.Generator().manual_seed(4)
    hidden, weight, bias = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen) / 4, torch.randn(V, generator=gen)
    hidden, weight, bias, labels, g_logp, g_entropy, label_grad = (
        t.to(DEVICE) for t in (hidden, weight, bias, labels, g_logp, g_entropy, label_grad))  # fmt: skip
    _, entropy, row_max, log_norm = linear_twins._torch_forward(hidden, weight, bias, labels, T, with_entropy)
    g_h = g_entropy if with_entropy else None
    args = (labels, row_max, log_norm, entropy, g_logp, g_h, T, True, True, True)
    h64, w64 = hidden.double(), weight.double()
    dz = _reference((h64 @ w64.T + bias.double()) / T, labels, g_logp, g_entropy, label_grad, with_entropy)
    expected = (dz @ w64, dz.T @ h64, dz.sum(0))
    for backward in PAIRS["linear_logprobs_backward"]:
        got = backward(hidden, weight, bias, *args, label_grad=label_grad)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)
