"""Configs (rlhf_fast.train.config): YAML files, dotted overrides, round trips, errors that name the key."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlhf_fast.train.config import config_to_dict, describe_config, load_config, save_config
from train_utils import PPOSection


@dataclass
class DemoConfig:
    model: str = "tiny"
    lr: float = 1e-3
    steps: int = 10
    bf16: bool = False
    run_name: str = "run"
    stop: list[int] = field(default_factory=lambda: [2])
    out_dir: Path = Path("runs")
    ppo: PPOSection = field(default_factory=PPOSection)


def test_config_defaults_yaml_and_overrides(tmp_path):
    assert load_config(DemoConfig) == DemoConfig()
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3.0e-4\nsteps: 20\nppo:\n  kl_coef: 0.2\n  estimator: k3\n")
    cfg = load_config(DemoConfig, path, ["lr=1e-4", "ppo.kl_coef=0.05", "model=/ckpt/sft", "bf16=true",
                                         "run_name=007", "stop=[3, 4]", "ppo.target_kl=6", "out_dir=/tmp/x"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)  # YAML reads "1e-4" as a string: converted
    assert cfg.steps == 20  # from the file
    assert cfg.ppo == PPOSection(kl_coef=0.05, target_kl=6.0, estimator="k3")
    assert isinstance(cfg.ppo.target_kl, float)
    assert cfg.model == "/ckpt/sft" and cfg.bf16 is True and cfg.stop == [3, 4]
    assert cfg.run_name == "007"  # a str field takes the text as typed, not YAML's int 7
    assert cfg.out_dir == Path("/tmp/x")
    # the later override wins; Optional accepts null/none
    assert load_config(DemoConfig, None, ["steps=5", "steps=1e3", "ppo.target_kl=none"]).steps == 1000
    assert load_config(DemoConfig, None, ["ppo.target_kl=null"]).ppo.target_kl is None


def test_config_round_trip(tmp_path):
    cfg = load_config(DemoConfig, None, ["ppo.kl_coef=0.3", "stop=[1,2,3]"])
    d = config_to_dict(cfg)
    assert d["ppo"] == {"kl_coef": 0.3, "target_kl": None, "estimator": "k1"} and d["out_dir"] == "runs"
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(DemoConfig, tmp_path / "saved.yaml") == cfg
    text = describe_config(DemoConfig)
    assert "ppo.kl_coef: float = 0.1" in text and "lr: float = 0.001" in text


@pytest.mark.parametrize(
    "override, words",
    [
        ("lrr=1", ["'lrr'", "valid keys", "lr", "ppo"]),
        ("ppo.kl_coeff=1", ["'ppo.kl_coeff'", "ppo.kl_coef", "ppo.estimator"]),
        ("lr.x=1", ["'lr'", "not a section"]),
        ("lr=abc", ["'lr'", "float"]),
        ("steps=1.5", ["'steps'", "int"]),
        ("steps=true", ["'steps'", "int"]),
        ("bf16=maybe", ["'bf16'", "bool"]),
        ("ppo.estimator=k2", ["'ppo.estimator'", "'k1'", "'k3'"]),
        ("stop=3", ["'stop'", "list"]),
        ("stop=[1, x]", ["'stop[1]'", "int"]),
        ("ppo=3", ["'ppo'", "mapping"]),
        ("noequals", ["key=value"]),
    ],
)
def test_config_errors_name_the_key(override, words):
    with pytest.raises(ValueError) as info:
        load_config(DemoConfig, None, [override])
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(DemoConfig, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(DemoConfig, tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("ppo:\n  kl: 1\n")
    with pytest.raises(ValueError, match="'ppo.kl'"):
        load_config(DemoConfig, tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(DemoConfig, tmp_path / "empty.yaml") == DemoConfig()
