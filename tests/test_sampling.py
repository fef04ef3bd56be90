"""rf.sample_tokens (rlhf_fast/sampling.py): Gumbel-max draws from counter-based noise are exact samples of
``softmax(logits / T)``, a pure function of (seed, position, token); both impls take the same argmax."""

import math

import pytest
import torch
from conftest import DEVICE, IMPLS

from rlhf_fast.sampling import gumbel_noise, sample_tokens
from rlhf_fast.sampling import row_seeds


def test_gumbel_noise_has_the_gumbel_law():
    g = gumbel_noise(row_seeds(0, 0, range(50_000)), 3, 8).double()
    assert g.mean().item() == pytest.approx(0.5772156649, abs=0.01)  # Euler-Mascheroni
    assert g.std().item() == pytest.approx(math.pi / math.sqrt(6), abs=0.01)
    for q in (0.1, 0.5, 0.9):  # the CDF exp(-exp(-x)) at its quantiles
        x = -math.log(-math.log(q))
        assert (g < x).double().mean().item() == pytest.approx(q, abs=0.005)
    # the columns (vocabulary entries) and positions are uncorrelated
    corr = torch.corrcoef(torch.stack([g[:, 0], g[:, 1], gumbel_noise(row_seeds(0, 0, range(50_000)), 4, 8)[:, 0].double()]))
    assert corr.sub(torch.eye(3, dtype=torch.float64)).abs().max() < 0.02


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gumbel_max_samples_the_softmax(temperature):
    """Chi-square goodness of fit of 40,000 draws against softmax(logits / T), computed in float64."""
    logits = torch.tensor([0.3, -1.0, 2.0, 0.0, -3.0, 1.2])
    n = 40_000
    draws = (logits / temperature + gumbel_noise(row_seeds(7, 2, range(n)), 0, 6)).argmax(-1)
    observed = torch.bincount(draws, minlength=6).double()
    expected = torch.softmax(logits.double() / temperature, -1) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # the 0.999 quantile of chi-square with 5 degrees of freedom


def test_noise_is_a_function_of_seed_position_and_token():
    seeds = row_seeds(3, 5, [0, 1, 2, 3])
    full = gumbel_noise(seeds, 2, 11)
    assert torch.equal(gumbel_noise(seeds[2:3], 2, 11), full[2:3])  # not of the other rows
    assert torch.equal(gumbel_noise(seeds, 2, 11, chunk=5), full)  # nor of the chunking
    assert not torch.equal(gumbel_noise(seeds, 3, 11), full)  # another position: other noise
    assert len(set(row_seeds(0, 0, range(1000)).tolist()) | set(row_seeds(0, 1, range(1000)).tolist())) == 2000
    assert not torch.equal(row_seeds(0, 0, [1]), row_seeds(1, 0, [1]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_tokens_matches_the_noise_and_the_softmax(impl, dtype):
    """Both implementations take the argmax of logits / T + gumbel_noise (the same hashed integers; the
    float32 logs may differ in the last bit, so a near-exact tie may go either way), over a vocabulary that is
    not a multiple of the kernel's block, and their draws follow softmax(logits / T)."""
    B, V, T = 64, 1000, 0.7
    logits = (torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    seeds = row_seeds(5, 9, range(B))
    tokens = sample_tokens(logits.to(DEVICE), seeds, 3, T, impl=impl).cpu()
    perturbed = logits.float() / T + gumbel_noise(seeds, 3, V)
    top2 = perturbed.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert clear.sum() > B - 3
    assert torch.equal(tokens[clear], perturbed.argmax(-1)[clear])
    assert int(tokens.min()) >= 0 and int(tokens.max()) < V
    # one row, many keys: the empirical law of the draws against softmax(logits / T) (chi-square, 3 df)
    row = torch.tensor([[1.0, 0.0, -1.0, 0.5]], dtype=dtype).expand(4000, 4)
    draws = sample_tokens(row.to(DEVICE), row_seeds(1, 2, range(4000)), 0, T, impl=impl).cpu()
    expected = torch.softmax(row[0].double() / T, -1) * 4000
    observed = torch.bincount(draws, minlength=4).double()
    assert float(((observed - expected) ** 2 / expected).sum()) < 16.3  # the 0.999 quantile


@pytest.mark.parametrize("impl", IMPLS)
def test_sample_tokens_masked_vocabulary(impl):
    """-inf logits (masked tokens) are never drawn; a row with one finite logit always draws it."""
    logits = torch.full((16, 37), float("-inf"))
    logits[:, 5], logits[:8, 30] = 0.0, 2.0
    tokens = sample_tokens(logits.to(DEVICE), row_seeds(0, 0, range(16)), 1, 1.0, impl=impl).cpu()
    assert set(tokens[8:].tolist()) == {5} and set(tokens[:8].tolist()) <= {5, 30}


# ------------------------------------------------------------------------------------ truncated sampling


def _chi2_critical(df: int, alpha: float) -> float:
    """Upper ``alpha`` quantile of chi-square with ``df`` degrees of freedom (Wilson-Hilferty: within ~1% of the
    exact quantile for df >= 3 at these tails)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - alpha)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sampler, kw", [("vllm", dict(top_k=12, top_p=0.8, min_p=0.05)), ("hf", dict(top_k=12, top_p=0.8, min_p=0.05)),
                                         ("vllm", dict(top_p=0.9)), ("hf", dict(min_p=0.1, temperature=0.7))])  # fmt: skip
def test_truncated_draws_stay_in_the_kept_set_and_follow_its_law(impl, sampler, kw):
    """Draws of one row with many keys (20,000 with the PyTorch impl or a GPU; under the Triton interpreter,
    whose per-row threshold search takes ~0.1 s a row, 1,000 draws and the first setting only; the Triton
    tokens equal the PyTorch ones on the same noise, tested below): never a token outside the kept set of the float64 reference, and the counts pass a chi-square
    test against the renormalised probabilities over the kept set at significance 1e-6 (the seed is fixed,
    so the outcome is deterministic; 1e-6 makes a false failure of a correct sampler negligible while a
    sampler that ignored the truncation fails by chi-square values in the thousands)."""
    from rlhf_fast.reference import truncation_keep_reference

    kw = dict(kw)
    T = kw.pop("temperature", 1.0)
    V = 40
    logits = torch.randn(V, generator=torch.Generator().manual_seed(11)) * 0.7
    interpreted = impl == "triton" and DEVICE.type != "cuda"
    if interpreted and (sampler, kw) != ("vllm", dict(top_k=12, top_p=0.8, min_p=0.05)):
        pytest.skip("the Triton interpreter runs one setting (slow threshold search); a GPU runs them all")
    n = 1000 if interpreted else 20_000
    row = logits.expand(n, V).contiguous()
    draws = sample_tokens(row.to(DEVICE), row_seeds(4, 1, range(n)), 0, T, impl=impl, sampler=sampler, **kw).cpu()
    z = logits.double().unsqueeze(0) / T
    keep = truncation_keep_reference(z, torch.tensor([kw.get("top_k", 0)]), torch.tensor([kw.get("top_p", 1.0)]).double(),
                                     torch.tensor([kw.get("min_p", 0.0)]).double(), sampler)[0]  # fmt: skip
    assert 3 <= int(keep.sum()) < V  # a real truncation
    assert keep[draws].all(), "a token outside the kept set was drawn"
    probs = torch.softmax(z[0].masked_fill(~keep, -float("inf")), -1)[keep]
    observed = torch.bincount(draws, minlength=V).double()[keep]
    expected = probs * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_critical(int(keep.sum()) - 1, 1e-6), chi2


@pytest.mark.parametrize("impl", IMPLS)
def test_truncated_sampling_matches_the_masked_noise_and_is_batch_invariant(impl):
    """Per-row settings (some rows off): the token is the argmax of ``z + noise`` over the reference's kept
    set (both impls; ties within 1e-4 excepted), a row's token does not depend on the rows around it, and
    off values draw exactly the untruncated tokens."""
    from rlhf_fast.reference import truncation_keep_reference

    B, V, T = 12, 301, 0.8
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(2)) * 3
    seeds = row_seeds(1, 3, range(B))
    top_k = torch.tensor([0, 5, 50, 301, 1, 20] * 2)
    top_p = torch.tensor([1.0, 0.9, 0.6, 0.95, 1.0, 1.0] * 2)
    tokens = sample_tokens(logits.to(DEVICE), seeds, 2, T, top_k=top_k.to(DEVICE), top_p=top_p.to(DEVICE), impl=impl).cpu()
    keep = truncation_keep_reference(logits.double() / T, top_k, top_p.double(), torch.zeros(B).double(), "vllm")
    perturbed = (logits / T + gumbel_noise(seeds, 2, V)).masked_fill(~keep, -float("inf"))
    top2 = perturbed.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert clear.sum() >= B - 2 and torch.equal(tokens[clear], perturbed.argmax(-1)[clear])
    assert keep.gather(-1, tokens.unsqueeze(-1)).all()
    for b in (1, 7):  # alone, the same token
        alone = sample_tokens(logits[b : b + 1].to(DEVICE), seeds[b : b + 1], 2, T, top_k=int(top_k[b]),
                              top_p=float(top_p[b]), impl=impl).cpu()  # fmt: skip
        assert alone.item() == tokens[b].item()
    off = sample_tokens(logits.to(DEVICE), seeds, 2, T, top_k=0, top_p=1.0, min_p=0.0, impl=impl).cpu()
    assert torch.equal(off, sample_tokens(logits.to(DEVICE), seeds, 2, T, impl=impl).cpu())
