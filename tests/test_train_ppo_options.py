"""The PPO trainer's policy-loss options (issue 14): ``loss_mode``, ``delta``, ``kl_bias_correction``, TRL's
``loss_type`` presets, ``kl_mode="full_kl_loss"`` on ``rf.linear_full_kl`` and the fused path on
``rf.linear_ppo_loss``.

- One trainer loss call (``FusedOps.policy_loss`` / ``ReferenceOps.policy_loss`` on a tiny model): its loss
  and parameter gradients equal ``rf.ppo_loss_from_logits`` (+ ``rf.full_kl``) called directly on the
  model's materialised logits with the same options; the fused path never runs the lm_head.
- The ``loss_type`` presets (``micro_aggregation``): the sum over a minibatch's micro-batches equals TRL
  1.16's own ``GRPOTrainer._compute_loss`` run on each micro-batch with gradient accumulation.
- A short run with each option: fused and reference op sets run the same loop; a bandit reaches its
  closed-form optimum with ``loss_mode="sapo"`` and ``loss_type="dr_grpo"``.
- Config: each option validated (``ValueError`` naming the key, one CLI error line), shown by
  ``--print-config``, and refused as a change on resume.
"""

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast.train import ppo
from rlhf_fast.train.metrics import read_metrics
from rlhf_fast.train.models import load_causal_lm
from rlhf_fast.train.ops import LOSS_TYPES, FusedOps, PolicyLossConfig, ReferenceOps, micro_aggregation

from test_policy_trl import _run_trl
from test_train_ppo import bandit_config, bandit_reward, next_token_probs, optimum, tv
from train_utils import tiny_causal_lm_dir

B, P, R = 4, 3, 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    policy = load_causal_lm(tiny_causal_lm_dir(root / "policy", seed=1)).float()
    ref = load_causal_lm(tiny_causal_lm_dir(root / "ref", seed=2)).float().requires_grad_(False)
    return policy, ref


def _batch(model, ref, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    input_ids = torch.randint(3, V, (B, P + R), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding of a short prompt
    lengths = torch.tensor([R, 2, R - 1, 1])
    response_mask = (torch.arange(R)[None] < lengths[:, None]).float()
    attention_mask[:, P:] = response_mask.long()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -R - 1 : -1]
        logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, -R:, None]).squeeze(-1)
    old = (logp + 0.3 * torch.randn(B, R, generator=g)) * response_mask
    ref_logp = (logp + 0.4 * torch.randn(B, R, generator=g)) * response_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "old_logp": old, "ref_logp": ref_logp, "advantages": torch.randn(B, generator=g)}  # fmt: skip


def loss_config(temperature=1.0, kl_mode="reward", kl_coef=0.0, **options) -> PolicyLossConfig:
    """The trainer's ``PolicyLossConfig`` of flat keys (those of the PPO config)."""
    return PolicyLossConfig(temperature=temperature, kl_mode=kl_mode, kl_coef=kl_coef,
                            options=rf.PolicyLossOptions(**options))  # fmt: skip


def _direct(model, ref_model, batch, cfg: PolicyLossConfig):
    """The op called on the model's materialised response logits with the trainer's options."""
    mask, ids, o = batch["response_mask"], batch["input_ids"], cfg.options
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, -R - 1 : -1]
    labels = ids[:, -R:].masked_fill(mask == 0, -100)
    k3 = cfg.kl_mode == "k3_loss"
    loss, _ = rf.ppo_loss_from_logits(
        logits, labels, batch["old_logp"], batch["advantages"], mask, ref_logp=batch["ref_logp"] if k3 else None,
        kl_coef=cfg.kl_coef if k3 else 0.0, kl_estimator="k3", entropy_coef=o.entropy_coef,
        temperature=cfg.temperature, clip_low=o.clip_low, clip_high=o.clip_high, dual_clip=o.dual_clip,
        agg=o.agg, agg_norm=o.agg_norm, loss_mode=o.loss_mode, delta=o.delta,
        kl_bias_correction=o.kl_bias_correction, impl="torch",
    )  # fmt: skip
    if cfg.kl_mode == "full_kl_loss":
        with torch.no_grad():
            ref_logits = ref_model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, -R - 1 : -1]
        kl = rf.full_kl(logits, ref_logits, temperature=cfg.temperature)
        if o.agg_norm is None:
            agg_kl = rf.aggregate(kl, mask, agg=o.agg)
        else:  # rlhf_fast/_agg.py's denominators
            assert o.agg in ("token-mean", "seq-mean-token-sum-norm")
            agg_kl = (kl * mask).sum() / (o.agg_norm * (B if o.agg == "seq-mean-token-sum-norm" else 1))
        loss = loss + cfg.kl_coef * agg_kl
    return loss


OPTION_SETS = {
    "defaults": {},
    "gspo": dict(loss_mode="gspo", agg="seq-mean-token-mean"),
    "cispo-dapo": dict(loss_mode="cispo", clip_low=1.0, clip_high=3.0, agg_norm=13.0),
    "sapo-entropy": dict(loss_mode="sapo", entropy_coef=0.05, agg="seq-mean-token-mean"),
    "geo_mean": dict(loss_mode="geo_mean", agg="seq-mean-token-mean"),
    "delta-dual-clip": dict(delta=1.3, clip_high=0.28, dual_clip=3.0, temperature=0.7),
    "k3-bias-corrected": dict(kl_mode="k3_loss", kl_coef=0.3, kl_bias_correction=True),
    "k3-bias-corrected-gspo": dict(kl_mode="k3_loss", kl_coef=0.3, kl_bias_correction=True, loss_mode="gspo"),
    "full-kl": dict(kl_mode="full_kl_loss", kl_coef=0.2, agg="seq-mean-token-sum-norm", agg_norm=16.0),
    "full-kl-temperature-dapo": dict(kl_mode="full_kl_loss", kl_coef=0.5, temperature=0.8, agg_norm=20.0,
                                     loss_mode="cispo"),
}


@pytest.mark.parametrize("ops", [FusedOps(), ReferenceOps()], ids=["fused", "reference"])
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_trainer_loss_equals_the_op_on_materialised_logits(models, ops, name, monkeypatch):
    """A trainer loss call with each option: the loss and every parameter's gradient are those of
    ``rf.ppo_loss_from_logits`` (and ``rf.full_kl``, with ``full_kl_loss``) on the model's logits."""
    model, ref_model = models
    batch = _batch(model, ref_model)
    cfg = loss_config(**OPTION_SETS[name])
    want = _direct(model, ref_model, batch, cfg)
    want_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    if isinstance(ops, FusedOps):  # the fused path builds no logits: neither the lm_head nor a logits product runs
        hook = model.lm_head.register_forward_hook(lambda *a: pytest.fail("the lm_head ran: logits were built"))
        for fn in ("response_logits", "_logits"):
            monkeypatch.setattr(FusedOps, fn, lambda *a, **k: pytest.fail("logits were built"), raising=False)
        monkeypatch.setattr(rf, "full_kl", lambda *a, **k: pytest.fail("rf.full_kl on materialised logits"))
    try:
        got, metrics = ops.policy_loss(model, batch, cfg, ref_model=ref_model)
    finally:
        if isinstance(ops, FusedOps):
            hook.remove()
    got_grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (pname, _), g, w in zip(model.named_parameters(), got_grads, want_grads, strict=True):
        w = torch.zeros_like(g) if w is None else w
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m: f"{pname}: {m}")  # noqa: B023
    assert ("kl" in metrics) == (cfg.kl_mode != "reward")
    assert {"clipfrac", "approx_kl", "ratio_mean", "ratio_max", "entropy"} <= metrics.keys()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_type_presets_equal_trl_over_accumulated_micro_batches(loss_type):
    """A minibatch of 8 rows in 4 micro-batches: the trainer's sum of ``weight * loss(agg, agg_norm)`` per
    micro-batch (``micro_aggregation``) equals the sum of TRL's ``_compute_loss`` over the same micro-batches
    with 4 gradient-accumulation steps, loss and gradient (float64 TRL, float32 ours)."""
    g = torch.Generator().manual_seed(7)
    S, T, V, n, max_len = 8, 6, 31, 4, 9
    logits = torch.randn(S, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (S, T), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(S, T, generator=g, dtype=torch.float64)
    adv = torch.randn(S, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 4, 2, 6, 3, 5, 2])  # micro-batches of unequal token counts
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    x = logits.float().requires_grad_(True)
    ours, trl_loss, trl_grad = 0.0, 0.0, torch.zeros_like(logits)
    for rows in torch.arange(S).view(n, S // n):
        agg, agg_norm, weight = micro_aggregation(loss_type, "token-mean", mask[rows], mask, max_len)
        loss, _ = rf.ppo_loss_from_logits(x[rows], labels[rows], old[rows].float(), adv[rows].float(), mask[rows],
                                          agg=agg, agg_norm=agg_norm, impl="torch")  # fmt: skip
        ours = ours + weight * loss
        t_loss, t_grad, _ = _run_trl(logits[rows], labels[rows], old[rows], None, adv[rows, None], mask[rows],
                                     loss_type=loss_type, max_len=max_len, grad_accum=n, num_items=int(mask.sum()))
        trl_loss, trl_grad[rows] = trl_loss + t_loss, t_grad
    (grad,) = torch.autograd.grad(ours, x)
    torch.testing.assert_close(ours.double(), trl_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), trl_grad, rtol=1e-4, atol=1e-6)


def test_micro_aggregation_without_loss_type_is_the_minibatch_agg():
    """``loss_type=None``: the plain ``agg`` over the whole minibatch, however it is cut (what the trainer did)."""
    g = torch.Generator().manual_seed(3)
    L = torch.randn(6, 4, generator=g)
    mask = (torch.rand(6, 4, generator=g) > 0.3).float()
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        total = 0.0
        for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
            a, norm, w = micro_aggregation(None, agg, mask[rows], mask, 4)
            assert (a, norm) == (agg, None)
            total += w * rf.aggregate(L[rows], mask[rows], agg=a)
        torch.testing.assert_close(total, rf.aggregate(L, mask, agg=agg))


RUN_OPTIONS = {
    "gspo-grpo-k3": dict(loss_mode="gspo", loss_type="grpo", kl_mode="k3_loss", kl_bias_correction=True),
    "cispo-dapo": dict(loss_mode="cispo", clip_low=1.0, clip_high=4.0, loss_type="dapo"),
    "delta-bnpo-full-kl": dict(delta=1.5, loss_type="bnpo", kl_mode="full_kl_loss", grad_accum=2),
    "geo_mean-gae-dr_grpo": dict(loss_mode="geo_mean", advantage="gae", loss_type="dr_grpo", entropy_coef=0.01),
}


@pytest.mark.parametrize("name", list(RUN_OPTIONS))
def test_options_run_the_same_loop_on_both_op_sets(tmp_path, name):
    """A PPO step (grpo advantages over 4 samples, two minibatches) with each option set: fused and
    reference op sets log the same losses and metrics."""
    from rlhf_fast.train.metrics import read_metrics

    records = {}
    for ops in ("fused", "reference"):
        opts = {"advantage": "grpo", "samples_per_prompt": 4, **RUN_OPTIONS[name]}
        if opts["advantage"] == "gae":
            opts["samples_per_prompt"] = 1
        cfg = bandit_config(tmp_path / ops, ops=ops, steps=1, prompts_per_step=8 // opts["samples_per_prompt"] * 2,
                            minibatch_size=8, max_new_tokens=3, log_every=1, **opts)  # fmt: skip
        ppo.train(cfg, reward_fn=bandit_reward)
        records[ops] = read_metrics(tmp_path / ops / "run" / "metrics.jsonl")
    keys = ("score", "kl", "policy_loss", "approx_kl", "clipfrac", "entropy", "grad_norm")
    for fused, ref in zip(records["fused"], records["reference"], strict=True):
        for key in keys:
            assert fused[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key


def test_bandit_reaches_the_optimum_with_sapo_and_dr_grpo(tmp_path):
    """SAPO's gate has the vanilla gradient at ratio 1 and Dr. GRPO's normaliser is a constant: with k1 in the
    reward and RLOO advantages the run still ends at ``pi_ref exp(r / beta) / Z``."""
    cfg = bandit_config(tmp_path, advantage="rloo", steps=60, prompts_per_step=8, samples_per_prompt=8,
                        minibatch_size=64, loss_mode="sapo", loss_type="dr_grpo")  # fmt: skip
    target = optimum(next_token_probs(cfg.policy), cfg.policy)
    ppo.train(cfg, reward_fn=bandit_reward)
    assert tv(next_token_probs(str(tmp_path / "run" / "model")), target) < 0.03


@pytest.mark.parametrize("key, value, words", [
    ("loss_mode", "ppo", ["loss_mode", "'ppo'"]),
    ("loss_type", "cispo", ["loss_type", "'cispo'"]),
    ("delta", -1.0, ["delta"]),
    ("delta", 1.5, ["delta", "'cispo'"]),  # with loss_mode=cispo below: the clip applies to vanilla / gspo
    ("kl_bias_correction", True, ["kl_bias_correction", "k3_loss"]),
    ("agg", "mean", ["agg", "'mean'"]),
])  # fmt: skip
def test_bad_options_name_the_key(tmp_path, key, value, words, capsys):
    from rlhf_fast import cli

    extra = {"loss_mode": "cispo"} if (key, value) == ("delta", 1.5) else {}
    cfg = bandit_config(tmp_path, reward_fn="m:f", **extra)
    setattr(cfg, key, value)
    with pytest.raises(ValueError) as err:
        cfg.validate()
    assert all(w in str(err.value) for w in words), str(err.value)
    args = ["train", "ppo", f"policy={cfg.policy}", f"prompts={cfg.prompts}", "reward_fn=m:f",
            f"{key}={str(value).lower() if isinstance(value, bool) else value}"]  # fmt: skip
    args += [f"{k}={v}" for k, v in extra.items()]
    capsys.readouterr()  # the tiny model's progress bars
    assert cli.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf-fast: error: ") and key in lines[0], lines


def test_loss_type_contradicting_agg_is_refused(tmp_path):
    cfg = bandit_config(tmp_path, reward_fn="m:f", loss_type="grpo", agg="seq-mean-token-sum")
    with pytest.raises(ValueError, match="loss_type='grpo' sets agg='seq-mean-token-mean'"):
        cfg.validate()
    bandit_config(tmp_path, reward_fn="m:f", loss_type="grpo", agg="seq-mean-token-mean").validate()


def test_options_are_printed_and_alter_the_run_on_resume(tmp_path, capsys):
    import yaml

    from rlhf_fast import cli
    from rlhf_fast.train.config import config_to_dict
    from rlhf_fast.train.runs import resume_changes

    assert cli.main(["train", "ppo", "--print-config", "loss_type=dapo", "delta=2", "kl_mode=k3_loss",
                     "kl_bias_correction=true", "loss_mode=gspo"]) == 0  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {k: printed[k] for k in ("loss_mode", "loss_type", "delta", "kl_bias_correction")} == \
        {"loss_mode": "gspo", "loss_type": "dapo", "delta": 2.0, "kl_bias_correction": True}  # fmt: skip
    keys = list(printed)
    assert keys[keys.index("entropy_coef") + 1 : keys.index("entropy_coef") + 5] == \
        ["loss_mode", "loss_type", "delta", "kl_bias_correction"]  # one block after the policy-loss fields
    base = ppo.Config(policy="p", prompts="d", reward_fn="m:f")
    for key, value in (("loss_mode", "cispo"), ("loss_type", "grpo"), ("delta", 2.0), ("kl_bias_correction", True)):
        refused, allowed = resume_changes(config_to_dict(base), ppo.Config(**{**base.__dict__, key: value}))
        assert len(refused) == 1 and refused[0].startswith(f"{key} (") and not allowed


def test_frac_reward_zero_std_is_the_share_of_prompts_whose_samples_score_alike(tmp_path):
    """The critic-free trainer logs TRL's ``frac_reward_zero_std``: per step, the share of prompts whose
    ``samples_per_prompt`` scores are all equal (no advantage signal), recomputed here from the scores the
    reward function returned; GAE runs do not log it."""
    assert ppo.zero_std_fraction(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.5]), 4) == 1 / 3
    returned = []

    def reward(prompts, completions):
        scores = bandit_reward(prompts, completions)
        returned.append(scores)
        return scores

    cfg = bandit_config(tmp_path, advantage="rloo", steps=3, prompts_per_step=4, samples_per_prompt=4, minibatch_size=16,
                        log_every=1)  # fmt: skip
    ppo.train(cfg, reward_fn=reward)
    logged = [r["frac_reward_zero_std"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "score" in r]
    assert len(returned) == len(logged) == 3
    want = [sum(len(set(s[i : i + 4])) == 1 for i in range(0, 16, 4)) / 4 for s in returned]
    assert logged == want
    gae = bandit_config(tmp_path / "gae", advantage="gae", steps=1, prompts_per_step=4, minibatch_size=4, log_every=1)
    ppo.train(gae, reward_fn=bandit_reward)
    assert all("frac_reward_zero_std" not in r for r in read_metrics(tmp_path / "gae" / "run" / "metrics.jsonl"))
