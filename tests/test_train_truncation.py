"""Truncated sampling in the PPO and best-of-n trainers (issue 24): ``top_k`` / ``top_p`` / ``min_p`` and
``lm_head_precision``.

- The rollout samples with the truncation and the loss uses the same truncated distribution: at the first
  minibatch of the first epoch (before any update) the loss's log-probs equal the rollout's bitwise, so the
  ratio is exactly 1 on every token (the loss's ``approx_kl`` is exactly 0 and ``ratio_max`` exactly 1), and
  the rollout's log-probs are those of the float64 truncated distribution (``truncated_logprobs_reference``),
  not the full softmax's.
- Only kept tokens are sampled (PPO rollouts and best-of-n).
- The keys: a ``ValueError`` naming the key (one CLI error line) for a bad value; refused as a change on resume.

The fused op set needs ``rf.linear_logprobs`` / ``rf.linear_ppo_loss`` with the truncation keywords.
"""

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import reference
from rlhf_fast.train import best_of_n, ppo
from rlhf_fast.train.ops import FusedOps, ReferenceOps

from test_train_ppo import BETA, REWARDS, bandit_config, bandit_reward, next_token_probs, tv

TRUNC = {"top_k": 20, "top_p": 0.9}


def _first_loss_call(monkeypatch, ops_cls):
    """Record the batch, the response's logits and the metrics of the first ``policy_loss`` call of a run
    (before any update)."""
    calls = []
    original = ops_cls.policy_loss

    def wrapped(self, model, batch, cfg, ref_model=None):
        loss, metrics = original(self, model, batch, cfg, ref_model=ref_model)
        if not calls:
            R = batch["response_mask"].shape[1]
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            calls.append((logits[:, -R - 1 : -1], {k: v.detach().clone() for k, v in batch.items()}, cfg,
                          {k: float(v) for k, v in metrics.items()}))  # fmt: skip
        return loss, metrics

    monkeypatch.setattr(ops_cls, "policy_loss", wrapped)
    return calls


@pytest.mark.parametrize("ops", ["fused", "reference"])
def test_first_epoch_ratio_is_exactly_one_with_top_k_top_p(tmp_path, monkeypatch, ops):
    calls = _first_loss_call(monkeypatch, FusedOps if ops == "fused" else ReferenceOps)
    cfg = bandit_config(tmp_path, ops=ops, steps=1, advantage="grpo", prompts_per_step=2, samples_per_prompt=4,
                        minibatch_size=8, max_new_tokens=4, temperature=0.8, **TRUNC)  # fmt: skip
    ppo.train(cfg, reward_fn=bandit_reward)
    logits, batch, loss_cfg, metrics = calls[0]
    assert loss_cfg.truncation == TRUNC
    # bitwise: the loss's log-probs are the rollout's on every token
    assert metrics["approx_kl"] == 0.0 and metrics["ratio_max"] == 1.0 and metrics["ratio_mean"] == 1.0, metrics
    assert metrics["clipfrac"] == 0.0
    # ... and they are the truncated distribution's (float64 reference on the model's logits), not the softmax's
    mask, R = batch["response_mask"], batch["response_mask"].shape[1]
    labels = batch["input_ids"][:, -R:].masked_fill(mask == 0, -100)
    want, _ = reference.truncated_logprobs_reference(logits.double(), labels, temperature=0.8, **TRUNC)
    full, _ = reference.logprobs_reference(logits.double(), labels, temperature=0.8)
    on = mask > 0
    assert torch.isfinite(want[on]).all()  # every sampled token is in the kept set
    torch.testing.assert_close(batch["old_logp"][on].double(), want[on], rtol=0, atol=2e-5)
    assert (want[on] - full[on]).abs().max() > 1e-3  # the truncation changes them


def _kept(pi: torch.Tensor, trunc: dict) -> torch.Tensor:
    """Bool ``[V]``: the tokens vLLM's sampler keeps from ``pi`` under ``trunc`` (the float64 reference)."""
    row = lambda key, off: torch.tensor([trunc.get(key, off)], dtype=torch.float64)  # noqa: E731
    return reference.truncation_keep_reference(pi.log()[None], row("top_k", 0).long(), row("top_p", 1.0),
                                               row("min_p", 0.0))[0]  # fmt: skip


@pytest.mark.parametrize("trunc, ratchet", [({"top_k": 4}, False), ({"top_k": 8, "top_p": 0.9}, False),
                                            ({"top_p": 0.7}, True), ({"min_p": 0.3}, True)])  # fmt: skip
def test_bandit_reaches_the_kl_regularised_optimum_on_its_kept_set(tmp_path, trunc, ratchet):
    """What a truncated run optimises, in closed form. It samples from ``q``, the policy's truncated
    distribution, and the KL is to the full-softmax reference, so the objective is
    ``J(q) = E_q[r] - beta KL(q || pi_ref)``. Over the distributions on a support ``S`` it peaks at
    ``q*_S = pi_ref exp(r / beta)`` restricted to ``S`` and renormalised, where it is worth ``beta log Z_S``
    (``Z_S``: the sum of ``pi_ref exp(r / beta)`` over ``S``). Every run ends on ``q*_S`` of its final kept set
    ``S`` (TV < 0.03; 0.0003-0.0083 measured over three seeds), at the closed form's value there.

    Which ``S`` it ends on is the path's doing: the kept set is piecewise constant, so the gradient flows through
    the kept logits only, and a token outside it is never sampled and gets no gradient of its own.

    - ``top_k``: the run ends far above its start (``J`` +0.2 to +0.3), though ``S`` need not be the best support
      (``top_k=4`` ends on ``{a, b, p, <|assistant|>}``, not ``{a, b, c, s}``).
    - ``top_p`` / ``min_p`` cut relative to the row's mass or its largest probability: as the rewarded tokens
      gain mass, the others fall under the threshold, leave the kept set and never come back. The run ends on a
      smaller support below its start (``top_p=0.7``: 23 tokens -> 9-13, ``J`` -0.11 -> -0.18 to -0.27;
      ``min_p=0.3``: 34 -> 2, ``J`` 0.045 -> -0.55): the ratchet the README's "Truncated sampling on the demo" names."""
    cfg = bandit_config(tmp_path, advantage="rloo", kl_mode="reward", steps=60, prompts_per_step=8,
                        samples_per_prompt=8, minibatch_size=64, lr=1e-2, **trunc)  # fmt: skip
    pi_ref = next_token_probs(cfg.policy)
    from rlhf_fast.train.models import load_tokenizer

    tok = load_tokenizer(cfg.policy)
    r = torch.zeros_like(pi_ref)
    for word, value in REWARDS.items():
        r[tok.convert_tokens_to_ids(word)] = value
    w = pi_ref * torch.exp(r / BETA)

    def truncated(pi):
        keep = _kept(pi, trunc)
        q = torch.where(keep, pi, torch.zeros_like(pi))
        return q / q.sum(), keep

    def objective(q):
        on = q > 0
        return float((q * r).sum() - BETA * (q[on] * (q[on] / pi_ref[on]).log()).sum())

    q0, keep0 = truncated(pi_ref)
    ppo.train(cfg, reward_fn=bandit_reward)
    q, keep = truncated(next_token_probs(str(tmp_path / "run" / "model")))
    target = torch.where(keep, w, torch.zeros_like(w))
    target = target / target.sum()
    assert keep.sum() >= 2  # not collapsed onto one token (where q = q*_S trivially)
    assert tv(q, target) < 0.03
    best_on_s = BETA * float(w[keep].sum().log())
    assert objective(target) == pytest.approx(best_on_s, abs=1e-9)  # the closed form's value
    assert best_on_s - 2e-3 < objective(q) <= best_on_s + 1e-12
    if ratchet:
        assert keep.sum() < keep0.sum() and objective(q) < objective(q0) - 0.05
    else:
        assert objective(q) > objective(q0) + 0.15


def test_rollouts_sample_only_kept_tokens(tmp_path, monkeypatch):
    """PPO and best-of-n rollouts with ``top_k=2``: every response token is among the two most likely."""
    from rlhf_fast.train import rollout

    seen = []
    original = rollout.generate

    def recording(policy, *args, **kwargs):
        ro = original(policy, *args, **kwargs)
        with torch.no_grad():
            logits = policy(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits
        seen.append((ro, logits, kwargs.get("truncation")))
        return ro

    for module in (ppo, best_of_n):
        monkeypatch.setattr(module, "generate", recording)
    base = bandit_config(tmp_path / "ppo", ops="reference", steps=1, max_new_tokens=4, prompts_per_step=8,
                         minibatch_size=8, top_k=2)  # fmt: skip
    ppo.train(base, reward_fn=bandit_reward)
    bon = best_of_n.Config(policy=base.policy, prompts=base.prompts, out_dir=str(tmp_path / "bon"), n=4,
                           prompts_per_step=8, batch_size=8, max_new_tokens=4, device="cpu", precision="fp32",
                           top_k=2)  # fmt: skip
    best_of_n.train(bon, reward_fn=bandit_reward)
    assert len(seen) == 2 and all(trunc == {"top_k": 2} for _, _, trunc in seen)
    for ro, logits, _ in seen:
        R = ro.response_mask.shape[1]
        top2 = logits[:, -R - 1 : -1].topk(2, dim=-1).indices
        tokens = ro.input_ids[:, -R:]
        on = ro.response_mask > 0
        assert ((top2 == tokens[..., None]).any(-1) | ~on).all()


@pytest.mark.parametrize("key, value", [("top_k", -1), ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.5),
                                        ("min_p", 1.0), ("min_p", -0.1), ("lm_head_precision", "bf16")])  # fmt: skip
@pytest.mark.parametrize("trainer", ["ppo", "best-of-n"])
def test_bad_sampling_keys_name_the_key(tmp_path, trainer, key, value, capsys):
    from rlhf_fast import cli

    if trainer == "best-of-n" and key == "lm_head_precision":
        pytest.skip("a ppo key")
    base = bandit_config(tmp_path, reward_fn="m:f")
    module = ppo if trainer == "ppo" else best_of_n
    cfg = module.Config(policy=base.policy, prompts=base.prompts, reward_fn="m:f", **{key: value})
    with pytest.raises(ValueError, match=key):
        cfg.validate()
    capsys.readouterr()
    assert cli.main(["train", trainer, f"policy={base.policy}", f"prompts={base.prompts}", "reward_fn=m:f",
                     f"{key}={value}"]) == 2  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf-fast: error: ") and key in lines[0], lines


def test_sampling_keys_are_refused_as_a_change_on_resume():
    from rlhf_fast.train.config import config_to_dict
    from rlhf_fast.train.runs import resume_changes

    for module, changes in ((ppo, dict(top_k=20, top_p=0.9, min_p=0.05, lm_head_precision="fp32")),
                            (best_of_n, dict(top_k=20, top_p=0.9, min_p=0.05))):  # fmt: skip
        base = module.Config(policy="p", prompts="d", reward_fn="m:f")
        for key, value in changes.items():
            refused, allowed = resume_changes(config_to_dict(base), module.Config(**{**base.__dict__, key: value}))
            assert len(refused) == 1 and refused[0].startswith(f"{key} (") and not allowed


def test_lm_head_precision_fp32_computes_the_head_in_float32(tmp_path):
    """Reference op set under bf16 autocast: ``lm_head_fp32`` gives the float32 head's log-probs (the
    hidden states under autocast, the matmul in float32), which the autocast head does not."""
    from rlhf_fast.train.models import lm_hidden_states, load_causal_lm

    cfg = bandit_config(tmp_path)
    model = load_causal_lm(cfg.policy).float()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 8), generator=g)
    att, mask = torch.ones_like(ids), torch.ones(3, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = ReferenceOps().response_logprobs(model, ids, att, mask, lm_head_fp32=True)
        auto, _ = ReferenceOps().response_logprobs(model, ids, att, mask)
        hidden, weight, _ = lm_hidden_states(model, ids, att)
    logits = hidden[:, -5:-1].double() @ weight.double().T
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, -4:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    assert (auto.double() - want).abs().max() > 1e-4
