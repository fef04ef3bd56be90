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
