"""The rlhf-fast command (rlhf_fast.cli): help, trainer lookup, config files and overrides, benchmarks, the console script."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from train_utils import PPOSection

from rlhf_fast import cli

ROOT = Path(__file__).resolve().parents[1]


def _run_module(*args, cwd=ROOT):
    env = {**os.environ, "RLHF_FAST_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "rlhf_fast", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_cli_help_and_unknown_trainer():
    out = _run_module("--help")
    assert out.returncode == 0 and all(w in out.stdout for w in ("train", "demo", "bench"))
    out = _run_module("train", "--help")
    assert out.returncode == 0 and all(name in out.stdout for name in cli.TRAINERS)
    out = _run_module("train", "nope")
    assert out.returncode == 2 and "invalid choice: 'nope'" in out.stderr


def test_cli_trainer_module_missing(monkeypatch, capsys):
    monkeypatch.setitem(cli.TRAINERS, "sft", "rlhf_fast.train.not_written_yet")
    assert cli.main(["train", "sft", "lr=1"]) == 2
    err = capsys.readouterr().err
    assert "trainer 'sft' is not available" in err and "rlhf_fast.train.not_written_yet" in err


@dataclass
class _FakeConfig:
    lr: float = 1e-3
    steps: int = 3
    name: str = "x"
    ppo: PPOSection = field(default_factory=PPOSection)

    def validate(self):
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


def test_cli_runs_a_trainer_with_config_and_overrides(monkeypatch, capsys, tmp_path):
    import types

    calls = []
    fake = types.ModuleType("fake_trainer")
    fake.Config = _FakeConfig
    fake.train = lambda cfg: calls.append(cfg) or {"final_lr": cfg.lr, "kl": cfg.ppo.kl_coef}
    monkeypatch.setitem(sys.modules, "fake_trainer", fake)
    monkeypatch.setitem(cli.TRAINERS, "ppo", "fake_trainer")
    (tmp_path / "c.yaml").write_text("steps: 7\nppo:\n  kl_coef: 0.5\n")

    assert cli.main(["train", "ppo", "--config", str(tmp_path / "c.yaml"), "lr=1e-4", "ppo.estimator=k3"]) == 0
    assert calls == [_FakeConfig(lr=1e-4, steps=7, ppo=PPOSection(kl_coef=0.5, estimator="k3"))]
    assert json.loads(capsys.readouterr().out) == {"final_lr": 1e-4, "kl": 0.5}

    assert cli.main(["train", "ppo", "--print-config", "name=run1", "steps=0"]) == 0  # printed, not validated
    import yaml

    assert yaml.safe_load(capsys.readouterr().out) == {"lr": 1e-3, "steps": 0, "name": "run1",
                                                        "ppo": {"kl_coef": 0.1, "target_kl": None, "estimator": "k1"}}
    assert cli.main(["train", "ppo", "ppo.kl=1"]) == 2
    assert "unknown config key 'ppo.kl'" in capsys.readouterr().err
    assert cli.main(["train", "ppo", "steps=0"]) == 2  # Config.validate() speaks as a one-line error
    assert "steps must be >= 1" in capsys.readouterr().err
    assert len(calls) == 1


def test_cli_bench_lists_and_rejects(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(ROOT)
    assert cli.main(["bench"]) == 0
    listed = capsys.readouterr().out.split()
    assert "logprobs" in listed and "gae" in listed
    assert cli.main(["bench", "nope"]) == 2 and "unknown benchmark 'nope'" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # the benchmarks ship in the package: listed from any directory
    assert cli.main(["bench"]) == 0 and "gpu" in capsys.readouterr().out.split()


def test_console_script_is_installed():
    """pip install -e . (the README's test line) put the rlhf-fast script in place, pointing at cli.main."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "rlhf-fast"]
    assert script.load() is cli.main


def test_demo_rejects_bad_sampling_keys_before_any_stage(tmp_path):
    """A bad top_k / top_p / min_p is one line and exit 2 before the data, SFT or the reward model (minutes of
    work) run, and nothing is written; the keys reach PPO's config."""
    from rlhf_fast import demo

    for key, bad in (("top_p", "1.5"), ("top_k", "-1"), ("min_p", "1.0")):
        out = _run_module("demo", f"out_dir={tmp_path / 'run'}", f"{key}={bad}")
        assert out.returncode == 2 and out.stderr.startswith(f"rlhf-fast: error: {key} must be"), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    cfg = demo.Config(top_k=20, top_p=0.9, min_p=0.05)
    ppo_cfg = demo._ppo_config(cfg, tmp_path, {"prompts": "p", "eval_prompts": "e"}, "fused")
    assert (ppo_cfg.top_k, ppo_cfg.top_p, ppo_cfg.min_p) == (20, 0.9, 0.05)
