"""Checkpoints: one ``<name>.safetensors`` per module plus ``trainer_state.pt`` (optimizers, schedulers,
the loop's own state, RNG states), written atomically, so that a resumed run is bit-identical to one that
never stopped.

Layout of ``ckpt_dir``::

    policy.safetensors  critic.safetensors  ...   # one per module, tied weights stored once
    trainer_state.pt                              # {"optimizers", "schedulers", "generators", "state", "rng"}

Atomicity: everything is written into a fresh hidden directory next to ``ckpt_dir`` (same file system),
each file fsynced, then renamed into place. A new ``ckpt_dir`` appears in one ``rename``; replacing an
existing one takes two (old aside, new in), and if the process dies between them the next
``save_checkpoint``, ``load_checkpoint`` or ``latest_checkpoint`` puts the old one back. A crash while
writing leaves only a hidden temporary directory, which the next save next to it removes. Pruning renames a
checkpoint to a hidden ``.<name>.del-*`` before deleting it, so that a crash while deleting never leaves a
visible checkpoint without its ``trainer_state.pt``; the next save removes the rest.

Exact resume needs the loop itself to be deterministic given this state: its data order must come from an
RNG saved here (the global torch/NumPy/Python RNGs, or a ``torch.Generator`` passed as ``generators``),
and it must skip the batches of the interrupted epoch that it had already used.
"""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from . import distributed
from .errors import UserError

__all__ = [
    "check_finite_state",
    "checkpoint_path",
    "checkpoint_step",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

STATE_FILE = "trainer_state.pt"
FORMAT_VERSION = 1
_TMP_TAG = ".tmp-"  # hidden siblings: .<name>.tmp-<id> while writing, .<name>.old-<id> while swapping
_OLD_TAG = ".old-"
_DEL_TAG = ".del-"  # .<name>.del-<id>: a checkpoint being pruned, renamed first so that it stops counting
_STEP_RE = re.compile(r"(\d+)$")


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    """``<out_dir>/checkpoint-<step>``, zero-padded so that names sort by step."""
    return Path(out_dir) / f"checkpoint-{step:08d}"


def save_checkpoint(
    ckpt_dir: str | Path,
    *,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    write: bool = True,
) -> Path:
    """Write ``modules`` (safetensors), ``optimizers``/``schedulers`` state dicts, the ``state`` dict
    (step, epoch, kl_coef...: plain Python values and tensors), the states of ``generators`` and of the
    global RNGs (Python, NumPy, torch CPU and CUDA) to ``ckpt_dir``, replacing it atomically.

    FSDP2 modules (and the optimizer of the same name as one) are gathered into whole state dicts first,
    which is a collective: with any, every rank must call this, and only the one with ``write=True``
    (rank 0) writes. The files are the same as an unsharded run's (optimizer state keyed by parameter name)."""
    ckpt_dir = Path(ckpt_dir)
    _check_names(modules, "modules")
    optimizers = dict(optimizers or {})
    gathered = {name: distributed.full_state_dict(m) for name, m in modules.items() if distributed.is_sharded(m)}
    full_optim = {}
    for name in [n for n in optimizers if n in gathered]:
        full_optim[name] = distributed.full_optimizer_state_dict(modules[name], optimizers[name])
    if not write:
        return ckpt_dir
    for name, module in modules.items():  # before anything is written: the latest checkpoint stays a finite one
        check_finite_state(gathered[name] if name in gathered else _unwrap(module).state_dict(),
                           f"module {name!r} to {str(ckpt_dir)!r}")  # fmt: skip
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    recover(ckpt_dir)
    for stale in ckpt_dir.parent.glob(".*"):  # temporaries of dead processes, pruning cut short
        if is_stale_temporary(stale):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = temporary_for(ckpt_dir)
    tmp.mkdir()
    try:
        for name, module in modules.items():
            if name in gathered:
                save_file(_untie(gathered[name]), str(tmp / f"{name}.safetensors"))
            else:
                save_model(_unwrap(module), str(tmp / f"{name}.safetensors"), force_contiguous=True)
        trainer_state = {
            "format_version": FORMAT_VERSION,
            "optimizers": {k: full_optim.get(k) or opt.state_dict() for k, opt in optimizers.items()},
            "optimizer_formats": {k: "by_name" if k in full_optim else "torch" for k in optimizers},
            "schedulers": {k: sch.state_dict() for k, sch in (schedulers or {}).items()},
            "generators": {k: g.get_state() for k, g in (generators or {}).items()},
            "state": _plain(dict(state or {})),
            "rng": _rng_state(),
        }
        torch.save(trainer_state, tmp / STATE_FILE)
        for path in tmp.iterdir():
            fsync(path)
        fsync(tmp)
        swap_in(tmp, ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ckpt_dir


def load_checkpoint(
    ckpt_dir: str | Path,
    *,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> dict[str, Any]:
    """Load what ``save_checkpoint`` wrote into the given (already built) modules, optimizers, schedulers
    and generators, restore the global RNG states (``restore_rng``), and return the ``state`` dict.
    Every name asked for must be in the checkpoint (``ValueError`` otherwise)."""
    ckpt_dir = Path(ckpt_dir)
    recover(ckpt_dir)
    state_file = ckpt_dir / STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"{str(ckpt_dir)!r} is not a checkpoint (no {STATE_FILE})")
    trainer_state = torch.load(state_file, map_location="cpu", weights_only=True)
    for name, module in modules.items():
        path = ckpt_dir / f"{name}.safetensors"
        if not path.is_file():
            present = sorted(p.stem for p in ckpt_dir.glob("*.safetensors"))
            raise ValueError(f"checkpoint {str(ckpt_dir)!r} has no module {name!r}; it has {present}")
        if distributed.is_sharded(module):
            distributed.load_full_state_dict(module, load_file(str(path)), strict=strict)
            continue
        module = _unwrap(module)
        device = next(iter(module.state_dict().values()), torch.empty(0)).device
        load_model(module, str(path), strict=strict, device=str(device))
    formats = trainer_state.get("optimizer_formats", {})
    for kind, objects in (("optimizers", optimizers), ("schedulers", schedulers)):
        for name, obj in (objects or {}).items():
            if name not in trainer_state[kind]:
                raise ValueError(f"checkpoint {str(ckpt_dir)!r} has no {kind[:-1]} {name!r}; "
                                 f"it has {sorted(trainer_state[kind])}")
            saved = trainer_state[kind][name]
            by_name = kind == "optimizers" and formats.get(name) == "by_name"
            if kind == "optimizers" and (by_name or distributed.is_sharded(modules.get(name))):
                if not by_name or name not in modules:
                    raise ValueError(f"optimizer {name!r} of {str(ckpt_dir)!r} was saved without FSDP: resume it "
                                     "with parallel='ddp'")  # fmt: skip
                distributed.load_full_optimizer_state_dict(modules[name], obj, saved)
            else:
                obj.load_state_dict(saved)
    for name, gen in (generators or {}).items():
        if name not in trainer_state["generators"]:
            raise ValueError(f"checkpoint {str(ckpt_dir)!r} has no generator {name!r}; "
                             f"it has {sorted(trainer_state['generators'])}")
        gen.set_state(trainer_state["generators"][name])
    if restore_rng:
        _set_rng_state(trainer_state["rng"])
    return trainer_state["state"]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint directory under ``out_dir`` with the highest trailing step number in its name
    (``checkpoint-00000120``), ties and unnumbered ones by modification time; None when there is none."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    for old in out_dir.glob(f".*{_OLD_TAG}*"):
        recover(out_dir / old.name[1:].split(_OLD_TAG)[0])
    found = [p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / STATE_FILE).is_file()]
    if not found:
        return None

    def order(p: Path):
        m = _STEP_RE.search(p.name)
        return (int(m.group(1)) if m else -1, (p / STATE_FILE).stat().st_mtime)

    return max(found, key=order)


def resume_state(out_dir: str | Path, resume: bool, *, modules, optimizers, schedulers) -> dict | None:
    """With ``resume``, load ``out_dir``'s latest checkpoint (if there is one) into ``modules``, ``optimizers``
    and ``schedulers`` and return its state (``{"step": ...}`` plus what the loop saved with ``maybe_save``);
    ``None`` for a fresh run. Every trainer resumes through this."""
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is None:
        return None
    return load_checkpoint(ckpt, modules=modules, optimizers=optimizers, schedulers=schedulers)


def maybe_save(out_dir, step: int, every: int, keep: int, *, modules, optimizers, schedulers,
               state: dict | None = None) -> None:  # fmt: skip
    """A checkpoint every ``every`` steps (every rank gathers what FSDP shards, rank 0 writes, all wait), its
    state ``{"step": step}`` plus the loop's own ``state`` (PPO's KL coefficient, a running summary...)."""
    if not every or step % every:
        return
    save_checkpoint(checkpoint_path(Path(out_dir), step), modules=modules, optimizers=optimizers,
                    schedulers=schedulers, state={"step": step, **(state or {})},
                    write=distributed.is_main())  # fmt: skip
    if distributed.is_main():
        prune_checkpoints(out_dir, keep, current=step)
    distributed.barrier()


def prune_checkpoints(out_dir: str | Path, keep: int, *, current: int | None = None) -> list[Path]:
    """Delete all but the ``keep`` most recent ``checkpoint-<step>`` directories; returns those deleted.

    With ``current`` (the step of the checkpoint just written) the ones of later steps go first whatever
    ``keep`` says: they belong to a timeline the run has left, and must not outlive its new checkpoints.
    Each is renamed to a hidden ``.<name>.del-*`` before it is deleted, so a process killed while deleting
    leaves no half-deleted checkpoint that still counts, only a hidden folder the next save removes."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    out_dir = Path(out_dir)
    numbered = sorted(
        (int(m.group(1)), p)
        for p in out_dir.glob("checkpoint-*")
        if p.is_dir() and (m := _STEP_RE.search(p.name)) and (p / STATE_FILE).is_file()
    )
    later = [p for step, p in numbered if current is not None and step > current]
    kept = [p for step, p in numbered if current is None or step <= current]
    doomed = later + kept[:-keep]
    for p in doomed:
        marked = p.parent / f".{p.name}{_DEL_TAG}{uuid.uuid4().hex[:8]}"
        os.rename(p, marked)
        shutil.rmtree(marked)
    if doomed:
        fsync(out_dir)
    return doomed


def check_finite_state(state: Mapping[str, torch.Tensor], what: str) -> None:
    """``UserError`` (``"refusing to save <what>: ..."``) when a floating tensor of the state dict ``state``
    holds a NaN or an infinity: a model that cannot be used is never written over a good one."""
    bad = [k for k, t in state.items() if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"refusing to save {what}: {len(bad)} of its {len(state)} tensors hold NaN or inf (first: "
                        f"{bad[0]!r}). The training diverged (try a lower lr or max_grad_norm, and check the data "
                        "and rewards); nothing was written")  # fmt: skip


def checkpoint_step(ckpt_dir: str | Path) -> int:
    """The step in a checkpoint directory's name (``checkpoint-00000120``: 120)."""
    m = _STEP_RE.search(Path(ckpt_dir).name)
    if m is None:
        raise ValueError(f"{str(ckpt_dir)!r} is not named checkpoint-<step>")
    return int(m.group(1))


def temporary_for(path: Path) -> Path:
    """A fresh hidden sibling of ``path`` to write into before renaming: ``.<name>.tmp-<pid>-<id>``."""
    return path.parent / f".{path.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_stale_temporary(path: Path) -> bool:
    """Whether ``path`` is a hidden temporary (``.*.tmp-<pid>-*``) whose writer is dead, or a directory
    marked for deletion (``.*.del-*``)."""
    name = path.name
    if not name.startswith("."):
        return False
    if _DEL_TAG in name:
        return True
    if _TMP_TAG not in name:
        return False
    pid = name.rsplit(_TMP_TAG, 1)[1].split("-")[0]
    return not (pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)))


# ---------------------------------------------------------------------------------------------------


def _check_names(named: Mapping[str, Any], what: str) -> None:
    for name in named:
        if not name or "/" in name or name.startswith(".") or name == Path(STATE_FILE).stem:
            raise ValueError(f"{what} name {name!r} cannot be used as a file name in a checkpoint")


def _untie(state: dict) -> dict:
    """A state dict safetensors can write: tensors that share memory (tied weights) become copies."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        out[name] = tensor.clone() if key in seen else tensor.contiguous()
        seen.add(key)
    return out


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel, whose state_dict has no 'module.' prefix."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # NumPy's state as plain values and a tensor, so that torch.load(weights_only=True) reads it
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(rng: Mapping[str, Any]) -> None:
    random.setstate(rng["python"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        if len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        else:  # a different number of GPUs: seed what we can, in order
            for i, s in enumerate(rng["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays to Python numbers and tensors (all that ``weights_only`` loading reads)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def swap_in(tmp: Path, ckpt_dir: Path) -> None:
    """Move the finished ``tmp`` to ``ckpt_dir``: one rename for a new directory; for an existing one,
    old aside, new in, old removed (``recover`` undoes a crash between the first two steps)."""
    if not ckpt_dir.exists():
        os.rename(tmp, ckpt_dir)
    else:
        old = ckpt_dir.parent / f".{ckpt_dir.name}{_OLD_TAG}{uuid.uuid4().hex[:8]}"
        os.rename(ckpt_dir, old)
        try:
            os.rename(tmp, ckpt_dir)
        except BaseException:
            os.rename(old, ckpt_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync(ckpt_dir.parent)


def recover(ckpt_dir: Path) -> None:
    """After a crash between the two renames of ``swap_in``: ``ckpt_dir`` is missing and its previous
    version waits under ``.<name>.old-*``; put it back. Leftover ``.old-*`` beside a present
    ``ckpt_dir`` (a crash after the second rename) are removed."""
    olds = sorted(ckpt_dir.parent.glob(f".{glob.escape(ckpt_dir.name)}{_OLD_TAG}*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return
    if not ckpt_dir.exists():
        os.rename(olds.pop(), ckpt_dir)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
