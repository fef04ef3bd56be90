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


def test_metrics_to_tensorboard_when_installed(tmp_path, monkeypatch):
    """With torch.utils.tensorboard importable, every scalar also goes to a SummaryWriter (a recording
    stand-in here: tensorboard is not a dependency)."""
    import types

    written = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir = log_dir
            written.append(("purge_step", purge_step))

        def add_scalar(self, name, value, global_step):
            written.append((name, value, global_step))

        def close(self):
            written.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    with MetricsLogger(tmp_path) as logger:
        assert logger._writer.log_dir == str(tmp_path / "tensorboard")
        logger.log(4, {"loss": torch.tensor(0.5), "kl": 0.25})
    assert written == [("purge_step", None), ("loss", 0.5, 4), ("kl", 0.25, 4), "closed"]
    written.clear()
    MetricsLogger(tmp_path, tensorboard=False).log(5, {"loss": 1.0})
    assert written == []
    # a resumed run (metrics.jsonl cut back to step 5): TensorBoard drops its events from step 6 on
    MetricsLogger(tmp_path).close()
    assert written == [("purge_step", 6), "closed"]


def test_device_autocast_and_progress(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("gpu0")
    with autocast_context("cpu", "bf16"):  # bf16 is CPU autocast too: matmuls in bf16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    for precision in ("fp32", "auto"):  # auto: bf16 on CUDA only, so on the CPU float32
        with autocast_context("cpu", precision):
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


# ----------------------------------------------------------------------------------------- models

from rlhf_fast.train.models import (  # noqa: E402
    CriticModel,
    build_causal_lm,
    build_char_tokenizer,
    build_reward_model,
    lm_hidden_states,
    load_causal_lm,
    load_tokenizer,
    position_ids_from_mask,
    reward_scores,
)

CHARS = "abcdefghijklmnopqrstuvwxyz ?!"


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(CHARS)


def _lm(tokenizer, **kw):
    return build_causal_lm(len(tokenizer), hidden_size=32, num_heads=4, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kw)


def _batch(tokenizer, texts, side="right"):
    from rlhf_fast.train.data import pad_batch

    return pad_batch([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id, side=side)


def test_char_tokenizer(tokenizer):
    ids = tokenizer("ab c")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 5
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab c"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>hi</s><|assistant|>"
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 6  # role markers are single tokens


def test_build_causal_lm_is_seeded_and_leaves_global_rng(tokenizer):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = _lm(tokenizer, seed=1)
    assert torch.equal(torch.rand(3), expected)  # the global RNG did not move
    b, c = _lm(tokenizer, seed=1), _lm(tokenizer, seed=2)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 32 and a.config.vocab_size == len(tokenizer)
    with pytest.raises(ValueError, match="num_heads"):
        build_causal_lm(10, hidden_size=30, num_heads=4)


@pytest.mark.parametrize("tied", [False, True])
def test_lm_hidden_states_match_logits(tokenizer, tied):
    model = _lm(tokenizer, tie_word_embeddings=tied).eval()
    ids, mask = _batch(tokenizer, ["abc", "hello world", "z"], side="left")
    hidden, weight, bias = lm_hidden_states(model, ids, mask)
    assert hidden.shape == (3, ids.shape[1], 32) and weight.shape == (len(tokenizer), 32) and bias is None
    assert (weight is model.get_input_embeddings().weight) == tied
    logits = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    torch.testing.assert_close(hidden @ weight.T, logits, rtol=1e-5, atol=1e-5)
    # left padding changes nothing for the real tokens: positions come from the mask, as in generate()
    r_ids, r_mask = _batch(tokenizer, ["abc"])
    r_hidden, _, _ = lm_hidden_states(model, r_ids, r_mask)
    torch.testing.assert_close(hidden[0, -4:], r_hidden[0], rtol=1e-5, atol=1e-5)


def test_lm_hidden_states_through_ddp(tokenizer, tmp_path):
    """A DDP-wrapped model runs its own forward (so gradients get synchronised): same hidden states and
    the same gradients as the plain path."""
    import torch.distributed as dist

    model = _lm(tokenizer, tie_word_embeddings=True)
    ids, mask = _batch(tokenizer, ["abc", "hello"], side="left")
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)

    def loss_and_grads(m, grads_of):
        h, w, _ = lm_hidden_states(m, ids, mask)
        loss = nn.functional.cross_entropy((h[:, :-1] @ w.T).flatten(0, 1), labels.flatten())
        grads_of.zero_grad()
        loss.backward()
        return h.detach(), [p.grad.clone() for p in grads_of.parameters()]

    h_plain, g_plain = loss_and_grads(model, model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        h_ddp, g_ddp = loss_and_grads(ddp, model)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(h_ddp, h_plain)
    for a, b in zip(g_ddp, g_plain):
        torch.testing.assert_close(a, b)


def test_critic_shapes_and_round_trip(tokenizer, tmp_path):
    lm = _lm(tokenizer)
    lm.save_pretrained(tmp_path / "lm")
    critic = CriticModel.from_pretrained(tmp_path / "lm")  # from a causal LM: its base model, a zero head
    for name, p in critic.backbone.state_dict().items():
        assert torch.equal(p, lm.model.state_dict()[name]), name
    ids, mask = _batch(tokenizer, ["abc", "hello world"])
    values = critic(ids, mask)
    assert values.shape == ids.shape and values.dtype == torch.float32 and torch.all(values == 0)

    with torch.no_grad():
        critic.value_head.weight.normal_()
        critic.value_head.bias.fill_(0.5)
    values = critic(ids, mask)
    assert values.std() > 0
    values.sum().backward()  # gradients reach the backbone
    assert critic.backbone.embed_tokens.weight.grad.abs().sum() > 0
    critic.save_pretrained(tmp_path / "critic")
    again = CriticModel.from_pretrained(tmp_path / "critic")
    torch.testing.assert_close(again(ids, mask), values.detach(), rtol=0, atol=0)
    from_memory = CriticModel.from_causal_lm(lm)
    assert from_memory.backbone is not lm.model and torch.equal(from_memory.backbone.norm.weight, lm.model.norm.weight)


def test_reward_model_scores(tokenizer, tmp_path):
    lm = _lm(tokenizer)
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    rm = build_reward_model(tmp_path / "lm").eval()
    assert rm.config.pad_token_id == tokenizer.pad_token_id and rm.config.num_labels == 1
    texts = ["abc", "hello world", "z"]
    right = reward_scores(rm, *_batch(tokenizer, texts, side="right"))
    left = reward_scores(rm, *_batch(tokenizer, texts, side="left"))
    assert right.shape == (3,) and right.dtype == torch.float32
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)  # padding side does not matter
    ids, mask = _batch(tokenizer, texts)
    torch.testing.assert_close(right, rm(ids, attention_mask=mask).logits.squeeze(-1), rtol=1e-5, atol=1e-5)
    single = torch.stack([reward_scores(rm, *_batch(tokenizer, [t])) for t in texts]).squeeze(-1)
    torch.testing.assert_close(single, right, rtol=1e-5, atol=1e-5)
    # pad == eos (load_tokenizer's fallback) and sequences ending in eos: the model's own pooling skips
    # the final eos, reward_scores pools at the last attended token whatever its id
    from rlhf_fast.train.data import pad_batch

    eos = tokenizer.eos_token_id
    ids, mask = pad_batch([tokenizer(t)["input_ids"] + [eos] for t in texts], eos)
    rm.config.pad_token_id = tokenizer.pad_token_id
    expected = rm(ids.masked_fill(mask == 0, tokenizer.pad_token_id), attention_mask=mask).logits.squeeze(-1)
    rm.config.pad_token_id = eos
    torch.testing.assert_close(reward_scores(rm, ids, mask), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rm(ids, attention_mask=mask).logits.squeeze(-1), expected, rtol=1e-5, atol=1e-5)


def test_load_model_and_tokenizer_from_dir(tokenizer, tmp_path):
    lm = _lm(tokenizer)
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    loaded = load_causal_lm(tmp_path / "lm", dtype="bf16")
    assert loaded.dtype == torch.bfloat16 and loaded.config._attn_implementation == "sdpa"
    tok = load_tokenizer(tmp_path / "lm", padding_side="left")
    assert tok.padding_side == "left" and tok("ab")["input_ids"] == tokenizer("ab")["input_ids"]
    nopad = build_char_tokenizer(CHARS)
    nopad.pad_token = None
    nopad.save_pretrained(tmp_path / "nopad")
    assert load_tokenizer(tmp_path / "nopad").pad_token == "</s>"  # falls back on eos


# ------------------------------------------------------------------------------------------- data

from rlhf_fast.train.data import (  # noqa: E402
    collate_preferences,
    collate_prompts,
    collate_sft,
    load_records,
    pad_batch,
    require_columns,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)

SFT_ROWS = [{"prompt": "ab", "completion": "cd"}, {"prompt": "what is x?", "completion": "y"}]
PREF_ROWS = [{"prompt": "ab", "chosen": "cd", "rejected": "zzz", "answer": "cd"},
             {"prompt": "hi", "chosen": "yo", "rejected": "no", "answer": "yo"}]
CHAT_ROWS = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                           {"role": "assistant", "content": "cd"}, {"role": "user", "content": "e"},
                           {"role": "assistant", "content": "fg"}]}]


def _write(tmp_path, name, rows, kind):
    import datasets

    path = tmp_path / f"{name}.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def _ids(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_sft_from_files(tokenizer, tmp_path, kind):
    ds = tokenize_sft(load_records(_write(tmp_path, "sft", SFT_ROWS, kind)), tokenizer, max_length=64)
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 2
    eos = tokenizer.eos_token_id
    prompt, completion = _ids(tokenizer, "ab", special=True), _ids(tokenizer, "cd") + [eos]
    assert ds[0]["input_ids"] == prompt + completion  # BOS a b | c d </s>
    assert ds[0]["labels"] == [-100] * len(prompt) + completion  # loss on the completion (and eos) only

    chat = tokenize_sft(load_records(_write(tmp_path, "chat", CHAT_ROWS, kind)), tokenizer, max_length=64)[0]
    trained = [t for t, label in zip(chat["input_ids"], chat["labels"]) if label != -100]
    assert trained == _ids(tokenizer, "cd</s>fg</s>")  # both assistant turns, nothing else
    text = tokenizer.apply_chat_template(CHAT_ROWS[0]["messages"], tokenize=False)
    assert chat["input_ids"] == _ids(tokenizer, text)  # the whole rendered conversation


def test_sft_truncation_keeps_completion(tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "abcdefghijklmnop", "completion": "xyz"}])
    row = tokenize_sft(ds, tokenizer, max_length=8)[0]
    assert len(row["input_ids"]) == 8
    assert row["input_ids"][-4:] == _ids(tokenizer, "xyz") + [tokenizer.eos_token_id]  # the whole completion
    assert row["input_ids"][:4] == _ids(tokenizer, "mnop")  # the prompt's end
    long = datasets.Dataset.from_list([{"prompt": "ab", "completion": "c" * 40}])
    assert tokenize_sft(long, tokenizer, max_length=10)[0]["labels"][:3] == [-100] * 3


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_preferences_from_files(tokenizer, tmp_path, kind):
    ds = tokenize_preferences(load_records(_write(tmp_path, "pref", PREF_ROWS, kind)), tokenizer, max_length=64)
    assert set(ds.column_names) == {"prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                    "rejected_labels"}
    row, eos = ds[0], tokenizer.eos_token_id
    prompt = _ids(tokenizer, "ab", special=True)
    assert row["chosen_input_ids"] == prompt + _ids(tokenizer, "cd") + [eos]
    assert row["rejected_labels"] == [-100] * 3 + _ids(tokenizer, "zzz") + [eos]

    convo = [{"chosen": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}],
              "rejected": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "zzz"}]}]
    row = tokenize_preferences(load_records(_write(tmp_path, "cpref", convo, kind)), tokenizer, 64)[0]
    prompt_text = tokenizer.apply_chat_template(convo[0]["chosen"][:1], tokenize=False, add_generation_prompt=True)
    assert row["prompt_input_ids"] == _ids(tokenizer, prompt_text)
    assert row["chosen_input_ids"] == _ids(tokenizer, prompt_text + "cd</s>")
    assert [t for t in row["rejected_labels"] if t != -100] == _ids(tokenizer, "zzz</s>")


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_prompts_from_files_keep_extra_columns(tokenizer, tmp_path, kind):
    ds = tokenize_prompts(load_records(_write(tmp_path, "p", PREF_ROWS, kind)), tokenizer, max_prompt_length=2)
    row = ds[1]
    assert row["prompt"] == "hi" and row["answer"] == "yo" and row["chosen"] == "yo"  # extra columns kept
    assert row["prompt_input_ids"] == _ids(tokenizer, "hi")  # the last 2 tokens: BOS cut
    chat = tokenize_prompts(load_records(_write(tmp_path, "c", CHAT_ROWS, kind)), tokenizer, 64)[0]
    assert chat["prompt"].endswith("<|user|>e</s><|assistant|>")  # up to the last assistant turn
    assert chat["prompt_input_ids"] == _ids(tokenizer, chat["prompt"])


def test_missing_columns_and_sources(tokenizer, tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"question": "a", "answer": "b"}])
    for fn, purpose in ((tokenize_sft, "sft"), (tokenize_preferences, "preferences"), (tokenize_prompts, "prompts")):
        with pytest.raises(ValueError) as info:
            fn(ds, tokenizer, 16)
        msg = str(info.value)
        assert purpose in msg and "missing" in msg and "'question'" in msg and "Accepted formats" in msg
    with pytest.raises(ValueError, match=r"missing column\(s\) \['completion'\]"):
        require_columns(datasets.Dataset.from_list([{"prompt": "a"}]), ["prompt", "completion"], "sft")
    with pytest.raises(ValueError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_records(str(tmp_path / "x.txt"))
    notemplate = build_char_tokenizer(CHARS, chat_template=None)
    with pytest.raises(ValueError, match="chat template"):
        tokenize_sft(datasets.Dataset.from_list(CHAT_ROWS), notemplate, 64)


def test_load_records_directory_and_split(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    _write(data, "train", SFT_ROWS, "jsonl")
    _write(data, "test", SFT_ROWS[:1], "jsonl")
    assert len(load_records(str(data))) == 2 and len(load_records(str(data), split="test")) == 1
    assert len(load_records(_write(tmp_path, "one", SFT_ROWS, "jsonl"), split="train[:1]")) == 1


def test_collators_pad():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], torch.tensor([8])], pad_id=0, side="left", pad_to_multiple_of=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert ids.dtype == torch.long
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")

    sft = collate_sft([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [1, 4], "labels": [-100, 4]}], 0)
    assert sft["input_ids"].tolist() == [[1, 2, 3], [1, 4, 0]]
    assert sft["labels"].tolist() == [[-100, 2, 3], [-100, 4, -100]]  # padding never trained
    assert sft["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]

    rows = [{"chosen_input_ids": [1, 2], "chosen_labels": [-100, 2], "rejected_input_ids": [1, 3, 3],
             "rejected_labels": [-100, 3, 3]},
            {"chosen_input_ids": [1, 4, 4, 4], "chosen_labels": [-100, 4, 4, 4], "rejected_input_ids": [1, 5],
             "rejected_labels": [-100, 5]}]
    pref = collate_preferences(rows, pad_id=0)
    assert pref["input_ids"].tolist() == [[1, 2, 0, 0], [1, 4, 4, 4], [1, 3, 3, 0], [1, 5, 0, 0]]  # chosen, then rejected
    assert pref["labels"][2].tolist() == [-100, 3, 3, -100] and pref["attention_mask"].shape == (4, 4)

    prompts = collate_prompts([{"prompt_input_ids": [1, 2, 3], "prompt": "ab", "answer": 1},
                               {"prompt_input_ids": [1], "prompt": "", "answer": 2}], pad_id=0)
    assert prompts["input_ids"].tolist() == [[1, 2, 3], [0, 0, 1]]  # left padding for generate
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert prompts["prompt"] == ["ab", ""] and prompts["answer"] == [1, 2]
    ids, mask = collate_prompts([[1, 2, 3], [1]], pad_id=0)  # bare sequences: the padded pair
    assert ids.tolist() == [[1, 2, 3], [0, 0, 1]]


def test_tokenized_batch_feeds_the_model(tokenizer, tmp_path):
    """End to end: a file → tokenize_sft → collate_sft → hidden states → rf.linear_logprobs; the loss is
    the mean next-token loss over completion tokens only, equal to cross-entropy on the full logits."""
    import rlhf_fast as rf

    ds = tokenize_sft(load_records(_write(tmp_path, "sft", SFT_ROWS, "jsonl")), tokenizer, max_length=64)
    batch = collate_sft([ds[0], ds[1]], tokenizer.pad_token_id)
    model = _lm(tokenizer).eval()
    hidden, weight, bias = lm_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    logp = rf.linear_logprobs(hidden[:, :-1], weight, labels, bias=bias)
    loss = -logp.sum() / (labels != -100).sum()
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()),
                               rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- CLI

from rlhf_fast import cli  # noqa: E402


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


def test_gradient_checkpointing_recomputes_blocks(tokenizer):
    """With it on, each decoder block's MLP runs twice per training step (forward, then again in the backward);
    the critic's backbone too."""
    from rlhf_fast.train.models import enable_gradient_checkpointing

    for make in (lambda: _lm(tokenizer, num_layers=2), lambda: CriticModel.from_causal_lm(_lm(tokenizer, num_layers=2))):
        counts = {}
        for flag in (False, True):
            model = enable_gradient_checkpointing(make(), flag).train()
            layer = (model.backbone if isinstance(model, CriticModel) else model.model).layers[0]
            calls = []
            layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # inside the checkpointed region
            ids, mask = _batch(tokenizer, ["abc", "de"])
            out = model(ids, mask) if isinstance(model, CriticModel) else model(input_ids=ids, attention_mask=mask).logits
            out.float().sum().backward()
            counts[flag] = len(calls)
        assert counts == {False: 1, True: 2}
