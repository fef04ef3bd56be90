"""What a trainer records: metrics (JSONL, TensorBoard when installed), plots of them, progress bars and
atomic JSON summaries. (Seeds, the device, autocast and memory: runtime.py.)"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from numbers import Number
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["MetricsLogger", "plot_metrics", "progress", "read_metrics", "write_json"]

def _scalar(name: str, value: Any) -> float | int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, Number):
        return float(value)
    raise ValueError(f"metric {name!r} must be a number or a one-element tensor, got {type(value).__name__}")


class MetricsLogger:
    """Appends ``{"step": step, **metrics}`` as one JSON line to ``<out_dir>/metrics.jsonl`` per ``log``
    call (flushed at once, so a crashed run keeps its curve), and to TensorBoard when
    ``torch.utils.tensorboard`` can be imported and ``tensorboard=True``. ``enabled=False`` (other ranks
    of a distributed run) makes every call do nothing.

        with MetricsLogger(out_dir) as logger:
            logger.log(step, {"loss": loss, "kl": kl})    # tensors are read with .item()
    """

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True,
                 filename: str = "metrics.jsonl"):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / filename
        self.enabled = enabled
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:  # a resumed run: drop the events after the last kept record
                self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=self._next_step())

    def _next_step(self) -> int | None:
        """One past the step of the last record in the file (None without one)."""
        records = read_metrics(self.path) if self.path.is_file() else []
        steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
        return max(steps) + 1 if steps else None

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | int]:
        """Write one record; returns it as plain numbers (handy for a progress bar's postfix)."""
        record = {name: _scalar(name, value) for name, value in metrics.items()}
        if not self.enabled:
            return record
        if self._file is None:
            raise RuntimeError("MetricsLogger.log after close()")
        line = {"step": int(step), **record}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                self._writer.add_scalar(name, value, global_step=int(step))
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in order; a torn last line (a crash mid-write) is skipped."""
    records = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_metrics(jsonl_path: str | Path, png_path: str | Path, keys: Sequence[str] | None = None,
                 title: str | None = None) -> Path | None:
    """One subplot per metric against ``step``, saved as a PNG. ``keys=None`` plots every numeric metric.
    Returns the PNG's path, or None when matplotlib is not installed or there is nothing to plot."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch
    except ImportError:
        return None
    records = read_metrics(jsonl_path)
    if keys is None:
        keys = []
        for record in records:
            keys += [k for k, v in record.items() if k != "step" and k not in keys and isinstance(v, Number)]
    series = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), Number) and "step" in r]
        if points:
            series[key] = points
    if not series:
        return None
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.0 * rows), layout="constrained")
    for i, (key, points) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 50 else None, linewidth=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None, **kwargs):
    """A tqdm bar; off when ``RLHF_FAST_NO_PROGRESS=1``, and (tqdm's ``disable=None``) when the output
    is not a terminal, so logs and CI stay clean."""
    from tqdm.auto import tqdm

    disable = True if os.environ.get("RLHF_FAST_NO_PROGRESS", "") not in ("", "0") else None
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, disable=disable, **kwargs)


def write_json(path, data) -> None:
    """Write ``data`` as indented JSON atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)
