"""rlhf_fast.integrations.openrlhf against OpenRLHF's own code (0.11.2, ``pip install --no-deps openrlhf``).

``openrlhf.models`` imports peft and DeepSpeed, so these tests do not import the package: they compile
the definitions they compare with from the installed files (``openrlhf/models/loss.py``:
``aggregate_loss``, ``PolicyLoss``; ``openrlhf/models/utils.py``: ``masked_mean``, ``compute_approx_kl``,
``log_probs_from_logits``, ``_logsumexp_by_chunk``, ``compute_entropy``, ``KL_IS_WEIGHT_CLIP``), decorators
dropped. The OpenRLHF side runs in float64.
"""

import ast
from typing import Optional, Tuple, Union

import pytest
import torch
from peer_wheels import package_dir
import torch.nn.functional as F

from rlhf_fast.integrations import count_op_calls
from rlhf_fast.integrations import openrlhf as rfo

OPENRLHF_VERSION = "0.11.2"

# OpenRLHF's files at the tested version: the installed package if it is that one, else its wheel, fetched
# once (tests/peer_wheels.py); never imported (openrlhf.models needs peft and DeepSpeed)
ROOT = package_dir("openrlhf", OPENRLHF_VERSION)


def _definitions(relpath: str, names: list[str], namespace: dict) -> dict:
    """Compile the top-level functions, classes and assignments ``names`` of ``relpath`` into ``namespace``."""
    tree = ast.parse((ROOT / relpath).read_text())

    def name(n):
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            return n.name
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name):
            return n.targets[0].id
        return None

    nodes = [n for n in tree.body if name(n) in names]
    assert sorted(name(n) for n in nodes) == sorted(names), f"OpenRLHF moved one of {names}"
    for n in nodes:
        if hasattr(n, "decorator_list"):
            n.decorator_list = []
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(ROOT / relpath), "exec"), namespace)
    return namespace


NS = {"torch": torch, "nn": torch.nn, "F": F, "Optional": Optional, "Tuple": Tuple, "Union": Union}
_definitions("models/utils.py", ["masked_mean", "compute_approx_kl", "log_probs_from_logits", "_logsumexp_by_chunk",
                                 "compute_entropy", "KL_IS_WEIGHT_CLIP"], NS)  # fmt: skip
_definitions("models/loss.py", ["aggregate_loss", "PolicyLoss"], NS)


def _batch(B=5, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout = old + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[0, :3] = 1
    old[0, :3] = logp[0, :3] - 1.5  # ratio e^1.5 ...
    adv[0, :3] = -1.0  # ... with A < 0: the dual clip at 3 is active
    mask[3] = 0  # a response without any token
    return logp, old, rollout, adv, mask


GLOBAL = [{}, {"dp_size": 4, "batch_num_tokens": 97.0, "global_batch_size": 17.0}]
CONFIGS = [
    {},
    {"clip_eps_high": 0.28, "dual_clip": 3.0},
    {"token_level_loss": False, "dual_clip": 3.0},
    {"is_correction_level": "token", "is_correction_mode": "clip", "is_correction_threshold": (0.5, 2.0)},
    {"is_correction_level": "token", "is_correction_mode": "mask", "is_correction_threshold": (0.5, 1.5),
     "token_level_loss": False},
    # sequence-level correction: the gate reads each row's geometric-mean ratio, or its mean divergence
    {"is_correction_level": "seq", "is_correction_threshold": (0.8, 1.25), "dual_clip": 3.0},
    {"is_correction_level": "seq", "is_correction_gating": "tv", "is_correction_threshold": (0.0, 0.12),
     "token_level_loss": False},
    # divergence gates per token
    {"is_correction_level": "token", "is_correction_gating": "binary_kl", "is_correction_threshold": (0.0, 0.02)},
    {"is_correction_level": "token", "is_correction_gating": "tv", "is_correction_threshold": (-1.0, 0.05),
     "clip_eps_high": 0.28},
    # GSPO (one advantage per sequence), alone, with the dual clip, and against the rollout policy
    {"policy_loss_type": "gspo", "clip_eps_low": 0.05, "clip_eps_high": 0.05, "token_level_loss": True},  # (ignored)
    {"policy_loss_type": "gspo", "clip_eps_low": 0.1, "clip_eps_high": 0.15, "dual_clip": 1.2},
    {"policy_loss_type": "gspo", "is_correction_level": "token", "clip_eps_low": 0.1, "clip_eps_high": 0.15},
]  # fmt: skip


@pytest.mark.parametrize("global_info", GLOBAL)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_policy_loss_matches_openrlhf(cfg, global_info):
    logp, old, rollout, adv, mask = _batch()
    if cfg.get("policy_loss_type") == "gspo":
        adv = adv[:, :1].expand_as(adv).clone()  # GSPO's (and GRPO's) one advantage per sequence
    lp64 = logp.clone().requires_grad_()
    want = NS["PolicyLoss"](**cfg)(lp64, old, adv, mask, rollout, **global_info)
    want[0].backward()
    lp = logp.float().requires_grad_()
    with count_op_calls("ppo_policy_loss") as calls:
        got = rfo.PolicyLoss(**cfg)(lp, old.float(), adv.float(), mask.float(), rollout.float(), **global_info)
    assert calls["ppo_policy_loss"] == 1  # the loss is rlhf_fast's op
    got[0].backward()
    torch.testing.assert_close(got[0].double(), want[0].detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lp.grad.double(), lp64.grad, rtol=1e-5, atol=1e-7)
    for a, b in zip(got[1:], want[1:]):  # clip_ratio, ppo_kl, vllm_kl, is_filter_ratio
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-7)
    assert want[1] > 0
    if want[4] is not None:
        assert 0 < want[4] < 1  # the gate does drop or clamp some tokens (rows), not all


def test_gspo_inputs_it_cannot_match_are_a_clear_error():
    """OpenRLHF's GSPO gradient differs from rf's gspo for per-token advantages and weighted masks: refused."""
    logp, old, _, adv, mask = _batch()
    loss = rfo.PolicyLoss(policy_loss_type="gspo")
    with pytest.raises(ValueError, match="advantages"):
        loss(logp.float(), old.float(), adv.float(), mask.float())
    row_adv = adv[:, :1].expand_as(adv).float()
    with pytest.raises(ValueError, match="action_mask"):
        loss(logp.float(), old.float(), row_adv, mask.float() * 0.5)
    adv_off_mask = torch.where(mask.bool(), row_adv, 7.0)  # what the advantages hold outside the mask is free
    loss(logp.float(), old.float(), adv_off_mask, mask.float())
    with pytest.raises(ValueError, match="rollout_log_probs"):
        rfo.PolicyLoss(policy_loss_type="gspo", is_correction_level="seq")(logp, old, row_adv, mask)


@pytest.mark.parametrize("cfg", [{"policy_loss_type": "grpo"}, {"is_correction_level": "sequence"},
                                 {"is_correction_gating": "kl"}, {"is_correction_mode": "drop"},
                                 {"dual_clip": 1.0},
                                 {"is_correction_level": "seq", "is_correction_mode": "clip"},
                                 {"is_correction_level": "token", "is_correction_gating": "tv",
                                  "is_correction_mode": "clip"},
                                 {"is_correction_level": "token", "is_correction_gating": "tv"}])  # fmt: skip
def test_policy_loss_rejects_what_openrlhf_rejects(cfg):
    with pytest.raises((ValueError, AssertionError)):  # OpenRLHF: its constructor, or forward for the loss type
        NS["PolicyLoss"](**cfg)(*_batch()[:2], _batch()[3], _batch()[4])
    with pytest.raises(ValueError, match="is_correction|policy_loss_type|dual_clip"):
        rfo.PolicyLoss(**cfg)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_and_entropy_match_openrlhf(temperature):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, 29, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 29, (3, 6), generator=g)
    gl, ge = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    x64 = logits.clone().requires_grad_()
    scaled = x64 / temperature  # OpenRLHF's Actor divides once, then both functions read the scaled logits
    want_lp = NS["log_probs_from_logits"](scaled.clone(), labels)
    want_ent = NS["compute_entropy"](scaled)
    ((want_lp * gl).sum() + (want_ent * ge).sum()).backward()
    x = logits.float().requires_grad_()
    lp, ent = rfo.log_probs_from_logits(x, labels, temperature, return_entropy=True)
    ((lp.double() * gl).sum() + (ent.double() * ge).sum()).backward()
    torch.testing.assert_close(lp.double(), want_lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(x.detach(), logits.float())  # not divided in place


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_compute_approx_kl_matches_openrlhf(estimator, unbiased):
    g = torch.Generator().manual_seed(6)
    logp = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 4
    base = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 4
    old = logp + 0.5 * torch.randn(4, 7, generator=g, dtype=torch.float64)
    base[0, 0], base[0, 1] = logp[0, 0] + 15, logp[0, 1] - 15  # the clamps
    old[1, 0] = logp[1, 0] - 5  # the IS weight's cap
    lp64 = logp.clone().requires_grad_()
    want = NS["compute_approx_kl"](lp64, base, old, kl_estimator=estimator, unbiased_gradient=unbiased)
    want.sum().backward()
    lp = logp.float().requires_grad_()
    got = rfo.compute_approx_kl(lp, base.float(), old.float(), kl_estimator=estimator, unbiased_gradient=unbiased)
    got.sum().backward()
    # (OpenRLHF computes in float32 whatever the input: its side is float32 here)
    torch.testing.assert_close(got.double(), want.detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad.double(), lp64.grad, rtol=1e-5, atol=1e-6)
    assert rfo.KL_IS_WEIGHT_CLIP == NS["KL_IS_WEIGHT_CLIP"]


def test_log_probs_from_logits_with_truncation_is_the_truncated_distributions():
    """OpenRLHF's vLLM rollouts sample with ``--top_k`` / ``--top_p``: the drop-in's truncation keywords give
    that distribution's log-probs and entropy (float64 reference, vLLM's sampler; ``-inf`` outside the kept
    set, no gradient through it); off values are the plain function, bitwise."""
    from rlhf_fast.reference import truncated_logprobs_reference

    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 6, 29, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 29, (3, 6), generator=g)
    gl, ge = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    x64 = logits.clone().requires_grad_()
    want_lp, want_ent = truncated_logprobs_reference(x64, labels, temperature=0.7, top_k=8, top_p=0.9, min_p=0.02)
    missed = torch.isinf(want_lp)
    assert missed.any() and not missed.all()
    ((want_lp.masked_fill(missed, 0) * gl).sum() + (want_ent * ge).sum()).backward()
    x = logits.float().requires_grad_()
    lp, ent = rfo.log_probs_from_logits(x, labels, 0.7, return_entropy=True, top_k=8, top_p=0.9, min_p=0.02)
    assert torch.equal(torch.isinf(lp), missed)
    ((lp.masked_fill(missed, 0).double() * gl).sum() + (ent.double() * ge).sum()).backward()
    torch.testing.assert_close(lp.masked_fill(missed, 0).double(), want_lp.detach().masked_fill(missed, 0), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), want_ent.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    off = rfo.log_probs_from_logits(logits.float(), labels, 0.7, top_k=0, top_p=1.0, min_p=0.0)
    assert torch.equal(off, rfo.log_probs_from_logits(logits.float(), labels, 0.7))
