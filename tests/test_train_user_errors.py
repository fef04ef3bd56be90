"""What a trainer does with bad input it can only see once it runs (issue 22): rewards that are not one
finite number per completion, options out of range, an ``out_dir`` that cannot be made, a model gone NaN.

Each is a ``UserError`` (one line ``rlhf-fast: error: ...``, exit 2) that names the culprit (``reward_fn``
and what it returned, the config key), raised before any optimizer update and, for options, before
``out_dir`` is touched or a model is loaded; a non-finite model is never written. Also: both op sets log the
same metrics (``dual_clipfrac``), and a bad ``Optional[Literal]`` value lists the choices.
"""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_fast.cli import main
from rlhf_fast.train import best_of_n, loop, ppo
from rlhf_fast.train.checkpoint import save_checkpoint
from rlhf_fast.train.config import load_config
from rlhf_fast.train.errors import UserError
from rlhf_fast.train.models import load_causal_lm
from rlhf_fast.train.ops import FusedOps, ReferenceOps
from rlhf_fast.train.rollout import Rollout, score

from test_train_ppo import bandit_config
from test_train_ppo_options import models  # noqa: F401  (the fixture: a tiny policy and its reference)
from train_utils import tiny_causal_lm_dir


def _tiny(tmp_path, **overrides) -> ppo.Config:
    """One PPO step on the bandit: 2 prompts x 2 samples, one minibatch."""
    opts = dict(advantage="rloo", steps=1, prompts_per_step=2, samples_per_prompt=2, minibatch_size=4,
                max_new_tokens=2)  # fmt: skip
    return bandit_config(tmp_path, **(opts | overrides))


def _cli(capsys, cfg: ppo.Config, *overrides: str) -> str:
    """``rlhf-fast train ppo`` with ``cfg``'s files and ``overrides``: exit 2 and one error line, returned."""
    args = [f"policy={cfg.policy}", f"prompts={cfg.prompts}", f"out_dir={cfg.out_dir}", "device=cpu",
            "precision=fp32", "steps=1", "prompts_per_step=2", "minibatch_size=2", "max_new_tokens=2"]  # fmt: skip
    capsys.readouterr()
    rc = main(["train", "ppo", *args, *overrides])
    err = capsys.readouterr().err.strip().splitlines()  # progress bars of datasets may come first
    assert rc == 2, err
    assert err[-1].startswith("rlhf-fast: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


def _nothing_trained(out: Path) -> None:
    """No model written and no step logged: the run stopped before its first update."""
    assert not (out / "model").exists() and not (out / "critic").exists()
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text().strip() == ""


# ------------------------------------------------------------------------------------------ rewards


def nan_at_1(prompts, completions):
    return [0.5, math.nan] + [0.0] * (len(prompts) - 2)


def inf_at_0(prompts, completions):
    return [math.inf] + [1.0] * (len(prompts) - 1)


@pytest.mark.parametrize("advantage, samples, reward_fn, shown", [
    ("rloo", 2, nan_at_1, "nan in float32 for completion 1"),
    ("grpo", 2, nan_at_1, "nan in float32 for completion 1"),
    ("gae", 1, inf_at_0, "inf in float32 for completion 0"),
])  # fmt: skip
def test_non_finite_reward_stops_before_any_update(tmp_path, advantage, samples, reward_fn, shown):
    cfg = _tiny(tmp_path, advantage=advantage, samples_per_prompt=samples, minibatch_size=2 * samples)
    with pytest.raises(UserError) as err:
        ppo.train(cfg, reward_fn=reward_fn)
    message = str(err.value)
    assert f"reward_fn 'test_train_user_errors:{reward_fn.__name__}'" in message and shown in message, message
    _nothing_trained(tmp_path / "run")


def test_non_finite_reward_is_one_cli_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "issue22_rewards.py").write_text("def score(prompts, completions):\n"
                                                 "    return [float('nan')] * len(prompts)\n")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    cfg = _tiny(tmp_path)
    line = _cli(capsys, cfg, "reward_fn=issue22_rewards:score", "advantage=grpo", "samples_per_prompt=2")
    assert "reward_fn 'issue22_rewards:score'" in line and "nan in float32 for completion 0" in line, line
    _nothing_trained(tmp_path / "run")


def returns_none(prompts, completions):
    return None


def returns_nested(prompts, completions):
    return [[1.0] for _ in prompts]


def returns_one_less(prompts, completions):
    return [1.0] * (len(prompts) - 1)


def returns_text(prompts, completions):
    return ["1.0"] * len(prompts)


def returns_a_number(prompts, completions):
    return 1.0


@pytest.mark.parametrize("reward_fn, shown", [
    (returns_none, "returned None (NoneType)"),
    (returns_nested, "returned [1.0] (list) as the score of completion 0"),
    (returns_one_less, "returned 3 scores for 4 completions"),
    (returns_text, "returned '1.0' (str) as the score of completion 0"),
    (returns_a_number, "returned 1.0 (float)"),
])  # fmt: skip
def test_malformed_reward_names_reward_fn_and_what_it_returned(tmp_path, reward_fn, shown):
    with pytest.raises(UserError) as err:
        ppo.train(_tiny(tmp_path), reward_fn=reward_fn)
    message = str(err.value)
    assert f"reward_fn 'test_train_user_errors:{reward_fn.__name__}'" in message and shown in message, message
    assert "one real number per completion" in message
    _nothing_trained(tmp_path / "run")


def test_score_takes_lists_tuples_arrays_and_tensors():
    """The forms a reward function may return give the same float32 scores; the others are refused."""
    ro = Rollout(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), torch.ones(3, 2),
                 ["p"] * 3, ["a", "b", "c"], eos_token_id=1)  # fmt: skip
    want = torch.tensor([0.5, -2.0, 3.0])
    for form in ([0.5, -2, 3.0], (0.5, -2.0, 3), np.array([0.5, -2.0, 3.0]), torch.tensor([0.5, -2.0, 3.0]),
                 [np.float64(0.5), torch.tensor(-2.0), np.int64(3)]):  # fmt: skip
        got = score(ro, reward_fn=lambda p, c, form=form: form)
        assert got.dtype == torch.float32 and torch.equal(got, want), form
    assert score(ro, reward_fn=lambda p, c: [True, False, True]).tolist() == [1.0, 0.0, 1.0]  # pass / fail
    for bad, shown in ((torch.ones(3, 1), "returned tensor"), ([1.0, 2.0, 1e39], "inf in float32 for completion 2"),
                       ({"a": 1.0}, "returned {'a': 1.0} (dict)")):  # fmt: skip
        with pytest.raises(UserError, match=f"^reward_fn .*{re.escape(shown)}"):
            score(ro, reward_fn=lambda p, c, bad=bad: bad)


@pytest.mark.parametrize("reward_fn, shown", [(nan_at_1, "nan in float32 for completion 1"),
                                               (returns_none, "returned None")])  # fmt: skip
def test_best_of_n_refuses_the_same_rewards(tmp_path, reward_fn, shown):
    init = tiny_causal_lm_dir(tmp_path / "init", seed=1)
    cfg = best_of_n.Config(policy=init, prompts=_tiny(tmp_path).prompts, out_dir=str(tmp_path / "bon"), n=2,
                           prompts_per_step=4, max_new_tokens=2, batch_size=4, device="cpu", precision="fp32")
    with pytest.raises(UserError) as err:
        best_of_n.train(cfg, reward_fn=reward_fn)
    assert f"reward_fn 'test_train_user_errors:{reward_fn.__name__}'" in str(err.value) and shown in str(err.value)
    _nothing_trained(tmp_path / "bon")


# ------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("override, shown", [
    ("missing_eos_penalty=nan", "missing_eos_penalty must be a finite number, got nan"),
    ("missing_eos_penalty=-.inf", "missing_eos_penalty must be a finite number, got -inf"),
    ("target_kl=0", "target_kl must be a number > 0, got 0.0"),
    ("target_kl=-1", "target_kl must be a number > 0, got -1.0"),
    ("kl_horizon=0", "kl_horizon must be an int >= 1, got 0"),
    ("gamma=1.5", "gamma must be a number in [0, 1], got 1.5"),
    ("lam=-0.5", "lam must be a number in [0, 1], got -0.5"),
    ("value_clip=-1", "value_clip must be a number > 0, got -1.0"),
])  # fmt: skip
def test_options_out_of_range_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch, override, shown):
    """Checked with the config: before the model is loaded and before out_dir is made (a rerun needs no
    overwrite=true)."""
    cfg = _tiny(tmp_path)
    monkeypatch.setattr(ppo, "load_models", lambda *a, **k: pytest.fail("the model was loaded"))
    line = _cli(capsys, cfg, "reward_fn=test_train_user_errors:nan_at_1", "advantage=gae", override)
    assert shown in line, line
    assert not Path(cfg.out_dir).exists()


def test_missing_eos_penalty_overflowing_float32_is_named(tmp_path):
    """A finite penalty whose product with the scores is not finite in float32: named, before an update."""
    cfg = _tiny(tmp_path, missing_eos_penalty=1e39)  # responses of max_new_tokens=2 are mostly cut
    with pytest.raises(UserError, match=r"missing_eos_penalty=1e\+39 gave a non-finite score"):
        ppo.train(cfg, reward_fn=lambda p, c: [0.0] * len(p))
    _nothing_trained(tmp_path / "run")


def test_out_dir_under_a_file_is_a_user_error(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    cfg = _tiny(tmp_path, out_dir=str(tmp_path / "a_file" / "run"))
    with pytest.raises(UserError, match=r"out_dir '.*a_file/run' cannot be created: '.*a_file' is a file"):
        ppo.train(cfg, reward_fn=nan_at_1)
    line = _cli(capsys, cfg, "reward_fn=test_train_user_errors:nan_at_1", f"out_dir={tmp_path / 'a_file' / 'x' / 'y'}")
    assert "out_dir" in line and "is a file, not a directory" in line, line
    assert (tmp_path / "a_file").read_text() == "not a directory"


# ------------------------------------------------------------------------------------------ non-finite models


def test_non_finite_parameters_are_never_saved(tmp_path):
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path / "checkpoint-1", modules={"policy": model}, state={"step": 1})
    before = (tmp_path / "checkpoint-1" / "policy.safetensors").read_bytes()
    with torch.no_grad():
        model.bias[1] = math.nan
    for name in ("checkpoint-1", "checkpoint-2"):  # neither replaced nor written
        with pytest.raises(UserError, match="refusing to save module 'policy' .* 1 of its 2 tensors hold NaN or inf "
                                            r"\(first: 'bias'\)"):  # fmt: skip
            save_checkpoint(tmp_path / name, modules={"policy": model}, state={"step": 2})
    assert (tmp_path / "checkpoint-1" / "policy.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_non_finite_final_model_is_never_saved(tmp_path):
    model = load_causal_lm(tiny_causal_lm_dir(tmp_path / "init"))
    with torch.no_grad():
        next(model.parameters())[0, 0] = math.inf
    with pytest.raises(UserError, match="refusing to save the model to .*NaN or inf"):
        loop.save_pretrained(model, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init"]


# ------------------------------------------------------------------------------------------ cosmetics


@pytest.mark.parametrize("options", [dict(), dict(delta=1.5), dict(loss_mode="gspo")])
def test_both_op_sets_log_dual_clipfrac(models, options):
    """With dual_clip the reference ops log the fused ops' metrics, dual_clipfrac included, with its value (a
    batch in which the dual clip is active on some tokens and not on others)."""
    from test_train_ppo_options import _batch, loss_config

    policy, ref = models
    batch = _batch(policy, ref)
    batch["old_logp"] = batch["old_logp"] - 0.5 * batch["response_mask"]  # ratios around e^0.5, some above 1.3
    batch["advantages"] = torch.tensor([-1.0, -0.5, 1.0, -2.0])
    cfg = loss_config(dual_clip=1.3, **options)
    _, fused = FusedOps().policy_loss(policy, batch, cfg, ref_model=ref)
    _, reference = ReferenceOps().policy_loss(policy, batch, cfg, ref_model=ref)
    assert sorted(fused) == sorted(reference) and "dual_clipfrac" in fused
    assert 0 < float(fused["dual_clipfrac"]) < 1, float(fused["dual_clipfrac"])
    for key in fused:
        assert float(reference[key]) == pytest.approx(float(fused[key]), rel=1e-4, abs=1e-6), key


def test_optional_choices_read_as_choices():
    with pytest.raises(ValueError) as err:
        load_config(ppo.Config, None, ["loss_type=foo"])
    assert str(err.value) == "config key 'loss_type': 'foo' is not one of 'grpo', 'bnpo', 'dr_grpo', 'dapo' or null"
    with pytest.raises(ValueError) as err:
        load_config(ppo.Config, None, ["clip_high=wide"])
    assert str(err.value) == "config key 'clip_high': 'wide' is not a float or null"
