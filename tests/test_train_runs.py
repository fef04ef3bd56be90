"""Runs: one run per out_dir, resume only as the same run, metrics without repeated steps, checkpoints and the
final model that a kill cannot leave half-written or half-deleted, and the CLI's one-line user errors."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast.demo import task
from rlhf_fast.cli import main
from rlhf_fast.train import checkpoint, loop, sft
from rlhf_fast.train.checkpoint import STATE_FILE, checkpoint_path, latest_checkpoint, prune_checkpoints, save_checkpoint
from rlhf_fast.train.metrics import read_metrics
from rlhf_fast.train.config import config_to_dict
from rlhf_fast.train.data import tokenize_prompts, tokenize_sft
from rlhf_fast.train.errors import UserError
from rlhf_fast.train.models import load_causal_lm, load_tokenizer
from rlhf_fast.train.rollout import load_function
from rlhf_fast.train.runs import resume_changes

from conftest import native_env
from train_utils import same_weights, tiny_causal_lm_dir, write_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    paths = task.write_datasets(root / "data", n_sft=16, n_pref=8, n_prompts=8, n_eval=4, n_pref_eval=4, seed=0)
    return {"init": tiny_causal_lm_dir(root / "init"), **{k: str(v) for k, v in paths.items()}}


def sft_config(files, out, **kw) -> sft.Config:
    base = dict(model=files["init"], data=files["sft"], out_dir=str(out), batch_size=4, lr=1e-3, max_steps=2,
                max_length=32, device="cpu", precision="fp32", log_every=1)  # fmt: skip
    return sft.Config(**(base | kw))


def steps_logged(out) -> list[int]:
    return [r["step"] for r in read_metrics(Path(out) / "metrics.jsonl")]


# ------------------------------------------------------------------------------------------ out_dir


def test_used_out_dir_is_refused_unless_resume_or_overwrite(files, tmp_path):
    out = tmp_path / "run"
    sft.train(sft_config(files, out))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"out_dir .* is in use .*resume=true.*overwrite=true"):
        sft.train(sft_config(files, out, lr=2e-3))
    assert (out / "metrics.jsonl").read_text() == before  # the first run is untouched
    assert "lr: 0.001" in (out / "config.yaml").read_text()

    (out / "checkpoint-00000035").mkdir()  # what an earlier, longer run would have left: it must go
    sft.train(sft_config(files, out, lr=2e-3, max_steps=3, overwrite=True))
    assert steps_logged(out) == [1, 2, 3]
    assert not (out / "checkpoint-00000035").exists()
    assert "lr: 0.002" in (out / "config.yaml").read_text()

    with pytest.raises(UserError, match="contradict"):
        sft.train(sft_config(files, out, resume=True, overwrite=True))


def test_overwrite_never_clears_a_directory_that_holds_no_run(files, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"holds no run .*notes.txt"):
        sft.train(sft_config(files, out, overwrite=True))
    with pytest.raises(UserError, match="holds no run"):
        sft.train(sft_config(files, out, resume=True))
    assert (out / "notes.txt").read_text() == "keep me" and sorted(os.listdir(out)) == ["notes.txt"]


def test_pruning_never_keeps_an_abandoned_timeline_over_the_run(tmp_path):
    """Checkpoints of later steps than the one just written (an old run's 30 and 35) go first; the run's own
    latest ``keep`` stay."""
    net = torch.nn.Linear(2, 2)
    for step in (5, 30, 35, 10):
        save_checkpoint(checkpoint_path(tmp_path, step), modules={"m": net}, state={"step": step})
    deleted = prune_checkpoints(tmp_path, keep=2, current=10)
    assert sorted(p.name for p in deleted) == ["checkpoint-00000030", "checkpoint-00000035"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000005", "checkpoint-00000010"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000010"


def test_kill_while_pruning_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    """A process killed while deleting a checkpoint (here: after its trainer_state.pt went, before the rest)
    leaves no checkpoint without trainer_state.pt behind; the next save removes the remains."""
    net = torch.nn.Linear(2, 2)
    for step in (1, 2):
        save_checkpoint(checkpoint_path(tmp_path, step), modules={"m": net}, state={"step": step})
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        (Path(path) / STATE_FILE).unlink()
        raise KeyboardInterrupt  # the kill

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, keep=1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    visible = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert [p.name for p in visible] == ["checkpoint-00000002"]
    assert all((p / STATE_FILE).is_file() for p in visible)
    save_checkpoint(checkpoint_path(tmp_path, 3), modules={"m": net}, state={"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000002", "checkpoint-00000003"]


# ------------------------------------------------------------------------------------------ resume


def test_resume_truncates_metrics_and_cleans_leftovers(files, tmp_path):
    out = tmp_path / "run"
    cfg = sft_config(files, out, max_steps=4, save_every=2)
    sft.train(cfg)  # checkpoint at step 2 (the last step saves only the model), metrics of steps 1..4
    (out / ".checkpoint-00000004.tmp-999999999-dead0000").mkdir()  # a save killed mid-write
    (out / ".model.tmp-999999999-dead0000").mkdir()
    (out / ".checkpoint-00000001.del-dead0000").mkdir()  # pruning killed mid-delete
    (out / "checkpoint-00000003").mkdir()  # an incomplete checkpoint (no trainer_state.pt)
    (out / "checkpoint-00000003" / "model.safetensors").write_bytes(b"")
    sft.train(sft.Config(**{**cfg.__dict__, "resume": True}))
    assert steps_logged(out) == [1, 2, 3, 4]  # steps 3 and 4 taken again, logged once
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", "."))) == ["checkpoint-00000002"]


def test_resume_refuses_a_changed_run_and_allows_extending_it(files, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = sft_config(files, out, max_steps=2, save_every=1)
    sft.train(cfg)
    for changes in ({"lr": 5e-3, "batch_size": 8, "seed": 1}, {"model": files["init"] + "/", "max_length": 16}):
        with pytest.raises(UserError) as err:
            sft.train(sft.Config(**{**cfg.__dict__, "resume": True, **changes}))
        for key, value in changes.items():
            assert f"{key} (" in str(err.value) and repr(value) in str(err.value)
    with caplog.at_level(logging.WARNING, logger="rlhf_fast.train"):
        sft.train(sft.Config(**{**cfg.__dict__, "resume": True, "max_steps": 3, "log_every": 3, "save_every": 2}))
    said = caplog.text
    assert "max_steps (2 -> 3)" in said and "log_every (1 -> 3)" in said and "checkpoint-00000001" in said
    assert "resume (" not in said
    assert steps_logged(out) == [1, 3]  # step 2 taken again, and not logged with log_every=3
    assert "max_steps: 3" in (out / "config.yaml").read_text()


def test_resume_changes_allow_list():
    base = sft.Config(model="m", data="d", lr=1e-3, max_steps=2)
    old = config_to_dict(base)
    new = sft.Config(**{**base.__dict__, "max_steps": 5, "eval_every": 3, "keep_checkpoints": 4, "device": "cpu",
                        "weight_decay": 0.1, "max_length": 64, "resume": True})  # fmt: skip
    refused, allowed = resume_changes(old, new)
    assert allowed == ["max_steps (2 -> 5)", "eval_every (0 -> 3)", "keep_checkpoints (2 -> 4)",
                       "device ('auto' -> 'cpu')"]  # fmt: skip
    assert refused == ["weight_decay (0.0 -> 0.1)", "max_length (512 -> 64)"]
    # a key the saved run does not know, or lost: refused too
    refused, _ = resume_changes({**old, "ppo": {"kl_coef": 0.1}}, base)
    assert refused == ["ppo.kl_coef (0.1 -> unset)"]
    # a linear schedule decays to 0 at the last step: its length is part of every step's lr
    linear = sft.Config(**{**base.__dict__, "lr_schedule": "linear"})
    refused, _ = resume_changes(config_to_dict(linear), sft.Config(**{**linear.__dict__, "max_steps": 5}))
    assert refused == ["max_steps (2 -> 5) [with lr_schedule='linear' the number of steps sets every step's lr]"]


def test_resume_without_checkpoint_says_it_starts_fresh(files, tmp_path, caplog):
    out = tmp_path / "run"
    sft.train(sft_config(files, out))  # no save_every: no checkpoint
    with caplog.at_level(logging.WARNING, logger="rlhf_fast.train"):
        sft.train(sft_config(files, out, resume=True, lr=5e-3))
    assert "no checkpoint" in caplog.text and "starts fresh" in caplog.text
    assert steps_logged(out) == [1, 2]


# ------------------------------------------------------------------------------------------ final model


def test_final_model_is_written_atomically(files, tmp_path, monkeypatch):
    """A kill while the final model is written leaves the previous model/ whole (here: after the weights
    file was half-written)."""
    model, tok = load_causal_lm(files["init"]), load_tokenizer(files["init"])
    (tmp_path / ".model.tmp-999999999-dead0000").mkdir()  # an earlier write, killed: removed by the next one
    loop.save_pretrained(model, tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    shutil.copytree(tmp_path / "model", tmp_path / "before")
    real = type(model).save_pretrained

    def killed(self, path, **kwargs):
        real(self, path, **kwargs)
        with open(Path(path) / "model.safetensors", "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", killed)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        loop.save_pretrained(model, tmp_path / "model")
    assert same_weights(tmp_path / "before", tmp_path / "model")
    assert sorted(os.listdir(tmp_path)) == ["before", "model"]  # no temporary left behind either


# ------------------------------------------------------------------------------------------ CLI errors


def _cli_error(capsys, *args) -> str:
    rc = main(["train", *args])
    err = capsys.readouterr().err.strip().splitlines()  # progress bars of datasets may come first
    assert rc == 2, err
    assert err[-1].startswith("rlhf-fast: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


def test_cli_user_errors_are_one_line(files, tmp_path, capsys):
    base = [f"model={files['init']}", f"data={files['sft']}", "device=cpu", "precision=fp32", "max_length=32"]
    run = lambda *kw: _cli_error(capsys, "sft", *base, f"out_dir={tmp_path / 'o'}", *kw)  # noqa: E731

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert f"data file '{empty}' is empty" in run(f"data={empty}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a >", "completion": "b"}\n{"prompt": "a >", oops}\n')
    assert f"'{bad}', line 2: not valid JSON" in run(f"data={bad}")
    typed = write_jsonl(tmp_path / "typed.jsonl", [{"prompt": "a >", "completion": 3}] * 8)
    line = run(f"data={typed}")
    assert typed in line and "'completion'" in line and "int" in line
    assert "'runs/no/such/model' does not exist" in run("model=runs/no/such/model")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(files["init"], no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    assert f"'{no_weights}' holds no weights" in run(f"model={no_weights}")
    assert f"'{tmp_path}' holds no tokenizer" in run(f"model={tmp_path}")
    assert "batch_size must be an int >= 1, got 0" in run("batch_size=0")
    assert "lr must be a number > 0, got -1.0" in run("lr=-1")
    assert "max_steps must be an int >= 0 (0: no limit), got -5" in run("max_steps=-5")
    assert not (tmp_path / "o" / "model").exists()


def test_cli_bug_keeps_its_traceback(files, tmp_path, monkeypatch):
    """A ValueError that is not a user error (here: planted in the loop) is a bug: it propagates."""

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(sft, "load_data", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["train", "sft", f"model={files['init']}", f"data={files['sft']}", f"out_dir={tmp_path / 'o'}",
              "device=cpu"])  # fmt: skip


def test_reward_fn_is_found_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text("def score(prompts, completions):\n    return [1.0] * len(prompts)\n")
    monkeypatch.chdir(tmp_path)
    here = {"", ".", str(tmp_path)}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in here])  # as the console script has it
    assert load_function("my_rewards_mod:score")(["p"], ["c"]) == [1.0]
    assert str(tmp_path) not in sys.path  # only for the lookup
    with pytest.raises(UserError, match="no_such_module"):
        load_function("no_such_module:score")


def test_console_script_finds_reward_fn_in_the_working_directory(files, tmp_path):
    """``rlhf-fast train ppo reward_fn=rewards:score`` with rewards.py beside it, as a user runs it."""
    (tmp_path / "rewards.py").write_text("def score(prompts, completions):\n    return [1.0] * len(prompts)\n")
    script = Path(sys.executable).with_name("rlhf-fast")
    if not script.is_file():
        pytest.skip("the rlhf-fast console script is not installed beside this python")
    cmd = [str(script), "train", "ppo", f"policy={files['init']}", f"prompts={files['prompts']}",
           "reward_fn=rewards:score", "out_dir=out", "steps=1", "prompts_per_step=2", "minibatch_size=2",
           "max_new_tokens=2", "advantage=grpo", "samples_per_prompt=2", "ppo_epochs=1", "device=cpu"]  # fmt: skip
    env = {**native_env(), "RLHF_FAST_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout[done.stdout.index("{"):])["world_size"] == 1
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ truncation


def test_cut_rows_are_reported_once_with_the_side(files, caplog):
    tok = load_tokenizer(files["init"])
    import datasets

    long_prompt = " ".join("abcdefghij") + " >"
    rows = datasets.Dataset.from_list([{"prompt": long_prompt, "completion": "a b c d e f"}] * 3
                                      + [{"prompt": "a >", "completion": "b"}])  # fmt: skip
    with caplog.at_level(logging.WARNING):
        tokenize_sft(rows, tok, 10)
    cuts = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert len(cuts) == 1 and "3 of 4 rows are longer than max_length=10" in cuts[0]
    assert "3 lose the start of their prompt" in cuts[0] and "3 lose the end of their completion or text (cut on the right)" in cuts[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = tokenize_prompts(rows.select_columns(["prompt"]), tok, 4)
    cuts = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert len(cuts) == 1 and "3 of 4 rows are longer than max_prompt_length=4" in cuts[0], cuts
    assert "lose the start of their prompt" in cuts[0]
    assert [len(ids) for ids in out["prompt_input_ids"]] == [4, 4, 4, 3] and "__rlhf_fast_cut" not in out.column_names


# ------------------------------------------------------------------------------------------ precision


def test_trained_weights_stay_float32_from_a_bf16_checkpoint(files, tmp_path):
    """Hub models are mostly saved in bf16, and transformers loads a checkpoint in its own dtype: a trainer
    loads float32 weights (the optimizer's master copy; bf16 is autocast), and saves float32."""
    bf16_dir = tmp_path / "bf16_model"
    load_causal_lm(files["init"], dtype="bf16").save_pretrained(bf16_dir)
    load_tokenizer(files["init"]).save_pretrained(bf16_dir)
    sft.train(sft_config(files, tmp_path / "run", model=str(bf16_dir), precision="bf16", max_steps=1))
    saved = load_causal_lm(tmp_path / "run" / "model")
    assert {p.dtype for p in saved.parameters()} == {torch.float32}
