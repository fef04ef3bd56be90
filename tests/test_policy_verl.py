"""``rf.ppo_policy_loss`` / ``rf.ppo_loss_from_logits`` loss modes against verl's policy losses.

verl does not import without ray and its other heavy dependencies (``pip install --no-deps verl`` 0.9.1
then ``import verl.trainer.ppo.core_algos`` fails on ``import ray``), so the references here are float64
transcriptions of the formulas of verl/trainer/ppo/core_algos.py at volcengine/verl
b178a3cd56f58b2d502255daba591e92833930a7: ``agg_loss``, ``compute_policy_loss_vanilla`` (with its
always-on dual clip ``clip_ratio_c``), ``compute_policy_loss_gspo``, ``compute_policy_loss_sapo``,
``compute_policy_loss_geo_mean`` and ``compute_policy_loss_cispo``, each returning the loss and the
metrics ``pg_clipfrac``, ``ppo_kl`` (and ``pg_clipfrac_lower``). verl's numerical guards that do not bind
on these inputs (``log_ratio`` clamped to [-20, 20], GSPO's ``log s <= 10``, the ``+ 1e-8`` of
denominators) are left out.
"""

import pytest
import torch
from conftest import IMPLS

import rlhf_fast as rf
from rlhf_fast._agg import AGG_MODES


def _mmean(x, m):
    return (x * m).sum() / m.sum()


def verl_agg(L, m, mode):
    """core_algos.agg_loss with its defaults (dp_size 1, no global batch info)."""
    if mode == "token-mean":
        return (L * m).sum() / m.sum()
    seq_tokens = m.sum(-1)
    if mode == "seq-mean-token-sum":
        return (L * m).sum(-1).sum() / (seq_tokens > 0).sum()
    if mode == "seq-mean-token-mean":
        return ((L * m).sum(-1) / seq_tokens.clamp(min=1e-30)).sum() / (seq_tokens > 0).sum()
    return (L * m).sum() / m.shape[-1]  # seq-mean-token-sum-norm: loss_scale_factor defaults to T


def verl_vanilla(logp, old, A, m, lo, hi, c, agg, is_w=None):
    lr = logp - old
    r = torch.exp(lr)
    l1, l2 = -A * r, -A * torch.clamp(r, 1 - lo, 1 + hi)
    clip1 = torch.maximum(l1, l2)
    l3 = -A * c
    L = torch.where(A < 0, torch.minimum(l3, clip1), clip1)
    if is_w is not None:
        L = L * is_w
    metrics = {"pg_clipfrac": _mmean((l2 > l1).double(), m), "ppo_kl": _mmean(-lr, m),
               "pg_clipfrac_lower": _mmean(((clip1 > l3) & (A < 0)).double(), m)}  # fmt: skip
    return verl_agg(L, m, agg), metrics


def verl_gspo(logp, old, A, m, lo, hi):
    lr = logp - old
    seq = (lr * m).sum(-1) / m.sum(-1).clamp(min=1)
    s = torch.exp(logp - logp.detach() + seq.detach()[:, None])
    l1, l2 = -A * s, -A * torch.clamp(s, 1 - lo, 1 + hi)
    L = torch.maximum(l1, l2)
    return verl_agg(L, m, "seq-mean-token-mean"), {"pg_clipfrac": _mmean((l2 > l1).double(), m), "ppo_kl": _mmean(-lr, m)}


def verl_sapo(logp, old, A, m, tau_pos, tau_neg):
    lr = logp - old
    r = torch.exp(lr)
    tau = torch.where(A > 0, torch.as_tensor(tau_pos, dtype=A.dtype), torch.as_tensor(tau_neg, dtype=A.dtype))
    L = -torch.sigmoid(tau * (r - 1)) * (4 / tau) * A
    return verl_agg(L, m, "seq-mean-token-mean"), {"ppo_kl": _mmean(-lr, m)}


def verl_geo_mean(logp, old, A, m, lo, hi):
    lr = logp - old
    sgn = torch.sign(A)
    lrc = torch.clamp(lr, -lo, hi)
    lmin = sgn * torch.minimum(sgn * lr, sgn * lrc)
    n = m.sum(-1)
    ratio = torch.exp((lmin * m).sum(-1) / n)
    adv = (A * m).sum(-1) / n
    return torch.mean(-adv * ratio), {"ppo_kl": _mmean(-lr, m)}


def verl_cispo(logp, old, A, m, lo, hi, agg):
    lr = logp - old
    r = torch.exp(lr)
    c = torch.clamp(r, 1 - lo, 1 + hi)
    L = -c.detach() * A * logp
    return verl_agg(L, m, agg), {"pg_clipfrac": _mmean((r != c).double(), m), "ppo_kl": _mmean(-lr, m)}


def _inputs(B=5, T=8, seed=0, empty_rows=False, per_token_adv=True):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    A = torch.randn(B, T if per_token_adv else 1, generator=g, dtype=torch.float64).expand(B, T)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    if empty_rows:
        lengths[1] = 0
    m = (torch.arange(T)[None] < lengths[:, None]).double()
    m[:, 2] = 0  # a hole
    return logp, old, A.contiguous(), m


def _compare(ours_fn, ref_fn, logp, metric_pairs):
    x = logp.float().requires_grad_(True)
    loss, metrics = ours_fn(x)
    (grad,) = torch.autograd.grad(loss, x)
    xd = logp.clone().requires_grad_(True)
    ref_loss, ref_metrics = ref_fn(xd)
    (ref_grad,) = torch.autograd.grad(ref_loss, xd)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    for ours, ref in metric_pairs:
        assert metrics[ours].item() == pytest.approx(ref_metrics[ref].item(), rel=1e-5, abs=1e-7), ours
    return metrics


@pytest.mark.parametrize("agg", AGG_MODES[:3])
def test_vanilla_is_verl_with_dual_clip(agg):
    logp, old, A, m = _inputs(seed=1)
    is_w = torch.rand(logp.shape, dtype=torch.float64) + 0.5
    ours = lambda x: rf.ppo_policy_loss(x, old.float(), A.float(), m, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                                        agg=agg, is_weights=is_w.float())  # fmt: skip
    ref = lambda x: verl_vanilla(x, old, A * 1.0, m, 0.2, 0.28, 3.0, agg, is_w)
    _compare(ours, ref, logp, (("clipfrac", "pg_clipfrac"), ("approx_kl", "ppo_kl"), ("dual_clipfrac", "pg_clipfrac_lower")))


def test_seq_mean_token_sum_norm_vs_verl_loss_scale_factor():
    """verl divides by loss_scale_factor (default T); ours by B * agg_norm: agg_norm = T / B is verl's."""
    logp, old, A, m = _inputs(seed=2)
    B, T = logp.shape
    ours = lambda x: rf.ppo_policy_loss(x, old.float(), A.float(), m, dual_clip=3.0, agg="seq-mean-token-sum-norm",
                                        agg_norm=T / B)  # fmt: skip
    _compare(ours, lambda x: verl_vanilla(x, old, A, m, 0.2, 0.2, 3.0, "seq-mean-token-sum-norm"), logp, ())


@pytest.mark.parametrize("agg", AGG_MODES)
def test_agg_norm_formulas(agg):
    """Each agg's denominator replaced by agg_norm (rlhf_fast/_agg.py), against the formula in float64."""
    logp, old, A, m = _inputs(seed=3, empty_rows=True)
    B, T = logp.shape
    norm = 37.0
    x = logp.float().requires_grad_(True)
    loss, _ = rf.ppo_policy_loss(x, old.float(), A.float(), m, agg=agg, agg_norm=norm)
    r = torch.exp(logp - old)
    L = torch.maximum(-A * r, -A * r.clamp(0.8, 1.2))
    if agg == "seq-mean-token-mean":
        expected = ((L * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / norm
    elif agg == "seq-mean-token-sum-norm":
        expected = (L * m).sum() / (B * norm)
    else:
        expected = (L * m).sum() / norm
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("per_token_adv", [True, False])
def test_gspo_is_verl(per_token_adv):
    logp, old, A, m = _inputs(seed=4, per_token_adv=per_token_adv)
    old = logp + 0.05 * (old - logp)  # sequence ratios near 1: some inside, some outside the clip
    ours = lambda x: rf.ppo_policy_loss(x, old.float(), A.float(), m, loss_mode="gspo", clip_low=3e-3,
                                        clip_high=4e-3, agg="seq-mean-token-mean")  # fmt: skip
    metrics = _compare(ours, lambda x: verl_gspo(x, old, A, m, 3e-3, 4e-3), logp, (("clipfrac", "pg_clipfrac"), ("approx_kl", "ppo_kl")))
    assert 0 < metrics["clipfrac"].item() < 1


def test_sapo_is_verl():
    logp, old, A, m = _inputs(seed=5)
    ours = lambda x: rf.ppo_policy_loss(x, old.float(), A.float(), m, loss_mode="sapo", sapo_tau_pos=1.0,
                                        sapo_tau_neg=1.05, agg="seq-mean-token-mean")  # fmt: skip
    _compare(ours, lambda x: verl_sapo(x, old, A, m, 1.0, 1.05), logp, (("approx_kl", "ppo_kl"),))


def test_geo_mean_is_verl():
    logp, old, A, m = _inputs(seed=6, per_token_adv=False)
    ours = lambda x: rf.ppo_policy_loss(x, old.float(), A.float(), m, loss_mode="geo_mean", clip_low=0.2,
                                        clip_high=0.28, agg="seq-mean-token-mean")  # fmt: skip
    _compare(ours, lambda x: verl_geo_mean(x, old, A, m, 0.2, 0.28), logp, (("approx_kl", "ppo_kl"),))


@pytest.mark.parametrize("agg", AGG_MODES[:3])
def test_cispo_is_verl(agg):
    logp, old, A, m = _inputs(seed=7)
    ours = lambda x: rf.ppo_policy_loss(x, old.float(), A.float(), m, loss_mode="cispo", clip_low=0.2,
                                        clip_high=0.28, agg=agg)  # fmt: skip
    metrics = _compare(ours, lambda x: verl_cispo(x, old, A, m, 0.2, 0.28, agg), logp,
                       (("clipfrac", "pg_clipfrac"), ("approx_kl", "ppo_kl")))  # fmt: skip
    assert 0 < metrics["clipfrac"].item() < 1


# ------------------------------------------------------------------------------- from logits, both impls

LOSS_CASES = [
    ("vanilla", dict(dual_clip=3.0), verl_vanilla),
    ("gspo", dict(agg="seq-mean-token-mean", clip_low=0.05, clip_high=0.06), verl_gspo),
    ("cispo", dict(), verl_cispo),
    ("sapo", dict(agg="seq-mean-token-mean"), verl_sapo),
    ("geo_mean", dict(agg="seq-mean-token-mean"), verl_geo_mean),
]


def _verl_loss(mode, logp, old, A, m, kw):
    lo = kw.get("clip_low", 0.2)
    hi = kw.get("clip_high", lo)
    if mode == "vanilla":
        return verl_vanilla(logp, old, A, m, lo, hi, 3.0, "token-mean")[0]
    if mode == "gspo":
        return verl_gspo(logp, old, A, m, lo, hi)[0]
    if mode == "cispo":
        return verl_cispo(logp, old, A, m, lo, hi, "token-mean")[0]
    if mode == "sapo":
        return verl_sapo(logp, old, A, m, 1.0, 1.05)[0]
    return verl_geo_mean(logp, old, A, m, lo, hi)[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode,kw", [(c[0], c[1]) for c in LOSS_CASES])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_from_logits_modes_with_kl_and_entropy(impl, mode, kw, estimator):
    """Every loss mode x every KL estimator with the entropy bonus, from logits: verl's policy loss plus
    kl_coef * agg(k) - entropy_coef * agg(H), all float64 from the same logits."""
    g = torch.Generator().manual_seed(8)
    B, T, V = 3, 6, 41
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    m = torch.ones(B, T, dtype=torch.float64)
    m[1, 4:] = 0
    m[2, 1] = 0
    labels[m == 0] = -100
    lp_all = torch.log_softmax(logits, -1)
    logp0 = lp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * m
    old = logp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp0 + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    A = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    agg = kw.get("agg", "token-mean")

    x = logits.float().requires_grad_(True)
    loss, _ = rf.ppo_loss_from_logits(x, labels, old.float(), A.float(), m, ref_logp=ref.float(), kl_coef=0.1,
                                      kl_estimator=estimator, entropy_coef=0.02, loss_mode=mode, impl=impl, **kw)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, x)

    xd = logits.clone().requires_grad_(True)
    lp_all = torch.log_softmax(xd, -1)
    logp = lp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * m
    ent = -(lp_all.exp() * lp_all).sum(-1)
    lr = logp - ref
    k = {"k1": lr, "k2": 0.5 * lr**2, "k3": torch.exp(-lr) - 1 + lr, "abs": lr.abs()}[estimator]
    ref_loss = _verl_loss(mode, logp, old, A, m, kw) + 0.1 * verl_agg(k, m, agg) - 0.02 * verl_agg(ent, m, agg)
    (ref_grad,) = torch.autograd.grad(ref_loss, xd)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
