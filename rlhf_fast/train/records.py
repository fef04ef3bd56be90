"""Loading a dataset for the trainers (a local file, a saved dataset or a hub name) and telling which of the
formats of rlhf_fast/train/data.py it is in, with a ``UserError`` that says what is wrong."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import UserError

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# The formats each purpose accepts, as they are named in error messages.
FORMATS = {
    "sft": ["prompt + completion", "messages", "text"],
    "preferences": ["prompt + chosen + rejected", "chosen + rejected (conversations)"],
    "prompts": ["prompt", "messages"],
}


def load_records(source: str | Path, split: str = "train"):
    """A ``datasets.Dataset`` from a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a directory of
    such files (``train*``/``test*`` file names make splits, as in ``datasets``), or a hub dataset name
    (needs the network). ``ValueError`` when it is neither a path that exists nor loadable."""
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"{str(source)!r}: unsupported file type {path.suffix!r}; use one of {sorted(_BUILDERS)}")
        try:
            ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split=split)
        except ValueError as e:
            if "split" not in str(e).lower():
                found = _read_error(path, e)
                if found is None:
                    raise
                raise found from e
            raise UserError(f"cannot read split {split!r} of {str(source)!r} (a single file is split 'train', "
                            f"slices like 'train[:90%]' work): {e}") from e
        except Exception as e:  # datasets' own errors (DatasetGenerationError, StopIteration on an empty file...)
            found = _read_error(path, e)
            if found is None:
                raise
            raise found from e
        return _not_empty(ds, source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _BUILDERS and p.is_file())
        if not files:
            raise UserError(f"directory {str(source)!r} holds no {'/'.join(sorted(_BUILDERS))} files")
        builders = {_BUILDERS[p.suffix.lower()] for p in files}
        if len(builders) > 1:
            raise UserError(f"directory {str(source)!r} mixes file types ({sorted(builders)}); keep one")
        try:
            ds = datasets.load_dataset(builders.pop(), data_dir=str(path), split=split)
        except Exception as e:
            for file in files:
                found = _diagnose(file)
                if found:
                    raise UserError(found) from e
            raise
        return _not_empty(ds, source)
    if _looks_like_path(str(source)):
        raise UserError(f"data source {str(source)!r} does not exist (no such file or directory)")
    try:
        return datasets.load_dataset(str(source), split=split)
    except Exception as e:  # offline, unknown name, gated...: one clear error
        raise UserError(f"data source {str(source)!r} is not a local file or directory, and loading it as a "
                         f"hub dataset failed: {type(e).__name__}: {e}") from e


def _diagnose(path: Path) -> str | None:
    """What is wrong with a data file that ``datasets`` could not read, when it can be told: empty, or
    (JSON Lines) the first line that is not a JSON object; None otherwise."""
    try:
        if path.stat().st_size == 0 or not path.read_bytes().strip():
            return f"data file {str(path)!r} is empty"
        if _BUILDERS.get(path.suffix.lower()) != "json" or path.suffix.lower() == ".json":
            return None
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"data file {str(path)!r}, line {number}: not valid JSON ({e.msg} at column {e.colno})"
                if not isinstance(row, dict):
                    return (f"data file {str(path)!r}, line {number}: a row must be a JSON object, got "
                            f"{line.strip()[:60]!r}")
    except UnicodeDecodeError as e:
        return f"data file {str(path)!r} is not UTF-8 text: {e}"
    except OSError as e:
        return f"cannot read data file {str(path)!r}: {e}"
    return None


def _read_error(path: Path, error: Exception) -> UserError | None:
    """A ``UserError`` naming the file (and line) that ``datasets`` failed to read: from ``_diagnose``, or
    the innermost cause of an error that is about the file's content (a parse or schema error of
    ``datasets`` or Arrow, ``StopIteration`` from an empty file). None for anything else: a bug keeps its
    traceback."""
    found = _diagnose(path)
    if found:
        return UserError(found)
    import datasets
    import pyarrow

    chain, cause = [error], error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
        chain.append(cause)
    content_errors = (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException, StopIteration)
    if not any(isinstance(e, content_errors) for e in chain):
        return None
    detail = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return UserError(f"cannot read data file {str(path)!r}: {detail}")


def _not_empty(ds, source) -> Any:
    if len(ds) == 0:
        raise UserError(f"data {str(source)!r} holds no rows")
    return ds


def _looks_like_path(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or "\\" in source or Path(source).suffix.lower() in _BUILDERS
            or source.count("/") > 1)


def _is_conversation(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value))


def detect_format(ds, purpose: str) -> str:
    """The format of ``ds`` for ``purpose`` (``"sft"``, ``"preferences"``, ``"prompts"``): one of
    ``FORMATS[purpose]``; ``ValueError`` listing missing and present columns when none fits."""
    if purpose not in FORMATS:
        raise ValueError(f"purpose must be one of {sorted(FORMATS)}, got {purpose!r}")
    cols = set(ds.column_names)
    if purpose == "sft":
        if {"prompt", "completion"} <= cols:
            return "prompt + completion"
        if "messages" in cols:
            return "messages"
        if "text" in cols:
            return "text"
        require_columns(ds, ["prompt", "completion"], purpose)
    if purpose == "preferences":
        if {"prompt", "chosen", "rejected"} <= cols:
            return "prompt + chosen + rejected"
        if {"chosen", "rejected"} <= cols and len(ds) and _is_conversation(ds[0]["chosen"]):
            return "chosen + rejected (conversations)"
        require_columns(ds, ["prompt", "chosen", "rejected"], purpose)
    if purpose == "prompts":
        if "prompt" in cols:
            return "prompt"
        if "messages" in cols:
            return "messages"
        require_columns(ds, ["prompt"], purpose)
    raise AssertionError("unreachable")


def require_columns(ds, columns: Sequence[str], purpose: str) -> None:
    """``ValueError`` naming the missing columns, the present ones and the formats ``purpose`` accepts."""
    present = list(ds.column_names)
    missing = [c for c in columns if c not in present]
    if missing:
        accepted = "; ".join(FORMATS.get(purpose, [])) or ", ".join(columns)
        raise UserError(f"data for {purpose} is missing column(s) {missing}; it has {present}. "
                         f"Accepted formats: {accepted}")
