"""Truncated sampling (top-k / top-p / min-p) in rf.logprobs and rf.sequence_logprobs, both impls, against
a float64 reference of each sampler (rlhf_fast/reference.py: truncation_keep_reference) and against
transformers' warpers themselves.

The "vllm" semantics follow vLLM v1's sampler, read (not copied) from vllm-project/vllm:
- vllm/v1/sample/ops/topk_topp_sampler.py (apply_top_k_top_p_pytorch) at commit
  01fa3fe74b058bb604f236341ab2361c7cf3d25b: top-k keeps ``logits >= k-th largest`` (ties kept), top-p sorts
  ascending, drops ``cumsum(softmax) <= 1 - p`` and never the last (largest);
- vllm/v1/sample/logits_processor/builtin.py (MinPLogitsProcessor.apply) at commit
  0272a72cf31cc4ed3df036ccfd2a1ea2812961e0: drops ``softmax < min_p * max softmax``; vLLM applies the
  logits processors (min-p) after the temperature and before top-k / top-p.
"""

import math

import pytest
import torch
from conftest import DEVICE, IMPLS
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import rlhf_fast as rf
from rlhf_fast.reference import truncated_logprobs_reference

TRUNC_IMPLS = IMPLS
RTOL = 2e-5  # the bar: within 2e-5 relative of float64 (of the largest magnitude of each output)


def run(logits, labels, impl, **kw):
    """``(logp, entropy, grad)`` of rf.logprobs with truncation, the gradient of ``sum(g1 logp + g2 H)`` over
    the finite log-probs, with fixed random ``g1, g2``."""
    x = logits.detach().clone().to(DEVICE).requires_grad_(True)
    logp, ent = rf.logprobs(x, labels.to(DEVICE), return_entropy=True, impl=impl, **kw)
    gen = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(labels.shape, generator=gen), torch.randn(labels.shape, generator=gen)
    loss = (torch.where(torch.isfinite(logp), logp, 0.0) * g1.to(DEVICE)).sum() + (ent * g2.to(DEVICE)).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return logp.detach().cpu(), ent.detach().cpu(), grad.cpu(), (g1, g2)


def reference(logits, labels, gs, **kw):
    x = logits.detach().double().requires_grad_(True)
    logp, ent = truncated_logprobs_reference(x, labels, **kw)
    g1, g2 = gs
    loss = (torch.where(torch.isfinite(logp), logp, 0.0) * g1.double()).sum() + (ent * g2.double()).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return logp.detach(), ent.detach(), grad


def max_rel_err(ours, ref):
    """Largest ``|ours - ref|`` relative to the largest ``|ref|`` (finite entries)."""
    if ref.numel() == 0:
        return 0.0
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def check(logits, labels, impl, **kw):
    logp, ent, grad, gs = run(logits, labels, impl, **kw)
    cpu_kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_logp, ref_ent, ref_grad = reference(logits, labels, gs, **cpu_kw)
    # the same tokens are kept: -inf log-probs exactly where the reference has them
    assert torch.equal(torch.isinf(logp), torch.isinf(ref_logp))
    assert not torch.isnan(logp).any() and not torch.isnan(ent).any() and not torch.isnan(grad).any()
    fin = torch.isfinite(ref_logp)
    errs = {"logp": max_rel_err(logp[fin], ref_logp[fin]), "entropy": max_rel_err(ent, ref_ent)}
    if logits.dtype == torch.float32:
        errs["grad"] = max_rel_err(grad, ref_grad)
    else:  # a gradient stored in bf16: at most one rounding of the float64 one (plus the float32 bar)
        tol = torch.finfo(logits.dtype).eps * ref_grad.abs() + RTOL * ref_grad.abs().max()
        assert ((grad.double() - ref_grad).abs() <= tol).all()
    for name, err in errs.items():
        assert err <= RTOL, f"{name}: relative error {err:.3g}"
    return logp, ent, grad, errs


def _logits(shape, scale=3.0, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _labels(logits, seed=0):
    """Labels drawn from softmax(logits): most are kept by a mild truncation, some are not."""
    probs = torch.softmax(logits.float().reshape(-1, logits.shape[-1]), -1)
    lab = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).reshape(logits.shape[:-1])
    return lab


CASES = {
    "top_k": dict(top_k=7),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.1),
    "k_p": dict(top_k=20, top_p=0.9),
    "k_p_minp_T": dict(top_k=30, top_p=0.85, min_p=0.05, temperature=0.7),
    "p_minp_T2": dict(top_p=0.7, min_p=0.2, temperature=1.6),
}


@pytest.mark.parametrize("impl", TRUNC_IMPLS)
@pytest.mark.parametrize("sampler", ["vllm", "hf"])
@pytest.mark.parametrize("case", list(CASES))
def test_against_float64_reference(impl, sampler, case):
    logits = _logits((3, 5, 131))  # odd V
    labels = _labels(logits)
    labels[0, 0] = -100
    _, _, _, errs = check(logits, labels, impl, sampler=sampler, **CASES[case])


@pytest.mark.parametrize("impl", TRUNC_IMPLS)
def test_per_row_tensors_with_rows_off(impl):
    N, V = 6, 257
    logits = _logits((N, V), seed=3)
    labels = _labels(logits, seed=3)
    top_k = torch.tensor([0, 5, V, 40, 1, 300])  # 0 and >= V: off
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.99, 0.3])
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.2, 0.0, 0.0])
    for sampler in ("vllm", "hf"):
        check(logits, labels, impl, top_k=top_k.to(DEVICE), top_p=top_p.to(DEVICE), min_p=min_p.to(DEVICE),
              sampler=sampler)  # fmt: skip
    # a [B] tensor for [B, T] rows broadcasts over T
    logits3 = _logits((2, 3, 67), seed=4)
    check(logits3, _labels(logits3), impl, top_k=torch.tensor([3, 0], device=DEVICE), top_p=0.9)


@pytest.mark.parametrize("impl", TRUNC_IMPLS)
def test_long_tailed_logits_and_large_odd_vocab(impl):
    # Zipf-like: p_v ~ 1 / rank^1.1 over 50257 tokens, shuffled; top-p keeps a long tail of small masses
    V = 50257
    ranks = torch.randperm(V, generator=torch.Generator().manual_seed(0)).double() + 1
    logits = torch.stack([-1.1 * ranks.log(), -0.9 * ranks.roll(7).log()]).float()
    labels = torch.tensor([int(ranks.argsort()[100]), int(ranks.argsort()[3])])
    for kw in (dict(top_p=0.95), dict(top_k=50, top_p=0.95), dict(min_p=0.001, top_p=0.9, sampler="hf")):
        check(logits, labels, impl, **kw)


@pytest.mark.parametrize("impl", TRUNC_IMPLS)
def test_masked_vocabulary_and_missed_labels(impl):
    """-inf entries (masked vocabulary), top_k beyond the finite entries, labels on -inf entries and outside
    the kept set: -inf log-prob, zero gradient for that row's label, never NaN."""
    V = 97
    logits = _logits((4, V), seed=5)
    logits[0, 10:] = -float("inf")  # 10 finite entries, top_k = 20 keeps them all (and the -inf ones)
    logits[1, ::3] = -float("inf")
    labels = torch.tensor([15, 3, int(logits[2].argmin()), int(logits[3].argmax())])
    logp, ent, grad, _ = check(logits, labels, impl, top_k=20, top_p=0.9)
    assert logp[0] == -float("inf") and logp[2] == -float("inf") and math.isfinite(logp[3])
    # a row whose label was missed gets the entropy's gradient only: none on the label logit, none outside
    for sampler in ("vllm", "hf"):
        x = logits.clone().requires_grad_(True)
        lp = rf.logprobs(x.to(DEVICE), labels.to(DEVICE), top_k=5, impl=impl, sampler=sampler)
        lp.sum().backward()  # the loss is -inf; its gradient must still be finite and 0 for missed rows
        assert torch.isfinite(x.grad).all() and (x.grad[2] == 0).all() and (x.grad[0] == 0).all()


@pytest.mark.parametrize("impl", TRUNC_IMPLS)
def test_bf16_input(impl):
    logits = _logits((4, 3, 211), seed=6).to(torch.bfloat16)
    labels = _labels(logits, seed=6)
    check(logits, labels, impl, top_k=25, top_p=0.9, min_p=0.02, temperature=0.8)


@pytest.mark.parametrize("impl", TRUNC_IMPLS)
@pytest.mark.parametrize("off", [dict(top_k=0), dict(top_k=131), dict(top_k=1000), dict(top_p=1.0), dict(min_p=0.0),
                                 dict(top_k=0, top_p=1.0, min_p=0.0, sampler="hf"), "tensors"])  # fmt: skip
def test_off_values_are_bitwise_no_ops(impl, off):
    logits = _logits((2, 5, 131), seed=7)
    labels = _labels(logits, seed=7)
    if off == "tensors":
        off = dict(top_k=torch.tensor([0, 131], device=DEVICE), top_p=torch.ones(10, device=DEVICE),
                   min_p=torch.zeros(2, 5, device=DEVICE))  # fmt: skip
    plain = run(logits, labels, impl, temperature=0.9)
    ours = run(logits, labels, impl, temperature=0.9, **off)
    for a, b in zip(plain[:3], ours[:3]):
        assert torch.equal(a, b)


def _hf_warped_logprobs(logits, labels, temperature, top_k, top_p, min_p):
    """float64 log_softmax of transformers' warpers applied in generate's order (temperature, top-k, top-p,
    min-p), gathered at the labels: what a user of transformers writes today."""
    scores = logits.double() / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    logp_all = torch.log_softmax(scores, -1)
    ent = -(logp_all.exp() * torch.where(torch.isinf(logp_all), 0.0, logp_all)).sum(-1)
    return logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1), ent


@pytest.mark.parametrize("impl", TRUNC_IMPLS)
@pytest.mark.parametrize("params", [(0.7, 10, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.15),
                                    (1.3, 40, 0.9, 0.05), (0.6, 100, 0.5, 0.3)])  # fmt: skip
def test_hf_sampler_equals_transformers_warpers(impl, params):
    T, k, p, mp = params
    logits = _logits((16, 301), seed=8)
    labels = _labels(logits / T, seed=8)
    ref_logp, ref_ent = _hf_warped_logprobs(logits, labels, T, k, p, mp)
    logp, ent = rf.logprobs(logits.to(DEVICE), labels.to(DEVICE), temperature=T, top_k=k, top_p=p, min_p=mp,
                            sampler="hf", return_entropy=True, impl=impl)  # fmt: skip
    logp, ent = logp.cpu(), ent.cpu()
    assert torch.equal(torch.isinf(logp), torch.isinf(ref_logp))
    fin = torch.isfinite(ref_logp)
    assert max_rel_err(logp[fin], ref_logp[fin]) <= RTOL and max_rel_err(ent, ref_ent) <= RTOL


@pytest.mark.parametrize("impl", TRUNC_IMPLS)
def test_closed_forms_and_the_two_orders(impl):
    """p = (0.4, 0.3, 0.2, 0.1), min_p = 0.3 (drops 0.1), top_p = 0.75. vLLM (min-p first): top-p on
    (4, 3, 2)/9 drops the 0.2 token (mass above it 7/9 >= 0.75), so p(token 1) = 0.3 / 0.7. transformers
    (top-p first, on the full row): mass above the 0.2 token is 0.7 < 0.75, kept; min-p keeps it too:
    p(token 1) = 0.3 / 0.9, and token 2 keeps 0.2 / 0.9."""
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(2, 4).contiguous()
    labels = torch.tensor([1, 2])
    kw = dict(top_p=0.75, min_p=0.3, impl=impl)
    v = rf.logprobs(logits.to(DEVICE), labels.to(DEVICE), sampler="vllm", **kw).cpu().double()
    h = rf.logprobs(logits.to(DEVICE), labels.to(DEVICE), sampler="hf", **kw).cpu().double()
    assert v[0].item() == pytest.approx(math.log(0.3 / 0.7), rel=1e-6) and v[1].item() == -float("inf")
    assert h[0].item() == pytest.approx(math.log(0.3 / 0.9), rel=1e-6)
    assert h[1].item() == pytest.approx(math.log(0.2 / 0.9), rel=1e-6)
    # ties at the k-th value are kept: top_k=2 on (3, 1, 1, 1, 0) keeps four tokens
    tied = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    lp = rf.logprobs(tied.to(DEVICE), torch.tensor([3], device=DEVICE), top_k=2, impl=impl).cpu()
    assert lp.item() == pytest.approx(1.0 - math.log(math.e**3 + 3 * math.e), rel=1e-6)
    # top-p keeps a whole tie: p = (0.4, 0.2, 0.2, 0.2), top_p = 0.5 keeps the three 0.2 tokens
    tie_p = torch.tensor([[0.4, 0.2, 0.2, 0.2]]).log()
    lp = rf.logprobs(tie_p.to(DEVICE), torch.tensor([2], device=DEVICE), top_p=0.5, impl=impl).cpu()
    assert lp.item() == pytest.approx(math.log(0.2), rel=1e-5)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(top_k=torch.tensor([1.0, 2.0])), "top_k"),
        (dict(top_k=torch.tensor([1, -2])), "top_k"),
        (dict(top_k=torch.tensor([1, 2, 3])), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_p=torch.tensor([0.5, 0.0])), "top_p"),
        (dict(top_p=torch.tensor([1, 1])), "top_p"),
        (dict(min_p=1.0), "min_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=torch.tensor([0.5, 1.0])), "min_p"),
        (dict(min_p="0.1"), "min_p"),
        (dict(top_k=5, sampler="sglang"), "sampler"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kw, name):
    logits, labels = torch.randn(2, 10), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=name):
        rf.logprobs(logits, labels, impl="torch", **kw)


@pytest.mark.parametrize("impl", TRUNC_IMPLS)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_passes_truncation_through(impl, average):
    logits = _logits((3, 6, 53), seed=9)
    labels = logits.topk(2, dim=-1).indices[..., 1]  # the second most likely token: kept by every setting here
    labels[:, :2] = -100
    labels[1, 4] = int(logits[1, 4].argmin())  # outside the kept set: the sequence's log-prob is -inf
    kw = dict(top_k=torch.tensor([10, 0, 4], device=DEVICE), top_p=0.9, sampler="hf")
    x = logits.clone().to(DEVICE).requires_grad_(True)
    seq = rf.sequence_logprobs(x, labels.to(DEVICE), average=average, impl=impl, **kw)
    ref_tok, _ = truncated_logprobs_reference(logits.double(), labels, top_k=kw["top_k"].cpu(), top_p=0.9, sampler="hf")
    ref_seq = ref_tok.sum(-1)
    if average:
        ref_seq = ref_seq / (labels != -100).sum(-1)
    assert seq[1].item() == -float("inf")
    assert max_rel_err(seq.cpu()[[0, 2]], ref_seq[[0, 2]]) <= RTOL
    seq[[0, 2]].sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- the PyTorch twin's search paths


def _kept_sets(z, **kw):
    """``(ours, reference)`` kept masks of float32 rows ``z [n, V]``: ``z >= tau`` of
    ``truncation.row_thresholds`` and the float64 sorters' mask."""
    from rlhf_fast import truncation
    from rlhf_fast.reference import truncation_keep_reference

    n, V = z.shape
    trunc = truncation.check_truncation(kw.get("top_k"), kw.get("top_p"), kw.get("min_p"), kw.get("sampler", "vllm"),
                                        (n,), V, z.device)  # fmt: skip
    tau = truncation.row_thresholds(z, trunc)
    ref = truncation_keep_reference(z.double(), trunc.top_k.long(), trunc.top_p.double(), trunc.min_p.double(),
                                    trunc.sampler)  # fmt: skip
    return z >= tau.unsqueeze(-1), ref


def test_torch_top_p_alone_widens_its_prefix_until_the_nucleus_ends():
    """top-p without top-k takes the largest 256 values of its rows, then 8x more while a row's nucleus runs
    past them: flat rows (nuclei of thousands) next to peaked ones (a few tokens) in one chunk, each kept set
    the float64 sorters' set."""
    gen = torch.Generator().manual_seed(5)
    V = 6007
    z = torch.randn(6, V, generator=gen) * torch.tensor([0.3, 0.3, 6.0, 12.0, 1.0, 3.0]).unsqueeze(-1)
    for kw in (dict(top_p=0.9), dict(top_p=torch.tensor([0.95, 0.5, 0.9, 0.99, 0.7, 0.2]), min_p=0.001),
               dict(top_p=0.8, min_p=0.02, sampler="hf")):  # fmt: skip
        ours, ref = _kept_sets(z, **kw)
        assert torch.equal(ours, ref), kw
    ours, _ = _kept_sets(z, top_p=0.9)
    sizes = ours.sum(-1)
    assert sizes[0] > 2048 and sizes[3] < 256  # the widest prefix (16384 > V: the whole row) and the first


def test_torch_top_k_then_top_p_reuses_the_top_k_values_unless_tied_past_them():
    """With top-k, top-p reads the top-k values (one past the largest k): exact with ties at the k-th value
    (the whole tie kept) and with a per-row k, where it falls back to a wider prefix."""
    gen = torch.Generator().manual_seed(6)
    z = (torch.randn(8, 1001, generator=gen) * 2).round(decimals=1)  # many ties
    k = torch.tensor([5, 50, 1, 20, 0, 7, 300, 12])
    for kw in (dict(top_k=20, top_p=0.9), dict(top_k=k, top_p=0.95), dict(top_k=k, top_p=0.6, min_p=0.05, sampler="hf"),
               dict(top_k=50, top_p=torch.tensor([0.9, 1.0] * 4))):  # fmt: skip
        ours, ref = _kept_sets(z, **kw)
        assert torch.equal(ours, ref), kw


def test_keys_on_reads_every_engines_off_values():
    """One reading of "off" for the trainers' keys, TRL's GRPOConfig and verl's rollout config: top_k 0 (ours,
    transformers, TRL) or -1 (vLLM, verl), top_p 1, min_p 0, or None; anything else is kept as given."""
    from rlhf_fast.truncation import keys_on

    for off in (dict(), dict(top_k=0, top_p=1.0, min_p=0.0), dict(top_k=-1, top_p=None, min_p=None)):
        assert keys_on(**off) == {}
    assert keys_on(top_k=20, top_p=0.9, min_p=0.05) == dict(top_k=20, top_p=0.9, min_p=0.05)
    assert keys_on(top_k=-1, top_p=0.95, min_p=0.0) == dict(top_p=0.95)
    assert keys_on(top_k=1, top_p=1.0, min_p=1e-6) == dict(top_k=1, min_p=1e-6)
