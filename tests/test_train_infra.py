"""The trainers' shared infrastructure (rlhf_fast.train): configs, metrics and plots, checkpoints with
exact resume, models, data, and the rlhf-fast command. Everything is built here: no downloads."""

import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytest
import torch
from torch import nn

from rlhf_fast.train import checkpoint as ckpt_mod
from rlhf_fast.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from rlhf_fast.train.common import MetricsLogger, autocast_context, plot_metrics, progress, read_metrics, resolve_device
from rlhf_fast.train.config import config_to_dict, describe_config, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------- config


@dataclass
class PPOSection:
    kl_coef: float = 0.1
    target_kl: Optional[float] = None
    estimator: Literal["k1", "k3"] = "k1"


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


# ------------------------------------------------------------------------------ metrics and common


def test_metrics_jsonl_and_plot(tmp_path):
    with MetricsLogger(tmp_path / "run", tensorboard=False) as logger:
        for step in range(5):
            logger.log(step, {"loss": torch.tensor(1.0 / (step + 1)), "kl": 0.01 * step, "n": np.int64(step)})
        # each line is on disk at once (flushed), before close
        assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 5
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(5))
    assert records[3] == {"step": 3, "loss": 0.25, "kl": 0.03, "n": 3}
    with pytest.raises(ValueError, match="'bad'"):
        MetricsLogger(tmp_path / "x", tensorboard=False).log(0, {"bad": torch.ones(3)})

    png = plot_metrics(tmp_path / "run" / "metrics.jsonl", tmp_path / "plots" / "curves.png", title="t")
    assert png is not None and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics(tmp_path / "run" / "metrics.jsonl", tmp_path / "none.png", keys=["absent"]) is None


def test_metrics_logger_appends_and_disabled(tmp_path):
    MetricsLogger(tmp_path, tensorboard=False).log(1, {"a": 1.0})
    with MetricsLogger(tmp_path, tensorboard=False) as logger:  # a resumed run appends
        logger.log(2, {"a": 2.0})
    assert [r["a"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0]
    off = MetricsLogger(tmp_path / "rank1", enabled=False)
    assert off.log(0, {"a": torch.tensor(3.0)}) == {"a": 3.0}
    assert not (tmp_path / "rank1").exists()


def test_device_autocast_and_progress(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("gpu0")
    with autocast_context("cpu", "bf16"):  # CPU: a no-op, matmuls stay float32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        autocast_context("cpu", "fp8")
    monkeypatch.setenv("RLHF_FAST_NO_PROGRESS", "1")
    bar = progress(range(3), desc="x")
    assert bar.disable and list(bar) == [0, 1, 2]


# ------------------------------------------------------------------------------------ checkpoints


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, 11, bias=False)
        self.out.weight = self.emb.weight  # tied: stored once, restored to both

    def forward(self, x):
        return self.out(self.drop(self.emb(x)))


def _train(model, opt, sched, gen, steps, start=0):
    """A loop whose every random choice comes from saved RNGs: torch's global RNG (dropout, the batch
    rows), a torch.Generator (the data order), NumPy's and Python's global RNGs (noise, a coin flip)."""
    data = torch.arange(64) % 11
    losses = []
    for _ in range(start, steps):
        order = torch.randperm(64, generator=gen)[:16]
        x = data[order].view(4, 4)
        target = (x + int(np.random.randint(0, 3)) + random.randint(0, 1)) % 11
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _fresh(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched, torch.Generator().manual_seed(seed)


def _seed_globals(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_exact_resume_is_bit_identical(tmp_path):
    model, opt, sched, gen = _fresh(0)
    _seed_globals(1)
    full_losses = _train(model, opt, sched, gen, 10)

    model2, opt2, sched2, gen2 = _fresh(0)
    _seed_globals(1)
    first = _train(model2, opt2, sched2, gen2, 5)
    save_checkpoint(tmp_path / "checkpoint-00000005", modules={"model": model2}, optimizers={"opt": opt2},
                    schedulers={"sched": sched2}, generators={"data": gen2},
                    state={"step": 5, "kl_coef": np.float64(0.1)})
    # another process resumes: different init, different RNG states, then everything restored
    model3, opt3, sched3, gen3 = _fresh(123)
    _seed_globals(99)
    state = load_checkpoint(latest_checkpoint(tmp_path), modules={"model": model3}, optimizers={"opt": opt3},
                            schedulers={"sched": sched3}, generators={"data": gen3})
    assert state == {"step": 5, "kl_coef": 0.1} and type(state["kl_coef"]) is float
    assert model3.out.weight is model3.emb.weight  # still tied after loading
    second = _train(model3, opt3, sched3, gen3, 10, start=state["step"])

    assert first + second == full_losses  # every loss bit-identical
    for (name, p_full), p_resumed in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(p_full, p_resumed), name
    assert sched3.get_last_lr() == sched.get_last_lr()


def test_checkpoint_files_and_errors(tmp_path):
    model, opt, sched, gen = _fresh(0)
    path = save_checkpoint(tmp_path / "ck", modules={"policy": model}, optimizers={"opt": opt}, state={"step": 1})
    assert sorted(p.name for p in path.iterdir()) == ["policy.safetensors", "trainer_state.pt"]
    with pytest.raises(ValueError, match="no module 'critic'.*policy"):
        load_checkpoint(path, modules={"critic": model})
    with pytest.raises(ValueError, match="no optimizer 'adam'"):
        load_checkpoint(path, modules={}, optimizers={"adam": opt})
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_checkpoint(tmp_path, modules={})
    with pytest.raises(ValueError, match="name"):
        save_checkpoint(tmp_path / "ck2", modules={"a/b": model})


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, _, _ = _fresh(0)
    before = _weights(model)
    ck = save_checkpoint(tmp_path / "last", modules={"m": model}, optimizers={"o": opt}, state={"step": 1})
    with torch.no_grad():
        model.emb.weight.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)  # dies after the weights, before the state
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(ck, modules={"m": model}, optimizers={"o": opt}, state={"step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no half-written directory left
    fresh, _, _, _ = _fresh(7)
    assert load_checkpoint(ck, modules={"m": fresh}) == {"step": 1}
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_killed_save_leaves_previous_checkpoint(tmp_path):
    """A process killed mid-save (no exception handler runs) leaves the old checkpoint and a hidden
    temporary that the next save removes; a kill between the two renames of a replace is recovered."""
    model, opt, _, _ = _fresh(0)
    ck = save_checkpoint(tmp_path / "last", modules={"m": model}, state={"step": 1})
    script = textwrap.dedent(f"""
        import os, torch
        from rlhf_fast.train import checkpoint as c
        torch.save = lambda *a, **k: os._exit(3)   # killed while writing
        c.save_checkpoint({str(ck)!r}, modules={{"m": torch.nn.Linear(2, 2)}}, state={{"step": 2}})
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.tmp-")
    fresh, _, _, _ = _fresh(7)
    assert load_checkpoint(ck, modules={"m": fresh}) == {"step": 1}

    save_checkpoint(ck, modules={"m": model}, state={"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # the stale temporary is gone
    # a kill between "old aside" and "new in": the old one is put back on the next access
    os.rename(ck, tmp_path / ".last.old-deadbeef")
    assert latest_checkpoint(tmp_path) == ck
    assert load_checkpoint(ck, modules={"m": fresh}) == {"step": 3}


def test_latest_and_prune(tmp_path):
    model, _, _, _ = _fresh(0)
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 20, 10):
        save_checkpoint(ckpt_mod.checkpoint_path(tmp_path, step), modules={"m": model}, state={"step": step})
    (tmp_path / "checkpoint-00000099").mkdir()  # not a checkpoint: no trainer_state.pt
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000020"
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["checkpoint-00000005"]
    assert load_checkpoint(latest_checkpoint(tmp_path), modules={"m": model}) == {"step": 20}
