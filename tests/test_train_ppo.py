"""The PPO trainer (rlhf_fast.train.ppo) end to end on tiny models.

The bandit: one prompt, one-token responses, a reward per token. The KL-regularised objective
``E[r] - beta KL(pi || pi_ref)`` has the closed-form optimum ``pi*(y) = pi_ref(y) exp(r(y) / beta) / Z``; the
trainer must reach it (not the reward's argmax, which ``pi*`` puts only part of its mass on) for each way of
estimating advantages and of placing the KL.
"""

import json
import shutil

import pytest
import torch

from rlhf_fast.train import ppo
from rlhf_fast.train.models import load_causal_lm, load_tokenizer

from safetensors.torch import load_file
from train_utils import assert_bf16_close, close_weights, same_weights, tiny_causal_lm_dir, torchrun, write_jsonl

PROMPT = "a b c d >"
REWARDS = {"a": 1.0, "b": 0.6, "c": 0.2, "d": -0.4}  # every other token: 0
BETA = 0.5


def bandit_reward(prompts, completions):
    return [REWARDS.get(c.split()[0], 0.0) if c.split() else 0.0 for c in completions]


def next_token_probs(model_dir: str) -> torch.Tensor:
    """float64 ``softmax`` of the model's logits after the prompt: the bandit policy over the vocabulary."""
    tok = load_tokenizer(model_dir)
    from rlhf_fast.train.data import _prompt_ids

    ids, _ = _prompt_ids(tok, PROMPT)
    with torch.no_grad():
        logits = load_causal_lm(model_dir)(torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits.double(), -1)


def optimum(pi_ref: torch.Tensor, model_dir: str) -> torch.Tensor:
    tok = load_tokenizer(model_dir)
    r = torch.zeros_like(pi_ref)
    for word, value in REWARDS.items():
        r[tok.convert_tokens_to_ids(word)] = value
    target = pi_ref * torch.exp(r / BETA)
    return target / target.sum()


def tv(p, q) -> float:
    return float(0.5 * (p - q).abs().sum())


def bandit_config(tmp_path, **overrides) -> ppo.Config:
    init = tiny_causal_lm_dir(tmp_path / "init", seed=1)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPT}] * 8)
    cfg = dict(policy=init, prompts=prompts, out_dir=str(tmp_path / "run"), max_new_tokens=1, ppo_epochs=1,
               lr=1e-2, critic_lr=1e-2, kl_coef=BETA, whiten_advantages=False, max_grad_norm=10.0, log_every=10,
               device="cpu", precision="fp32")  # fmt: skip
    cfg.update(overrides)
    return ppo.Config(**cfg)


@pytest.mark.parametrize(
    "advantage, kl_mode, steps, prompts_per_step, samples_per_prompt, lr, max_tv",
    [
        # k1 in the sequence reward, leave-one-out baseline: at the optimum every sample's advantage is 0
        # (r - beta log(pi/pi_ref) = beta log Z for every token), so the updates vanish there.
        ("rloo", "reward", 60, 8, 8, 1e-2, 0.03),
        # The exact KL over the vocabulary in the loss: per-sample gradients cancel only on average at the
        # optimum, and Adam's normalised steps keep it wandering by ~lr (TV 0.023-0.036 over seeds 0-3 at a
        # constant lr): a smaller lr, a larger batch, and a linear decay of the lr to 0 (TV 0.012-0.016).
        ("rloo", "full_kl_loss", 150, 32, 8, 3e-3, 0.03),
        # The textbook form: k1 per token in the reward, a critic, GAE.
        ("gae", "reward", 80, 32, 1, 1e-2, 0.03),
    ],
)
def test_bandit_reaches_closed_form_optimum(tmp_path, advantage, kl_mode, steps, prompts_per_step,
                                            samples_per_prompt, lr, max_tv):  # fmt: skip
    cfg = bandit_config(tmp_path, advantage=advantage, kl_mode=kl_mode, steps=steps, prompts_per_step=prompts_per_step,
                        samples_per_prompt=samples_per_prompt, minibatch_size=prompts_per_step * samples_per_prompt,
                        lr=lr, lr_schedule="linear" if kl_mode == "full_kl_loss" else "constant")  # fmt: skip
    pi_ref = next_token_probs(cfg.policy)
    target = optimum(pi_ref, cfg.policy)
    assert tv(pi_ref, target) > 0.15  # the optimum is far from the start...
    argmax = torch.zeros_like(target)
    argmax[target.argmax()] = 1.0
    assert tv(argmax, target) > 0.3  # ...and from the reward's argmax
    ppo.train(cfg, reward_fn=bandit_reward)
    assert tv(next_token_probs(str(tmp_path / "run" / "model")), target) < max_tv


def test_fused_and_reference_ops_run_the_same_loop(tmp_path):
    """One PPO step (rollout, GAE, two minibatches) with both op sets: the same metrics within float tolerance."""
    records = {}
    for ops in ("fused", "reference"):
        cfg = bandit_config(tmp_path / ops, ops=ops, advantage="gae", steps=1, prompts_per_step=8,
                            minibatch_size=4, max_new_tokens=3, ppo_epochs=2)  # fmt: skip
        ppo.train(cfg, reward_fn=bandit_reward)
        from rlhf_fast.train.metrics import read_metrics

        records[ops] = read_metrics(tmp_path / ops / "run" / "metrics.jsonl")[-1]
    fused, ref = records["fused"], records["reference"]
    for key in ("score", "kl", "policy_loss", "value_loss", "approx_kl", "clipfrac", "entropy", "explained_variance"):
        assert fused[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key


def test_bf16_on_cpu_is_autocast_and_matches_fp32(tmp_path):
    """precision=bf16 on the CPU runs under CPU autocast (sampling, log-probs, the losses): two PPO steps with a
    critic agree with float32 within bf16 tolerance, and ops="fused" with ops="reference" under it."""
    from rlhf_fast.train.metrics import read_metrics

    runs = {}
    for precision, ops in (("fp32", "fused"), ("bf16", "fused"), ("bf16", "reference")):
        cfg = bandit_config(tmp_path / f"{precision}-{ops}", ops=ops, precision=precision, advantage="gae", steps=2,
                            prompts_per_step=8, minibatch_size=4, max_new_tokens=3, log_every=1)  # fmt: skip
        ppo.train(cfg, reward_fn=bandit_reward)
        runs[precision, ops] = read_metrics(tmp_path / f"{precision}-{ops}" / "run" / "metrics.jsonl")
    keys = ("score", "policy_loss", "value_loss", "entropy", "grad_norm", "approx_kl", "response_length")
    assert_bf16_close(runs["bf16", "fused"], runs["fp32", "fused"], keys)
    assert_bf16_close(runs["bf16", "fused"], runs["bf16", "reference"], keys)
    assert [r["entropy"] for r in runs["bf16", "fused"]] != [r["entropy"] for r in runs["fp32", "fused"]]


def test_resume_gives_the_uninterrupted_run(tmp_path):
    """Stop after a checkpoint, resume from it: the final policy is bit-identical to a run that never stopped."""
    cfg = bandit_config(tmp_path, advantage="gae", steps=4, save_every=2, prompts_per_step=8, minibatch_size=4,
                        max_new_tokens=3, log_every=1, lr_schedule="linear", warmup_steps=2)  # fmt: skip
    ppo.train(cfg, reward_fn=bandit_reward)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    shutil.rmtree(resumed / "model")
    ppo.train(ppo.Config(**{**cfg.__dict__, "out_dir": str(resumed), "resume": True}), reward_fn=bandit_reward)
    assert same_weights(tmp_path / "run" / "model", resumed / "model")
    # and the resumed run did start from the checkpoint (its first logged step is 3, not 1)
    from rlhf_fast.train.metrics import read_metrics

    records = read_metrics(resumed / "metrics.jsonl")
    # the copied log of steps 1-4 was cut back to the checkpoint (step 2), then steps 3-4 were logged again
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # 4 steps x 2 minibatches = 8 optimizer steps: warmup over 2, then linear to 0 (the scheduler resumed too)
    assert [r["lr"] for r in records] == pytest.approx([cfg.lr * f for f in (1.0, 4 / 6, 2 / 6, 0.0)])
    uninterrupted = read_metrics(tmp_path / "run" / "metrics.jsonl")
    timing = ("tokens_per_s", "rollout_s", "update_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in records] == \
        [{k: v for k, v in r.items() if k not in timing} for r in uninterrupted]  # fmt: skip


def test_train_leaves_the_callers_config_unchanged(tmp_path):
    """``ppo.train(cfg, reward_fn=f)`` runs on a config of its own, ``cfg`` with ``reward_fn`` naming ``f`` (what
    the run directory's config.yaml records): the caller's object is not written to."""
    import copy

    import yaml

    cfg = bandit_config(tmp_path, advantage="gae", steps=1, prompts_per_step=4, minibatch_size=4, target_kl=1.0)
    before = copy.deepcopy(cfg)
    ppo.train(cfg, reward_fn=bandit_reward)
    assert cfg == before and cfg.reward_fn is None
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["reward_fn"] == f"{__name__}:bandit_reward"


def test_bad_config_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="samples_per_prompt"):
        bandit_config(tmp_path, advantage="grpo", samples_per_prompt=1, reward_fn="m:f").validate()
    with pytest.raises(ValueError, match="minibatch_size"):
        bandit_config(tmp_path / "b", prompts_per_step=8, minibatch_size=3, reward_fn="m:f").validate()
    with pytest.raises(ValueError, match="reward_model and reward_fn"):
        bandit_config(tmp_path / "c").validate()


def test_adaptive_kl_controller():
    """Ziegler et al.: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon; a fixed coefficient without a target."""
    cfg = ppo.Config(target_kl=4.0, kl_horizon=1000)
    assert ppo.kl_controller_update(0.1, 4.4, cfg, 100) == pytest.approx(0.1 * (1 + 0.1 * 0.1))  # KL above: up
    assert ppo.kl_controller_update(0.1, 8.0, cfg, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped
    assert ppo.kl_controller_update(0.1, 1.0, cfg, 100) == pytest.approx(0.1 * (1 - 0.2 * 0.1))  # KL below: down
    assert ppo.kl_controller_update(0.1, 9.0, ppo.Config(), 100) == 0.1


def test_step_prompts_cover_the_data_and_repeat_exactly():
    """Each pass over the prompts is a permutation; a step's prompts depend on the step alone (exact resume)."""
    n, per_step = 10, 4
    stream = [i for step in range(5) for i in ppo.step_prompts(n, per_step, seed=3, step=step)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert ppo.step_prompts(n, per_step, seed=3, step=2) == stream[8:12]
    assert len(ppo.step_prompts(3, 8, seed=0, step=0)) == 8  # more prompts per step than the data has


_DISTRIBUTED_SCRIPT = """
    import json, sys
    from rlhf_fast.train import ppo

    REWARDS = {"a": 1.0, "b": 0.6, "c": 0.2, "d": -0.4}

    def reward(prompts, completions):  # the first response word's value, minus 0.1 per further word
        return [REWARDS.get(c.split()[0], 0.0) - 0.1 * len(c.split()[1:]) if c.split() else 0.0 for c in completions]

    ppo.train(ppo.Config(**json.loads(sys.argv[1])), reward_fn=reward)
"""


@pytest.mark.parametrize("advantage, samples_per_prompt, layouts, loss_type", [
    ("gae", 1, ("ddp", "fsdp"), None),  # a critic trained beside the policy; FSDP2 also shards the reference
    ("rloo", 2, ("ddp",), None),  # the samples of a prompt stay on one process
    ("grpo", 2, ("ddp",), "dapo"),  # DAPO's normaliser: the minibatch's tokens over both processes
])  # fmt: skip
def test_two_processes_match_one(tmp_path, advantage, samples_per_prompt, layouts, loss_type):
    """torchrun with 2 gloo processes, each sampling half of every step's prompts and taking half of every
    minibatch, replicated (DDP) or sharded (FSDP2): the same responses, losses and final weights as one process."""
    from rlhf_fast.train.metrics import read_metrics

    prompt_texts = ["a b c d >", "a >", "b c >", "d a b >", "c >", "a b >", "d d c b a >", "b >"]
    prompts = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": p} for p in prompt_texts])
    runs = {}
    for nproc, parallel in ((1, "ddp"),) + tuple((2, p) for p in layouts):
        out = tmp_path / f"{parallel}{nproc}"
        cfg = bandit_config(tmp_path, out_dir=str(out), prompts=prompts, advantage=advantage, parallel=parallel,
                            samples_per_prompt=samples_per_prompt, steps=2, prompts_per_step=4, max_new_tokens=4,
                            minibatch_size=4 * samples_per_prompt, grad_accum=2, ppo_epochs=2, whiten_advantages=True,
                            lr=1e-3, log_every=1, eval_prompts=prompts, eval_samples=5, save_every=1,
                            loss_type=loss_type)  # fmt: skip
        torchrun(_DISTRIBUTED_SCRIPT, cfg, nproc, tmp_path)
        runs[nproc, parallel] = read_metrics(out / "metrics.jsonl"), json.loads((out / "summary.json").read_text())
    (records1, summary1), keys = runs[1, "ddp"], ("value_loss", "explained_variance") if advantage == "gae" else ()
    assert len(records1) == 2
    for parallel in layouts:
        records2, summary2 = runs[2, parallel]
        for one, two in zip(records1, records2, strict=True):
            assert two["score"] == one["score"] and two["response_length"] == one["response_length"]  # same samples
            for key in ("kl", "policy_loss", "approx_kl", "clipfrac", "entropy", "grad_norm") + keys:
                assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (parallel, key)
        assert summary2["world_size"] == 2 and summary2["after"]["n"] == 5
        for when in ("before", "after"):  # the held-out prompts are split 3 + 2 (+ 1 repeat), padded differently
            assert summary2[when]["score"] == summary1[when]["score"]
            assert summary2[when]["kl_to_ref"] == pytest.approx(summary1[when]["kl_to_ref"], rel=1e-4, abs=1e-6)
        # the final policy (gathered from the shards with FSDP2) and the mid-run checkpoint
        assert close_weights(tmp_path / f"{parallel}2" / "model", tmp_path / "ddp1" / "model", atol=1e-5)
        assert close_weights(tmp_path / f"{parallel}2" / "checkpoint-00000001", tmp_path / "ddp1" / "checkpoint-00000001",
                             atol=1e-5, file="policy.safetensors")  # fmt: skip
        if advantage == "gae":
            assert close_weights(tmp_path / f"{parallel}2" / "critic", tmp_path / "ddp1" / "critic", atol=1e-5)
    init = load_file(str(tmp_path / "init" / "model.safetensors"))
    final = load_file(str(tmp_path / "ddp1" / "model" / "model.safetensors"))
    assert any(not torch.allclose(init[k], final[k], atol=1e-4) for k in final)  # and training did move the weights


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path):
    """Policy and critic with recomputed blocks (sampling runs in eval mode, without): the same PPO step."""
    records = {}
    for flag in (False, True):
        cfg = bandit_config(tmp_path / str(flag), advantage="gae", steps=2, prompts_per_step=8, minibatch_size=4,
                            max_new_tokens=3, log_every=1, gradient_checkpointing=flag)  # fmt: skip
        ppo.train(cfg, reward_fn=bandit_reward)
        from rlhf_fast.train.metrics import read_metrics

        records[flag] = read_metrics(tmp_path / str(flag) / "run" / "metrics.jsonl")
    for plain, ckpt in zip(records[False], records[True], strict=True):
        for key in ("score", "policy_loss", "value_loss", "grad_norm", "entropy"):
            assert ckpt[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key
