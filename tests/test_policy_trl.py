"""The policy-loss family against TRL's own GRPO loss: ``trl.GRPOTrainer._compute_loss`` (trl 1.16) called
on identical inputs, through ``rf.ppo_loss_from_logits`` (both impls).

``_compute_loss`` is a method: it runs here with a stand-in ``self`` that carries the trainer's
configuration attributes and returns our float64 log-probs and entropies of the same logits from
``_get_per_token_logps_and_entropies`` (the model call), a single process and no gradient accumulation.
TRL's loss and its gradient with respect to the logits (float64) are compared with ours (float32), and its
logged metrics with ours where they mean the same thing.

The vLLM importance-sampling ratio is computed by TRL in ``_generate_and_score_completions`` (a method that
generates); ``_trl_vllm_is_ratio`` below is a float64 transcription of those lines (trl 1.16.0,
trl/trainer/grpo_trainer.py, ``GRPOTrainer._generate_and_score_completions``, "Compute the importance
sampling ratio when using vLLM").
"""

import math
import types
from collections import defaultdict

import pytest
import torch
from conftest import IMPLS

import rlhf_fast as rf

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")


def _batch(B=4, T=7, V=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([T, T - 2, 3, T - 1])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    labels = labels.masked_fill(mask == 0, 0)  # TRL's completion ids: real token ids (pad) after the end
    return logits, labels, old, ref, rollout, adv, mask


def _trl_vllm_is_ratio(old, rollout, mask, mode, clip_min, clip_max):
    """float64 transcription of TRL 1.16's vLLM IS ratio (see the module docstring)."""
    diff = torch.nan_to_num((old - rollout) * mask, nan=0.0)
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), value=0.0)


def _run_trl(logits, labels, old, ref, adv, mask, *, loss_type, epsilon=0.2, epsilon_high=None, beta=0.0,
             delta=None, level="token", bias_kl=False, is_ratio=None, entropy_coef=0.0, max_len=None, grad_accum=1,
             num_items=None):  # fmt: skip
    """TRL's loss (float64), its gradient with respect to ``logits``, and its logged metrics; ``grad_accum``:
    the batch is one of that many micro-batches of an accumulation window holding ``num_items`` tokens
    (``steps_per_generation == grad_accum``, TRL's default)."""
    x = logits.detach().clone().requires_grad_(True)

    def per_token(model, input_ids, attention_mask, logits_to_keep, **kw):
        lp_all = torch.log_softmax(x, -1)
        logp = lp_all.gather(-1, labels[..., None]).squeeze(-1)
        ent = -(lp_all.exp() * lp_all).sum(-1)
        return logp, ent, None

    B, T = labels.shape
    ident = types.SimpleNamespace(
        gather=lambda t: t, gather_for_metrics=lambda t: t, reduce=lambda t, reduction="sum": t, num_processes=1,
        sync_gradients=True,
    )  # fmt: skip
    self = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=grad_accum, accelerator=ident, aux_loss_enabled=False,
        _entropy_bonus_enabled=entropy_coef != 0, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        max_completion_length=max_len or T, _metrics=defaultdict(lambda: defaultdict(list)),
        args=types.SimpleNamespace(use_bias_correction_kl=bias_kl, delta=delta, sapo_temperature_pos=1.0,
                                   sapo_temperature_neg=1.05, steps_per_generation=grad_accum),
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": labels, "completion_mask": mask, "advantages": adv, "old_per_token_logps": old,
        "ref_per_token_logps": ref, "num_items_in_batch": mask.sum().double() if num_items is None else torch.tensor(float(num_items)),
    }  # fmt: skip
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = trl_grpo.GRPOTrainer._compute_loss(self, None, inputs)
    (grad,) = torch.autograd.grad(loss, x)
    metrics = {k: v[-1] for k, v in self._metrics["train"].items()}
    return loss.detach(), grad, metrics


# TRL loss_type -> rlhf_fast arguments (the README's mapping table)
def _ours_for(loss_type, mask, *, epsilon_high=None, level="token", max_len=None):
    n_tokens = float(mask.sum())
    kw = {
        "grpo": dict(agg="seq-mean-token-mean"),
        "bnpo": dict(agg="token-mean"),
        "dr_grpo": dict(agg="seq-mean-token-sum-norm", agg_norm=max_len or mask.shape[1]),
        "dapo": dict(agg="token-mean", agg_norm=n_tokens),
        "cispo": dict(agg="token-mean", agg_norm=n_tokens, loss_mode="cispo", clip_low=1.0),
        "sapo": dict(agg="seq-mean-token-mean", loss_mode="sapo"),
    }[loss_type]
    if loss_type == "cispo":
        kw["clip_high"] = epsilon_high - 1.0
    elif epsilon_high is not None:
        kw["clip_high"] = epsilon_high
    if level == "sequence":
        kw["loss_mode"] = "gspo"
    return kw


def _check(impl, batch, trl_kw, ours_kw, *, metric_pairs=(("clip_ratio/region_mean", "clipfrac"),), ref=False):
    logits, labels, old, ref_logp, rollout, adv, mask = batch
    trl_loss, trl_grad, trl_metrics = _run_trl(logits, labels, old, ref_logp, adv[:, None], mask, **trl_kw)
    x = logits.float().requires_grad_(True)
    extra = dict(ref_logp=ref_logp.float(), kl_coef=trl_kw["beta"], kl_estimator="k3") if ref else {}
    loss, metrics = rf.ppo_loss_from_logits(x, labels, old.float(), adv.float(), mask, impl=impl, **extra, **ours_kw)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss.double(), trl_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), trl_grad, rtol=1e-4, atol=1e-6 * max(1.0, trl_grad.abs().max().item()))
    for trl_name, our_name in metric_pairs:
        assert metrics[our_name].item() == pytest.approx(trl_metrics[trl_name], rel=1e-5, abs=1e-6), trl_name
    return metrics


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_trl_loss_types(impl, loss_type):
    batch = _batch(seed=1)
    eps_high = 5.0 if loss_type == "cispo" else 0.28
    pairs = (("clip_ratio/region_mean", "clipfrac"),) if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo") else ()
    max_len = 9 if loss_type == "dr_grpo" else None
    _check(impl, batch, dict(loss_type=loss_type, epsilon_high=eps_high, max_len=max_len),
           _ours_for(loss_type, batch[-1], epsilon_high=eps_high, max_len=max_len), metric_pairs=pairs)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_trl_sequence_level_is_gspo(impl):
    """TRL's importance_sampling_level="sequence" with loss_type="grpo" (GSPO) = loss_mode="gspo"."""
    batch = _batch(seed=2)
    _check(impl, batch, dict(loss_type="grpo", level="sequence", epsilon=3e-4, epsilon_high=4e-4),
           dict(_ours_for("grpo", batch[-1], level="sequence"), clip_low=3e-4, clip_high=4e-4),
           metric_pairs=())  # fmt: skip (TRL's clip ratio here is a mean over sequences, ours over tokens)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_trl_delta(impl, loss_type):
    batch = _batch(seed=3)
    # ratios up to ~e^0.9: delta = 1.3 caps some unclipped (negative-advantage) ratios
    _check(impl, batch, dict(loss_type=loss_type, delta=1.3), dict(_ours_for(loss_type, batch[-1]), delta=1.3))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias_kl", [False, True])
def test_trl_kl_and_bias_correction(impl, bias_kl):
    batch = _batch(seed=4)
    pairs = (("clip_ratio/region_mean", "clipfrac"),) + ((("kl", "kl"),) if not bias_kl else ())
    _check(impl, batch, dict(loss_type="bnpo", beta=0.3, bias_kl=bias_kl),
           dict(_ours_for("bnpo", batch[-1]), kl_bias_correction=bias_kl), ref=True, metric_pairs=pairs)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_trl_entropy_bonus(impl):
    batch = _batch(seed=5)
    _check(impl, batch, dict(loss_type="bnpo", entropy_coef=0.05), dict(_ours_for("bnpo", batch[-1]), entropy_coef=0.05),
           metric_pairs=(("clip_ratio/region_mean", "clipfrac"), ("entropy", "entropy")))  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop"])
@pytest.mark.parametrize("lower", [None, 0.6])
def test_trl_vllm_importance_sampling(impl, mode, lower):
    batch = _batch(seed=6)
    logits, labels, old, ref, rollout, adv, mask = batch
    cap = 1.6
    trl_mode, trl_lower = (("token_mask", 1.0 / cap if lower is None else lower) if mode == "icepop" else (mode, lower))
    ratio = _trl_vllm_is_ratio(old, rollout, mask, trl_mode, trl_lower, cap)
    metrics = _check(impl, batch, dict(loss_type="bnpo", is_ratio=ratio),
                     dict(_ours_for("bnpo", mask), rollout_logp=rollout.float(), rollout_is=mode, rollout_is_cap=cap,
                          rollout_is_lower=lower))  # fmt: skip
    full = ratio.expand_as(old)
    m = mask.double()
    assert metrics["rollout_is_mean"].item() == pytest.approx(((full * m).sum() / m.sum()).item(), rel=1e-5)
    assert metrics["rollout_is_max"].item() == pytest.approx(full[mask.bool()].max().item(), rel=1e-5)
    raw = torch.exp(((old - rollout) * m).sum(-1, keepdim=True) if mode.startswith("seq") else (old - rollout))
    zeroed = (full == 0) & (raw.expand_as(old) != 0) & mask.bool()
    assert metrics["rollout_is_masked_frac"].item() == pytest.approx((zeroed.double().sum() / m.sum()).item(), abs=1e-7)
    if mode.endswith("mask") or mode == "icepop":
        assert 0 < metrics["rollout_is_masked_frac"].item() < 1  # the bounds bite on this batch
