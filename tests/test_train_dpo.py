"""The DPO trainer: it learns the task's preferences on a tiny model, its fused and reference ops agree on
the same steps, and a resumed run ends bit-identical to one that never stopped."""

import json
import math

import pytest
import torch
from train_utils import assert_bf16_close, same_weights, tiny_causal_lm_dir

import rlhf_fast as rf
from rlhf_fast.demo import task
from rlhf_fast.train import dpo
from rlhf_fast.train.metrics import read_metrics
from rlhf_fast.train.data import collate_preferences, load_records, tokenize_preferences
from rlhf_fast.train.models import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    paths = task.write_datasets(root / "data", n_sft=1, n_pref=2048, n_prompts=1, n_eval=512, n_pref_eval=512)
    small = task.write_datasets(root / "small", n_sft=1, n_pref=48, n_prompts=1, n_eval=1, n_pref_eval=1, seed=1)
    return {"policy": tiny_causal_lm_dir(root / "policy"), "other": tiny_causal_lm_dir(root / "other", seed=1),
            "small_preferences": str(small["preferences"]), **{k: str(v) for k, v in paths.items()}}  # fmt: skip


def _config(files, tmp_path, **kw) -> dpo.Config:
    base = {"model": files["policy"], "data": files["preferences"], "out_dir": str(tmp_path / "out"),
            "batch_size": 16, "lr": 3e-3, "max_length": 32, "device": "cpu", "precision": "fp32", "log_every": 1}
    return dpo.Config(**(base | kw))  # fmt: skip


@torch.no_grad()
def _logp_margin(model_dir, rows, tokenizer) -> float:
    """Mean ``log p(chosen) - log p(rejected)`` from the model's own logits and ``rf.sequence_logprobs``."""
    model = load_causal_lm(model_dir)
    batch = collate_preferences(rows, tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = rf.sequence_logprobs(logits[:, :-1], batch["labels"][:, 1:])
    return float((logp[: len(rows)] - logp[len(rows) :]).mean())


def test_dpo_learns_the_task_preferences(files, tmp_path):
    cfg = _config(files, tmp_path, eval_data=files["eval_preferences"], batch_size=32, epochs=2, log_every=16)
    summary = dpo.train(cfg)
    # held-out pairs (prompts never trained on; labels agree with the oracle ~86% of the time): the implicit
    # reward beta * (log pi - log pi_ref) ranks them well above chance (0.5; 4.5 standard errors at 0.6)
    assert summary["eval_pairs"] == 512
    assert summary["eval_reward_accuracy"] > 0.6, summary
    # the policy itself now puts more probability on the chosen answers than the initial policy did
    tokenizer = load_tokenizer(files["policy"])
    rows = list(tokenize_preferences(load_records(files["eval_preferences"]), tokenizer, 32).select(range(256)))
    before = _logp_margin(files["policy"], rows, tokenizer)
    after = _logp_margin(tmp_path / "out" / "model", rows, tokenizer)
    assert after > before + 1.0, (before, after)
    assert summary["eval_logp_margin"] > summary["eval_ref_logp_margin"] + 1.0
    losses = [r["loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")]
    assert losses[0] == pytest.approx(math.log(2), abs=0.01)  # the policy starts as its own reference
    assert losses[-1] < losses[0] - 0.05
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["ops"] == "fused"
    assert (tmp_path / "out" / "curves.png").is_file()


@pytest.mark.parametrize("loss_type, label_smoothing", [("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_fused_and_reference_ops_take_the_same_steps(files, tmp_path, loss_type, label_smoothing):
    """Against a different reference model (so the first loss is not just log 2), with gradient accumulation."""
    records = {}
    for ops in ("fused", "reference"):
        cfg = _config(files, tmp_path / ops, ops=ops, data=files["small_preferences"], ref_model=files["other"],
                      loss_type=loss_type,
                      label_smoothing=label_smoothing, max_steps=2, grad_accum=2, beta=0.5)  # fmt: skip
        dpo.train(cfg)
        records[ops] = read_metrics(tmp_path / ops / "out" / "metrics.jsonl")
    fused, reference = records["fused"], records["reference"]
    assert [r["step"] for r in fused] == [r["step"] for r in reference] == [1, 2]
    for key in ("loss", *dpo.METRICS):
        assert fused[0][key] == pytest.approx(reference[0][key], rel=1e-5, abs=1e-6), key
    assert fused[1]["loss"] == pytest.approx(reference[1]["loss"], rel=1e-4, abs=1e-5)
    if loss_type == "sigmoid":
        assert abs(fused[0]["loss"] - math.log(2)) > 1e-3


def test_bf16_on_cpu_is_autocast_and_matches_fp32(files, tmp_path):
    """precision=bf16 on the CPU runs under CPU autocast: two steps (against another reference model, so the
    loss moves from the first step) agree with float32 within bf16 tolerance, fused with reference ops too."""
    runs = {}
    for precision, ops in (("fp32", "fused"), ("bf16", "fused"), ("bf16", "reference")):
        cfg = _config(files, tmp_path / f"{precision}-{ops}", ops=ops, precision=precision, max_steps=2,
                      data=files["small_preferences"], ref_model=files["other"], beta=0.5)  # fmt: skip
        dpo.train(cfg)
        runs[precision, ops] = read_metrics(tmp_path / f"{precision}-{ops}" / "out" / "metrics.jsonl")
    keys = ("loss", "grad_norm", "reward_margin", "chosen_rewards", "rejected_rewards")
    assert_bf16_close(runs["bf16", "fused"], runs["fp32", "fused"], keys)
    assert_bf16_close(runs["bf16", "fused"], runs["bf16", "reference"], keys)
    assert [r["loss"] for r in runs["bf16", "fused"]] != [r["loss"] for r in runs["fp32", "fused"]]


def test_resume_is_bit_identical(files, tmp_path):
    """3 steps per epoch, 5 steps: the resumed run restarts from step 2 and crosses the epoch boundary."""
    common = {"data": files["small_preferences"], "warmup_steps": 3, "save_every": 2}
    dpo.train(_config(files, tmp_path / "full", max_steps=5, epochs=2, **common))
    dpo.train(_config(files, tmp_path / "cut", max_steps=3, epochs=2, **common))  # checkpoint at 2, stops after 3
    dpo.train(_config(files, tmp_path / "cut", max_steps=5, epochs=2, resume=True, **common))
    assert same_weights(tmp_path / "full" / "out" / "model", tmp_path / "cut" / "out" / "model")
    full = read_metrics(tmp_path / "full" / "out" / "metrics.jsonl")
    cut = read_metrics(tmp_path / "cut" / "out" / "metrics.jsonl")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5]  # the resumed run redoes step 3, logged once
    assert cut[2:] == full[2:]
