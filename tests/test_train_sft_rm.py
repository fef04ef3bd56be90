"""The SFT and reward-model trainers on tiny models and the demo task's data: they learn, both op sets run the
same loop, resume is exact, and two data-parallel processes give the losses of one."""

import shutil

import pytest

from rlhf_fast.demo import task
from rlhf_fast.train import reward, sft
from rlhf_fast.train.metrics import read_metrics

from train_utils import assert_bf16_close, close_weights, same_weights, tiny_causal_lm_dir, torchrun


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    paths = task.write_datasets(root / "data", n_sft=512, n_pref=9600, n_prompts=64, n_eval=256, n_pref_eval=256, seed=0)
    return {"init": tiny_causal_lm_dir(root / "init", hidden_size=64, num_layers=2, num_heads=4), **paths}


def sft_config(task_data, out, **overrides) -> sft.Config:
    cfg = dict(model=task_data["init"], data=task_data["sft"], out_dir=str(out), batch_size=32, lr=3e-3, epochs=100,
               device="cpu", precision="fp32", log_every=1)  # fmt: skip
    return sft.Config(**{**cfg, **overrides})


@pytest.fixture(scope="module")
def sft_run(task_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    summary = sft.train(sft_config(task_data, out, eval_data=task_data["sft"], max_steps=60))
    return out, summary


def test_sft_learns_the_demonstrations(sft_run):
    """From a random init (loss ~ log V = 3.6) to a loss only a model that reads the prompt can reach.

    The completion's letters are, over random prompts, uniform over 26 letters: a model that ignores the
    prompt cannot beat ~log(26) = 3.26 nats on them (nor know where the word ends). The demonstrator's own
    per-letter entropy (right 0.4, off by one 0.45, random 0.15) is ~1.4 nats: 60 steps get well on the way."""
    tmp_path, summary = sft_run
    first = read_metrics(tmp_path / "metrics.jsonl")[0]["loss"]
    assert first > 3.3
    assert summary["eval_loss"] < 2.8
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "curves.png").is_file()


def test_sft_fused_and_reference_ops_agree(task_data, tmp_path):
    losses = {}
    for ops in ("fused", "reference"):
        sft.train(sft_config(task_data, tmp_path / ops, ops=ops, max_steps=3))
        losses[ops] = [r["loss"] for r in read_metrics(tmp_path / ops / "metrics.jsonl")]
    assert losses["fused"] == pytest.approx(losses["reference"], rel=1e-4)


def test_sft_resume_is_exact(task_data, tmp_path):
    cfg = sft_config(task_data, tmp_path / "run", max_steps=6, save_every=3, grad_accum=2)
    sft.train(cfg)
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "model")
    sft.train(sft.Config(**{**cfg.__dict__, "out_dir": str(tmp_path / "resumed"), "resume": True}))
    assert same_weights(tmp_path / "run" / "model", tmp_path / "resumed" / "model")


@pytest.mark.parametrize("trainer", ["sft", "rm"])
def test_bf16_on_cpu_is_autocast_and_matches_fp32(task_data, tmp_path, trainer):
    """precision=bf16 on the CPU runs under CPU autocast, the code path of a GPU run: two steps agree with
    float32 within bf16 tolerance, and ops="fused" with ops="reference" under it. Not bit for bit: autocast ran."""
    runs = {}
    for precision, ops in (("fp32", "fused"), ("bf16", "fused"), ("bf16", "reference")):
        out = tmp_path / f"{precision}-{ops}"
        if trainer == "sft":
            sft.train(sft_config(task_data, out, precision=precision, ops=ops, max_steps=2, batch_size=16))
        else:
            reward.train(reward.Config(model=task_data["init"], data=task_data["preferences"], out_dir=str(out),
                                       batch_size=16, lr=3e-3, max_steps=2, device="cpu", precision=precision,
                                       ops=ops, log_every=1))  # fmt: skip
        runs[precision, ops] = read_metrics(out / "metrics.jsonl")
    keys = ("loss", "grad_norm") + (("accuracy",) if trainer == "rm" else ())
    assert_bf16_close(runs["bf16", "fused"], runs["fp32", "fused"], keys)
    assert_bf16_close(runs["bf16", "fused"], runs["bf16", "reference"], keys)
    assert [r["loss"] for r in runs["bf16", "fused"]] != [r["loss"] for r in runs["fp32", "fused"]]


def test_reward_model_learns_preferences(task_data, sft_run, tmp_path):
    """From the SFT model: held-out pairwise accuracy well above chance, 0.5 (a perfect model scores ~0.80
    on the noisy labels; 0.62 on 256 pairs is 4 standard errors above chance). Each pair is seen once: on
    a few pairs repeated for epochs the model memorised them (train loss 0.46, held-out accuracy 0.57)."""
    cfg = reward.Config(model=str(sft_run[0] / "model"), data=task_data["preferences"],
                        eval_data=task_data["eval_preferences"], out_dir=str(tmp_path), batch_size=32, lr=3e-3,
                        warmup_steps=20, lr_schedule="linear", max_steps=300, device="cpu", precision="fp32",
                        log_every=10)  # fmt: skip
    summary = reward.train(cfg)
    assert summary["eval_accuracy"] > 0.62, summary


_DISTRIBUTED_SCRIPT = """
    import json, sys
    from rlhf_fast.train import dpo, reward, sft
    trainer = {"sft": sft, "rm": reward, "dpo": dpo}[sys.argv[2]]
    trainer.train(trainer.Config(**json.loads(sys.argv[1])))
"""


def test_two_processes_match_one(task_data, tmp_path):
    """torchrun with 2 gloo processes, each on half of every global batch, replicated (DDP) or sharded (FSDP2):
    the losses of one process, and with FSDP2 the same final weights, gathered into model.safetensors."""
    losses = {}
    for nproc, parallel in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
        cfg = sft_config(task_data, tmp_path / f"{parallel}{nproc}", max_steps=3, batch_size=16, parallel=parallel)
        torchrun(_DISTRIBUTED_SCRIPT, cfg, nproc, tmp_path, "sft")
        losses[parallel, nproc] = [r["loss"] for r in read_metrics(tmp_path / f"{parallel}{nproc}" / "metrics.jsonl")]
    assert len(losses["ddp", 1]) == 3
    assert losses["ddp", 2] == pytest.approx(losses["ddp", 1], rel=1e-5)
    assert losses["fsdp", 2] == pytest.approx(losses["ddp", 1], rel=1e-5)
    assert close_weights(tmp_path / "fsdp2" / "model", tmp_path / "ddp1" / "model", atol=1e-5)


def test_fsdp_resume_is_exact(task_data, tmp_path):
    """FSDP2 on 2 processes: a checkpoint gathered mid-run (model and AdamW state, rank 0 writes), then a run
    resumed from it with its state loaded back into the shards ends where the uninterrupted run ended."""
    cfg = sft_config(task_data, tmp_path / "run", max_steps=4, batch_size=16, parallel="fsdp", save_every=2)
    torchrun(_DISTRIBUTED_SCRIPT, cfg, 2, tmp_path, "sft")
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "model")
    torchrun(_DISTRIBUTED_SCRIPT, sft_config(task_data, tmp_path / "resumed", max_steps=4, batch_size=16,
                                             parallel="fsdp", save_every=2, resume=True), 2, tmp_path, "sft")  # fmt: skip
    # the copied log was cut back to the checkpoint (step 2); steps 3-4 were logged again, the same
    assert read_metrics(tmp_path / "resumed" / "metrics.jsonl") == read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert close_weights(tmp_path / "run" / "model", tmp_path / "resumed" / "model", atol=0.0)
    # the checkpoint holds whole tensors: it loads into one process's model
    from rlhf_fast.train.checkpoint import latest_checkpoint, load_checkpoint
    from rlhf_fast.train.models import load_causal_lm

    load_checkpoint(latest_checkpoint(tmp_path / "run"), modules={"model": load_causal_lm(task_data["init"])})


@pytest.mark.parametrize("trainer", ["rm", "dpo"])
def test_fsdp_preference_trainers_match_one_process(task_data, tmp_path, trainer):
    """The reward model (a score head read after the sharded forward) and DPO (the lm_head after it) with
    FSDP2 on 2 processes: the losses and final weights of one process."""
    from rlhf_fast.train import dpo

    common = dict(model=task_data["init"], data=task_data["preferences"], batch_size=8, grad_accum=2, max_steps=2,
                  lr=1e-3, device="cpu", precision="fp32", log_every=1)  # fmt: skip
    make = reward.Config if trainer == "rm" else dpo.Config
    records = {}
    for nproc in (1, 2):
        out = tmp_path / f"np{nproc}"
        torchrun(_DISTRIBUTED_SCRIPT, make(**common, out_dir=str(out), parallel="fsdp"), nproc, tmp_path, trainer)
        records[nproc] = read_metrics(out / "metrics.jsonl")
    keys = ("loss", "grad_norm") + (("accuracy",) if trainer == "rm" else ("reward_margin",))
    for one, two in zip(records[1], records[2], strict=True):
        for key in keys:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    # Adam moves a weight whose gradient is ~0 by up to lr whatever its size: float noise in such gradients
    # shows up as differences of a fraction of lr (seen: 1e-4 on 3 of ~100k weights for the rm; lr = 1e-3)
    assert close_weights(tmp_path / "np2" / "model", tmp_path / "np1" / "model", atol=common["lr"] / 4)


def test_last_evaluation_is_not_repeated(task_data, tmp_path, monkeypatch):
    """eval_every dividing the step count: the summary takes the last step's evaluation instead of rerunning it
    on the unchanged model; otherwise the summary's evaluation is a fresh one."""
    calls = []
    real = sft.evaluate
    monkeypatch.setattr(sft, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    summary = sft.train(sft_config(task_data, tmp_path / "a", eval_data=task_data["sft"], max_steps=4, eval_every=2))
    assert len(calls) == 2 and summary["eval_loss"] == read_metrics(tmp_path / "a" / "metrics.jsonl")[-1]["eval_loss"]
    calls.clear()
    sft.train(sft_config(task_data, tmp_path / "b", eval_data=task_data["sft"], max_steps=3, eval_every=2))
    assert len(calls) == 2  # at step 2, and for the summary after step 3


def test_gradient_checkpointing_changes_nothing_but_memory(task_data, tmp_path):
    """Blocks recomputed in the backward: the same losses and weights as storing their activations."""
    for flag in (False, True):
        sft.train(sft_config(task_data, tmp_path / str(flag), max_steps=3, batch_size=16, gradient_checkpointing=flag))
    losses = [[r["loss"] for r in read_metrics(tmp_path / str(flag) / "metrics.jsonl")] for flag in (False, True)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert close_weights(tmp_path / "True" / "model", tmp_path / "False" / "model", atol=1e-6)
