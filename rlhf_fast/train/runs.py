"""A run's output directory: one run per ``out_dir``, resumed only as the same run.

``prepare_out_dir(cfg)`` is what ``loop.start_run`` does before it writes ``config.yaml``:

- a fresh run (``resume=false``) wants ``out_dir`` missing or empty (or holding only the ``config.yaml`` of a
  run that failed before its first step). A used one is refused (two runs in one
  directory mix their metrics, and checkpoint pruning, which keeps the highest steps, would keep the old
  run's checkpoints and delete the new run's), unless ``overwrite=true``, which clears it first. Only a
  directory that holds a run (its ``config.yaml``) is ever cleared: a typo in ``out_dir`` cannot empty a
  directory of other files.
- ``resume=true`` continues the run in ``out_dir`` from its latest complete checkpoint. The config must be
  the run's own, except for the keys of ``RESUME_ALLOWED``, which say how far the run goes, how often it
  logs, evaluates and saves, and where it runs (``out_dir`` itself may differ: a run directory can be
  moved or copied); they cannot change the steps already taken, and each change
  is reported (a warning). The number of steps (``LENGTH_KEYS``) may change only with a constant learning
  rate after the warmup: a linear schedule decays to 0 at the last step, so its length is part of every
  step's learning rate. Any other changed key (``lr``, ``batch_size``, ``seed``, ``model``...) is refused,
  each one named with its old and new value. Without a checkpoint the run starts fresh, and says so.
- on resume, ``metrics.jsonl`` keeps only the records up to the checkpoint's step (the steps after it are
  taken again), and the debris of an interrupted process is removed: half-written temporaries
  (``.*.tmp-*``), checkpoints marked for deletion (``.*.del-*``) and checkpoint directories without
  ``trainer_state.pt`` (which pruning by an older version could leave).

Every process runs the checks (they only read), so all of them raise together; rank 0 alone changes the
directory, and the others wait for it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint, distributed
from .config import config_to_dict
from .errors import UserError

__all__ = ["LENGTH_KEYS", "RESUME_ALLOWED", "clean_out_dir", "prepare_out_dir", "resume_changes",
           "truncate_metrics", "write_dir_atomically"]  # fmt: skip

logger = logging.getLogger("rlhf_fast.train")


def _say(message: str, *args) -> None:
    """A warning from rank 0 only (every process runs the checks)."""
    if distributed.is_main():
        logger.warning(message, *args)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# How long the run goes: allowed to change on resume when the learning rate does not depend on it.
LENGTH_KEYS = frozenset({"max_steps", "epochs", "steps", "rounds"})
# Keys a resumed run may change: none of them changes the steps already taken or the next ones.
# Not compared at all: how the run is started, and where it lives (a run directory may be moved or copied).
_HOW_STARTED = frozenset({"resume", "overwrite", "out_dir"})
RESUME_ALLOWED = LENGTH_KEYS | _HOW_STARTED | frozenset({
    "log_every", "eval_every", "save_every", "keep_checkpoints",  # cadence of logs, evaluations, checkpoints
    "device", "gradient_checkpointing",  # where it runs, and activation memory (the same numbers)
    "extra",  # free-form notes copied to the summary
})  # fmt: skip


def prepare_out_dir(cfg) -> Path:
    """Check ``cfg.out_dir`` against ``cfg.resume`` / ``cfg.overwrite`` (``UserError`` when the run cannot go
    there) and make it ready: cleared (``overwrite``), tidied and its metrics cut back (``resume``). Returns
    the directory; it exists afterwards on rank 0."""
    out = Path(cfg.out_dir)
    resume, overwrite = bool(getattr(cfg, "resume", False)), bool(getattr(cfg, "overwrite", False))
    if resume and overwrite:
        raise UserError("resume=true and overwrite=true contradict each other: resume continues the run in "
                        f"out_dir {str(out)!r}, overwrite deletes it; choose one")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir {str(out)!r} is a file, not a directory")
    _check_can_create(out)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    holds_run = (out / CONFIG_FILE).is_file()
    if not _has_results(out, entries):  # empty, or a run that stopped before its first step: nothing to lose
        entries = []
    ckpt_step = None
    if resume:
        if entries and not holds_run:
            raise UserError(f"resume=true, but out_dir {str(out)!r} holds no run (no {CONFIG_FILE}): it has "
                            f"{_listing(entries)}")  # fmt: skip
        ckpt = checkpoint.latest_checkpoint(out) if entries else None
        if ckpt is None:
            _say("resume=true: no checkpoint in out_dir %r; the run starts fresh from step 0", str(out))
            ckpt_step = 0
        else:
            refused, allowed = resume_changes(_read_yaml(out / CONFIG_FILE), cfg)
            if refused:
                raise UserError(f"resume=true, but the config differs from the run in out_dir {str(out)!r} "
                                f"({CONFIG_FILE}) in what the run does: {'; '.join(refused)}. Resume with the run's "
                                "values, or start a new run (another out_dir, or overwrite=true)")  # fmt: skip
            if allowed:
                _say("resume=true: continuing the run in %r with %s", str(out), "; ".join(allowed))
            ckpt_step = checkpoint.checkpoint_step(ckpt)
            _say("resume=true: continuing from %s (step %d)", ckpt.name, ckpt_step)
    elif entries:
        if not overwrite:
            raise UserError(f"out_dir {str(out)!r} is in use (it has {_listing(entries)}): continue its run with "
                            "resume=true, delete it with overwrite=true, or choose another out_dir")  # fmt: skip
        if not holds_run:
            raise UserError(f"overwrite=true, but out_dir {str(out)!r} holds no run (no {CONFIG_FILE}), so it is not "
                            f"cleared: it has {_listing(entries)}; choose another out_dir")  # fmt: skip
    distributed.barrier()  # every process has read the directory before rank 0 changes it
    if distributed.is_main():
        if overwrite and entries:
            _say("overwrite=true: deleting the run in out_dir %r", str(out))
            for name in entries:
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only file system, no permission...
            raise UserError(f"out_dir {str(out)!r} cannot be created: {e.strerror or e}") from e
        if ckpt_step is not None:
            clean_out_dir(out)
            truncate_metrics(out / METRICS_FILE, ckpt_step)
    distributed.barrier()
    return out


def resume_changes(saved: dict, cfg) -> tuple[list[str], list[str]]:
    """``(refused, allowed)``: the keys in which ``cfg`` differs from the ``saved`` config (a run's
    ``config.yaml``, as a mapping), each as ``"key (old -> new)"``; see ``RESUME_ALLOWED``."""
    old, new = _flat(saved), _flat(_yaml_round_trip(config_to_dict(cfg)))
    constant_lr = new.get("lr_schedule", "constant") == "constant"
    refused, allowed = [], []
    for key in [*old, *(k for k in new if k not in old)]:
        if key in _HOW_STARTED or old.get(key, _MISSING) == new.get(key, _MISSING):
            continue
        change = f"{key} ({_show(old.get(key, _MISSING))} -> {_show(new.get(key, _MISSING))})"
        leaf = key.rsplit(".", 1)[-1]
        if leaf in LENGTH_KEYS and not constant_lr:
            refused.append(change + " [with lr_schedule='linear' the number of steps sets every step's lr]")
        elif leaf in RESUME_ALLOWED:
            allowed.append(change)
        else:
            refused.append(change)
    return refused, allowed


def clean_out_dir(out: str | Path) -> list[Path]:
    """Remove what an interrupted process left in ``out``: temporaries of dead processes (``.*.tmp-<pid>-*``),
    directories marked for deletion (``.*.del-*``) and ``checkpoint-*`` directories without
    ``trainer_state.pt``; a checkpoint caught between the two renames of a replacement is put back first.
    Returns what was removed."""
    out = Path(out)
    if not out.is_dir():
        return []
    checkpoint.latest_checkpoint(out)  # recovers .old-* checkpoints
    removed = []
    for path in sorted(out.iterdir()):
        stale = (path.name.startswith(".") and checkpoint.is_stale_temporary(path)) or (
            path.name.startswith("checkpoint-") and path.is_dir() and not (path / checkpoint.STATE_FILE).is_file())
        if stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.warning("removed leftovers of an interrupted run from %r: %s", str(out),
                       ", ".join(p.name for p in removed))
    return removed


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the records of ``metrics.jsonl`` at ``path`` whose step is at most ``step`` (a torn last line
    goes too), rewriting it atomically; returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += bool(line.strip())
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


def write_dir_atomically(path: str | Path, write) -> Path:
    """Call ``write(tmp)`` on a fresh hidden directory next to ``path``, fsync what it wrote, and rename it
    to ``path`` (replacing an existing one as checkpoints are replaced): a crash leaves the old ``path``
    or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.recover(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):  # of an earlier, killed write
        if checkpoint.is_stale_temporary(stale):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = checkpoint.temporary_for(path)
    tmp.mkdir()
    try:
        write(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                checkpoint.fsync(file)
        checkpoint.fsync(tmp)
        checkpoint.swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------------

_MISSING = object()


def _show(value: Any) -> str:
    return "unset" if value is _MISSING else repr(value)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {}
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "extra":
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _yaml_round_trip(data: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(data, sort_keys=False))


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the run's config {str(path)!r}: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"the run's config {str(path)!r} is not a mapping of keys to values")
    return data


def _has_results(out: Path, entries: list[str]) -> bool:
    """Whether ``out`` holds anything of a run but its ``config.yaml``, an empty ``metrics.jsonl`` and the
    temporaries of dead processes (what a run that failed before its first step leaves)."""
    for name in entries:
        path = out / name
        if name == CONFIG_FILE or (name == METRICS_FILE and path.is_file() and path.stat().st_size == 0):
            continue
        if name.startswith(".") and checkpoint.is_stale_temporary(path):
            continue
        return True
    return False


def _check_can_create(out: Path) -> None:
    """``UserError`` when a missing ``out_dir`` would have to be made inside a regular file (or another
    non-directory): its nearest existing ancestor must be a directory."""
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise UserError(f"out_dir {str(out)!r} cannot be created: {str(parent)!r} is a file, not a "
                                "directory")  # fmt: skip
            return


def _listing(entries: list[str], limit: int = 5) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")
