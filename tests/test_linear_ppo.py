"""rf.linear_ppo_loss: against float64 on the materialised logits (verl's formulas, tests/test_policy_verl.py),
against rf.ppo_loss_from_logits on the same logits, the gradient-in-the-forward structure, and a bandit
where linear_ppo_loss + linear_full_kl reaches pi_ref exp(r / beta) / Z."""

import importlib

import pytest
import torch
from conftest import IMPLS
from reference import assert_no_worse
from test_policy_modes import MODES, clean_then_garbage
from test_policy_verl import _verl_loss, verl_agg

import rlhf_fast as rf

linear_common = importlib.import_module("rlhf_fast._linear_common")



def _case(B=3, T=7, H=16, V=97, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 3 / H**0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    m = torch.ones(B, T)
    m[1, 5:] = 0
    m[2, 2] = 0
    labels[m == 0] = -100
    with torch.no_grad():
        z = torch.nn.functional.linear(hidden.double(), weight.double(), bias.double())
        lp = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * m
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    rollout = (old + 0.4 * torch.randn(B, T, generator=g)).float()
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    return hidden, weight, bias, labels, old, ref, rollout, adv, m


def _f64_loss(hidden, weight, bias, labels, old, ref, adv, m, mode, kw, estimator, f64=True):
    """verl's policy loss + kl_coef * agg(k) - entropy_coef * agg(H) on the materialised logits, and the
    gradients of hidden, weight, bias (float64, or in the input dtype: the eager bar)."""
    cast = (lambda t: t.detach().double()) if f64 else (lambda t: t.detach().clone())
    leaves = [cast(t).requires_grad_(True) for t in (hidden, weight, bias)]
    lp_all = torch.log_softmax(torch.nn.functional.linear(*leaves), -1)
    mm = cast(m).to(lp_all.dtype)
    logp = lp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mm
    ent = -(lp_all.exp() * lp_all).sum(-1)
    lr = logp - cast(ref).to(lp_all.dtype)
    k = {"k1": lr, "k2": 0.5 * lr**2, "k3": torch.exp(-lr) - 1 + lr, "abs": lr.abs()}[estimator]
    agg = kw.get("agg", "token-mean")
    c = lambda t: cast(t).to(lp_all.dtype)  # noqa: E731
    loss = _verl_loss(mode, logp, c(old), c(adv), mm, kw) + 0.1 * verl_agg(k, mm, agg) - 0.02 * verl_agg(ent, mm, agg)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def _ours(hidden, weight, bias, labels, old, adv, m, impl, **kw):
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, metrics = rf.linear_ppo_loss(leaves[0], leaves[1], labels, old, adv, m, bias=leaves[2], impl=impl, **kw)
    return loss, torch.autograd.grad(loss, leaves), metrics


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode,kw", MODES)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_against_float64(impl, mode, kw, estimator):
    hidden, weight, bias, labels, old, ref, _, adv, m = _case(seed=1)
    with rf.chunk_budget(4 * 97 * 2 * 4 / (1 << 20)):  # 4 rows a chunk: 6 chunks over the 21 rows
        loss, grads, _ = _ours(hidden, weight, bias, labels, old, adv, m, impl, ref_logp=ref, kl_coef=0.1,
                               kl_estimator=estimator, entropy_coef=0.02, loss_mode=mode, **kw)  # fmt: skip
    ref_loss, ref_grads = _f64_loss(hidden, weight, bias, labels, old, ref, adv, m, mode, kw, estimator)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for name, gr, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(gr.double(), rg, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode,kw", MODES[:3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_eager(impl, mode, kw, dtype):
    hidden, weight, bias, labels, old, ref, _, adv, m = _case(V=300, dtype=dtype, seed=2)
    loss, grads, _ = _ours(hidden, weight, bias, labels, old, adv, m, impl, ref_logp=ref, kl_coef=0.1,
                           kl_estimator="k3", entropy_coef=0.02, loss_mode=mode, **kw)  # fmt: skip
    ref_loss, ref_grads = _f64_loss(hidden, weight, bias, labels, old, ref, adv, m, mode, kw, "k3")
    eager_loss, eager_grads = _f64_loss(hidden, weight, bias, labels, old, ref, adv, m, mode, kw, "k3", f64=False)
    assert_no_worse("loss", loss, eager_loss, ref_loss)
    for name, o, e, r in zip(("hidden", "weight", "bias"), grads, eager_grads, ref_grads):
        assert o.dtype == dtype
        assert_no_worse(name, o, e, r, rel_margin=5e-6)


OPTION_CASES = [
    dict(delta=1.3, clip_high=0.28),
    dict(kl_bias_correction=True, kl_estimator="k2"),
    dict(rollout_is="token_mask", rollout_is_lower=0.7, rollout_is_cap=1.5),
    dict(rollout_is="sequence_truncate", agg="seq-mean-token-sum", agg_norm=5.0),
    dict(loss_mode="cispo", clip_low=1.0, clip_high=4.0, kl_estimator="abs", agg="seq-mean-token-sum-norm"),
    dict(loss_mode="gspo", kl_bias_correction=True, rollout_is="icepop"),
    dict(loss_mode="sapo", sapo_tau_pos=2.0, sapo_tau_neg=3.0, temperature=0.7),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw", OPTION_CASES)
def test_matches_ppo_loss_from_logits(impl, kw):
    """Loss, metrics and gradients equal rf.ppo_loss_from_logits on the materialised logits."""
    hidden, weight, bias, labels, old, ref, rollout, adv, m = _case(seed=3)
    extra = dict(ref_logp=ref, kl_coef=0.2, entropy_coef=0.01, **kw)
    if "rollout_is" in kw:
        extra["rollout_logp"] = rollout
    loss, grads, metrics = _ours(hidden, weight, bias, labels, old, adv, m, impl, **extra)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = torch.nn.functional.linear(*leaves)
    ref_loss, ref_metrics = rf.ppo_loss_from_logits(logits, labels, old, adv, m, impl="torch", **extra)
    ref_grads = torch.autograd.grad(ref_loss, leaves)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for gr, rg in zip(grads, ref_grads):
        torch.testing.assert_close(gr, rg, rtol=1e-4, atol=1e-6)
    assert set(metrics) == set(ref_metrics)
    for k in metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode,passes", [("vanilla", 3), ("sapo", 3), ("gspo", 4)])
def test_matmul_passes(monkeypatch, impl, mode, passes):
    """For a token-level mode both impls compute the logits once (forward) and the backward does no matmul
    at all: forward + backward is one logits pass plus the two gradient products. The sequence-level
    modes recompute the logits in the backward (four passes)."""
    hidden, weight, bias, labels, old, ref, _, adv, m = _case(seed=4)
    calls = []
    real = linear_common._chunk_logits
    monkeypatch.setattr(linear_common, "_chunk_logits", lambda h, w, b, **k: calls.append("fwd") or real(h, w, b, **k))
    lp_module = importlib.import_module("rlhf_fast.linear_logprobs_op")
    monkeypatch.setattr(lp_module, "_chunk_logits", lambda h, w, b, **k: calls.append("lp") or real(h, w, b, **k))
    h = hidden.clone().requires_grad_(True)
    lp_kernels = importlib.import_module("rlhf_fast.kernels.linear_logprobs")
    for name in ("linear_logprobs_forward", "linear_logprobs_backward"):  # the Triton composition's passes
        real_fn = getattr(lp_kernels, name)
        monkeypatch.setattr(lp_kernels, name, lambda *a, _f=real_fn, **k: calls.append("kernel") or _f(*a, **k))
    row_kernels = []
    lp_rows = importlib.import_module("rlhf_fast.kernels.logprobs")
    for name in ("logprobs_forward", "logprobs_backward"):  # the Triton gradient-in-forward's row kernels
        real_fn = getattr(lp_rows, name)
        monkeypatch.setattr(lp_rows, name, lambda *a, _f=real_fn, **k: row_kernels.append(1) or _f(*a, **k))
    loss, _ = rf.linear_ppo_loss(h, weight, labels, old, adv, m, bias=bias, loss_mode=mode, impl=impl)
    n_forward = len(calls)
    loss.backward()
    assert n_forward == 1 and len(calls) == (1 if passes == 3 else 2)
    assert len(row_kernels) == (2 if impl == "triton" and passes == 3 else 0)  # stats and dlogits of the chunk


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_scales_by_the_incoming_gradient_and_no_grad_runs(impl):
    hidden, weight, bias, labels, old, ref, _, adv, m = _case(seed=5)
    loss, grads, _ = _ours(hidden, weight, bias, labels, old, adv, m, impl)
    h = hidden.clone().requires_grad_(True)
    loss2, _ = rf.linear_ppo_loss(h, weight, labels, old, adv, m, bias=bias, impl=impl)
    (-2.5 * loss2).backward()
    torch.testing.assert_close(h.grad, -2.5 * grads[0])
    with torch.no_grad():
        loss3, _ = rf.linear_ppo_loss(hidden, weight, labels, old, adv, m, bias=bias, impl=impl)
    torch.testing.assert_close(loss3, loss.detach())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["vanilla", "gspo"])
def test_masked_tokens_contribute_nothing(impl, mode):
    hidden, weight, bias, labels, old, ref, rollout, adv, m = _case(seed=6)
    outs = []
    for o, a, r, ro in clean_then_garbage(m, old, adv, ref, rollout):
        outs.append(_ours(hidden, weight, bias, labels, o, a, m, impl, ref_logp=r, kl_coef=0.1, loss_mode=mode,
                          rollout_logp=ro, rollout_is="token_truncate", kl_bias_correction=True))  # fmt: skip
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(hidden=torch.randn(6, 4)), "hidden"),
        (dict(weight=torch.randn(9, 3)), "weight"),
        (dict(bias=torch.randn(8)), "bias"),
        (dict(labels=torch.full((2, 3), 9)), "labels"),
        (dict(old_logp=torch.zeros(3, 3)), "old_logp"),
        (dict(loss_mode="dapo"), "loss_mode"),
        (dict(kl_coef=0.1), "ref_logp"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, arg):
    args = dict(hidden=torch.randn(2, 3, 4), weight=torch.randn(9, 4), labels=torch.zeros(2, 3, dtype=torch.long),
                old_logp=torch.zeros(2, 3), advantages=torch.zeros(2, 3))  # fmt: skip
    args.update(kwargs)
    pos = [args.pop(k) for k in ("hidden", "weight", "labels", "old_logp", "advantages")]
    with pytest.raises(ValueError, match=arg):
        rf.linear_ppo_loss(*pos, **args)


@pytest.mark.parametrize("impl", IMPLS)
def test_bandit_reaches_the_reverse_kl_optimum(impl):
    """One context, K arms: the policy's logits are ``h @ W.T``; each step the batch is every arm, weighted
    by its probability under the current policy (the mask's token weights), so ``token-mean`` is the exact
    expectation ``E_pi``. ``linear_ppo_loss`` (advantages ``r - E_pi[r]``, on-policy) plus
    ``beta * linear_full_kl`` to a reference lm_head descends ``-(E_pi[r] - beta KL(pi || pi_ref))``, whose
    minimiser is ``pi_ref exp(r / beta) / Z``."""
    g = torch.Generator().manual_seed(0)
    K, H, beta = 6, 8, 0.5
    h = torch.randn(1, 1, H, generator=g).expand(1, K, H).contiguous()
    ref_w = torch.randn(K, H, generator=g) * 0.5
    rewards = torch.linspace(0.0, 2.0, K)
    w = torch.zeros(K, H, requires_grad=True)
    labels = torch.arange(K)[None]
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(200):
        with torch.no_grad():
            logp = torch.log_softmax(h[0, 0] @ w.T, -1)
        probs = logp.exp()
        adv = (rewards - (probs * rewards).sum())[None]
        loss, _ = rf.linear_ppo_loss(h, w, labels, logp[None], adv, probs[None], impl=impl)
        kl = rf.linear_full_kl(h[:, :1], w, h[:, :1], ref_w, impl=impl)
        opt.zero_grad()
        (loss + beta * kl.sum()).backward()
        opt.step()
    pi = torch.softmax(h[0, 0] @ w.detach().T, -1).double()
    target = torch.softmax((h[0, 0] @ ref_w.T).double() + rewards.double() / beta, -1)
    start = torch.softmax((h[0, 0] @ ref_w.T).double(), -1)
    assert (start - target).abs().sum() / 2 > 0.3  # the optimum is far from the reference
    assert (pi - target).abs().sum() / 2 < 1e-3  # 2.4e-4 after 200 steps (both impls)


@pytest.mark.parametrize("mode", ["vanilla", "gspo"])
def test_autocast_bf16_matches_casting_by_hand(mode):
    """Under CPU bf16 autocast the operands go to bf16 as F.linear's do (gradients back in float32 through
    the casts); the loss is float32 and equals the call with bf16 operands."""
    hidden, weight, bias, labels, old, ref, _, adv, m = _case(seed=7)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = rf.linear_ppo_loss(leaves[0], leaves[1], labels, old, adv, m, bias=leaves[2], loss_mode=mode,
                                     impl="torch")  # fmt: skip
    grads = torch.autograd.grad(loss, leaves)
    bf = [t.to(torch.bfloat16).requires_grad_(True) for t in (hidden, weight, bias)]
    expected, _ = rf.linear_ppo_loss(bf[0], bf[1], labels, old, adv, m, bias=bf[2], loss_mode=mode, impl="torch")
    expected_grads = torch.autograd.grad(expected, bf)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e.float())


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["vanilla", "gspo"])
def test_real_shape_cuda(impl, mode):
    """H = 4096, V = 151936 in bf16 on 512 rows: equal to rf.ppo_loss_from_logits on the materialised logits."""
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, V = 2, 256, 4096, 151936
    hidden = torch.randn(B, T, H, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(V, H, device="cuda", generator=g) / H**0.5 * 2).bfloat16()
    labels = torch.randint(0, V, (B, T), device="cuda", generator=g)
    with torch.no_grad():
        logp = rf.linear_logprobs(hidden, weight, labels)
    old = logp + 0.1 * torch.randn(B, T, device="cuda", generator=g)
    adv = torch.randn(B, device="cuda", generator=g)
    kw = dict(ref_logp=old - 0.05, kl_coef=0.1, entropy_coef=0.01, loss_mode=mode)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, metrics = rf.linear_ppo_loss(h1, w1, labels, old, adv, impl=impl, **kw)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_loss, ref_metrics = rf.ppo_loss_from_logits(torch.nn.functional.linear(h2, w2), labels, old, adv, impl=impl, **kw)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), rtol=2e-2, atol=2e-2 * h2.grad.float().abs().max().item())
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), rtol=2e-2, atol=2e-2 * w2.grad.float().abs().max().item())
    for k in metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=1e-4, atol=1e-5, msg=k)
