"""The best-of-n trainer: rounds of sample -> keep the best -> fine-tune raise the oracle score of a tiny
policy on held-out prompts, and a run resumed between rounds ends bit-identical to one that never stopped."""

import json

import pytest
from train_utils import close_weights, same_weights, tiny_causal_lm_dir, torchrun, write_jsonl

from rlhf_fast.demo import task
from rlhf_fast.train import best_of_n, sft
from rlhf_fast.train.metrics import read_metrics
from rlhf_fast.train.models import build_reward_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("best_of_n")
    paths = task.write_datasets(root / "data", n_sft=2048, n_pref=1, n_prompts=1024, n_eval=256, n_pref_eval=1)
    return {"policy": tiny_causal_lm_dir(root / "policy", hidden_size=64, num_layers=2, num_heads=4),
            **{k: str(v) for k, v in paths.items()}}


def _config(files, out_dir, **kw) -> best_of_n.Config:
    base = {"policy": files["policy"], "prompts": files["prompts"], "out_dir": str(out_dir), "n": 8,
            "prompts_per_step": 64, "max_new_tokens": task.MAX_LEN + 1, "batch_size": 32, "lr": 3e-3,
            "device": "cpu", "precision": "fp32"}  # fmt: skip
    return best_of_n.Config(**(base | kw))


def test_best_of_n_raises_the_oracle_score(files, tmp_path):
    # a short SFT on the sloppy demonstrations first: a random policy almost never gets a letter right, so
    # its best of 8 has little to teach
    sft.train(sft.Config(model=files["policy"], data=files["sft"], out_dir=str(tmp_path / "sft"), lr=3e-3,
                         batch_size=64, max_steps=200, epochs=10, max_length=32, device="cpu", precision="fp32",
                         log_every=1000))  # fmt: skip
    cfg = _config(files, tmp_path / "bon", policy=str(tmp_path / "sft" / "model"), eval_prompts=files["eval_prompts"],
                  rounds=3, prompts_per_round=256, epochs=2)  # fmt: skip
    summary = best_of_n.train(cfg, reward_fn=task.reward_fn)
    before, after = summary["before"], summary["after"]
    assert before["n"] == after["n"] == 256
    # one sample per held-out prompt, scored by the oracle (> 6 standard errors of the difference)
    gain, stderr = after["score"] - before["score"], (before["score_stderr"] ** 2 + after["score_stderr"] ** 2) ** 0.5
    assert gain > 6 * stderr, (before, after)
    assert before["kl_to_ref"] == pytest.approx(0.0, abs=1e-4) and after["kl_to_ref"] > 0
    rounds = read_metrics(tmp_path / "bon" / "metrics.jsonl")
    assert [r["step"] for r in rounds] == [1, 2, 3]
    for r in rounds:  # the kept completion of each prompt is the best of its 8: above their mean
        assert r["score_kept"] > r["score_all"] + 0.1
    assert rounds[-1]["score_all"] > rounds[0]["score_all"] + 0.05  # each round samples from a better policy
    assert summary["score_all"] == [r["score_all"] for r in rounds]


def _length_reward(prompts, completions):
    return [float(len(c)) for c in completions]


def test_train_leaves_the_callers_config_unchanged(tmp_path):
    """``best_of_n.train(cfg, reward_fn=f)`` runs on a config of its own, ``cfg`` with ``reward_fn`` naming ``f``
    (what the run directory's config.yaml records): the caller's object is not written to."""
    import copy

    import yaml

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a b >"}] * 4)
    cfg = best_of_n.Config(policy=tiny_causal_lm_dir(tmp_path / "policy"), prompts=prompts, out_dir=str(tmp_path / "run"),
                           n=2, prompts_per_step=4, max_new_tokens=2, batch_size=4, device="cpu", precision="fp32")
    before = copy.deepcopy(cfg)
    best_of_n.train(cfg, reward_fn=_length_reward)
    assert cfg == before and cfg.reward_fn is None
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["reward_fn"] == f"{__name__}:_length_reward"


def test_resume_between_rounds_is_bit_identical(files, tmp_path):
    """A reward model instead of a function, the reference ops, three rounds: cut after round 2, resumed
    from the checkpoint of round 1."""
    rm = build_reward_model(files["policy"])
    rm.save_pretrained(tmp_path / "rm")
    common = {"reward_model": str(tmp_path / "rm"), "ops": "reference", "n": 4, "prompts_per_round": 32,
              "prompts_per_step": 16, "batch_size": 16, "save_every": 1}  # fmt: skip
    best_of_n.train(_config(files, tmp_path / "full", rounds=3, **common))
    best_of_n.train(_config(files, tmp_path / "cut", rounds=2, **common))  # checkpoint after round 1
    best_of_n.train(_config(files, tmp_path / "cut", rounds=3, resume=True, **common))
    assert same_weights(tmp_path / "full" / "model", tmp_path / "cut" / "model")
    full, cut = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "cut" / "metrics.jsonl")
    drop = ("seconds", "samples_per_s")  # wall-clock
    assert [r["step"] for r in cut] == [1, 2, 3]  # round 2 taken again after the resume, logged once
    assert [{k: v for k, v in r.items() if k not in drop} for r in cut[1:]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in full[1:]]  # fmt: skip


_DISTRIBUTED_SCRIPT = """
    import json, sys
    from rlhf_fast.train import best_of_n
    best_of_n.train(best_of_n.Config(**json.loads(sys.argv[1])))
"""


def test_two_processes_match_one(files, tmp_path):
    """torchrun with 2 gloo processes, each sampling a share of every round's prompts (an uneven one: 21 =
    11 + 10, padded with a repeat) and fine-tuning on half of every batch, replicated (DDP) or sharded (FSDP2,
    the reward model and the reference too): the same samples, losses and weights as one process."""
    rm = build_reward_model(files["policy"])
    rm.save_pretrained(tmp_path / "rm")
    runs = {}
    for nproc, parallel in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
        cfg = _config(files, tmp_path / f"{parallel}{nproc}", rounds=2, n=4, prompts_per_round=21, prompts_per_step=8,
                      batch_size=8, grad_accum=2, eval_prompts=files["eval_prompts"], eval_samples=9,
                      reward_model=str(tmp_path / "rm"), parallel=parallel)  # fmt: skip
        torchrun(_DISTRIBUTED_SCRIPT, cfg, nproc, tmp_path)
        runs[nproc, parallel] = read_metrics(tmp_path / f"{parallel}{nproc}" / "metrics.jsonl")
    summary1 = json.loads((tmp_path / "ddp1" / "summary.json").read_text())
    for parallel in ("ddp", "fsdp"):
        for one, two in zip(runs[1, "ddp"], runs[2, parallel], strict=True):
            assert two["kept_length"] == one["kept_length"]  # the same completions kept
            for key in ("score_all", "score_kept", "sft_loss", "sft_loss_last", "grad_norm"):
                assert two[key] == pytest.approx(one[key], rel=1e-5), (parallel, key)
        summary2 = json.loads((tmp_path / f"{parallel}2" / "summary.json").read_text())
        for when in ("before", "after"):
            assert summary2[when]["n"] == 9
            assert summary2[when]["score"] == pytest.approx(summary1[when]["score"], rel=1e-5)
        assert close_weights(tmp_path / f"{parallel}2" / "model", tmp_path / "ddp1" / "model", atol=1e-5)
