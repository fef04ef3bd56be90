"""Checkpoints (rlhf_fast.train.checkpoint): exact resume, atomic saves that survive failures and kills, pruning."""

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from rlhf_fast.train import checkpoint as ckpt_mod
from rlhf_fast.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint


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
