"""Metrics, plots and progress (rlhf_fast.train.metrics); devices and autocast (rlhf_fast.train.runtime)."""

import sys

import numpy as np
import pytest
import torch

from rlhf_fast.train.metrics import MetricsLogger, plot_metrics, progress, read_metrics
from rlhf_fast.train.runtime import autocast_context, resolve_device


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
