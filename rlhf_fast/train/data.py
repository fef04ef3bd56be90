"""Data for the trainers, with Hugging Face ``datasets``: loading, format detection, tokenization and
collators.

Formats (a column holding a list of ``{"role", "content"}`` dicts is *conversational* and is rendered
with ``tokenizer.apply_chat_template``; the tokenizer must have a chat template):

============  ===================================================  ====================================
purpose       columns                                               loss / output
============  ===================================================  ====================================
sft           ``prompt`` + ``completion`` (strings or messages)     completion tokens (+ eos)
sft           ``messages``                                          every assistant turn's tokens
sft           ``text``                                              every token (plain language modeling)
preferences   ``prompt`` + ``chosen`` + ``rejected``                chosen / rejected tokens
preferences   ``chosen`` + ``rejected`` as full conversations       their last (assistant) turn
prompts       ``prompt`` (string or messages)                       ``prompt_input_ids``
prompts       ``messages``                                          all turns before the last assistant
============  ===================================================  ====================================

Tokenized rows hold Python lists; ``labels`` are aligned with ``input_ids`` (the Hugging Face
convention): ``labels[t] == input_ids[t]`` where the loss applies and ``-100`` elsewhere, so a trainer
predicts ``labels[:, 1:]`` from ``hidden[:, :-1]``. Plain-text prompts are tokenized with the
tokenizer's special tokens (its BOS), completions without; rendered conversations carry their own.
When a row is longer than ``max_length``, the completion keeps up to ``max_length - min(len(prompt),
max_length // 2)`` tokens from its start and the prompt keeps its end: a long prompt can never push
the whole completion out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .records import FORMATS, _is_conversation, detect_format, load_records, require_columns

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "collate_preferences",
    "collate_prompts",
    "collate_sft",
    "detect_format",
    "load_records",
    "pad_batch",
    "require_columns",
    "tokenize_preferences",
    "tokenize_prompts",
    "tokenize_sft",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------
# rendering and tokenization of one row


def _render(tokenizer, messages: list, *, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("conversational data needs a tokenizer with a chat template "
                         "(tokenizer.chat_template is None); set one, or use prompt/completion strings")
    return tokenizer.apply_chat_template(_plain_messages(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _plain_messages(messages: list) -> list[dict]:
    # Arrow fills absent keys of a list of structs with None; templates test `if m['name']`-like keys
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def _as_conversation(prompt: Any) -> list[dict]:
    return prompt if _is_conversation(prompt) else [{"role": "user", "content": str(prompt)}]


def _prompt_ids(tokenizer, prompt: Any) -> tuple[list[int], str]:
    """Token ids and text of a prompt: a string as it is (with the tokenizer's BOS), a conversation
    rendered up to the assistant's header."""
    if _is_conversation(prompt):
        text = _render(tokenizer, prompt, add_generation_prompt=True)
        return _ids(tokenizer, text, special=False), text
    return _ids(tokenizer, prompt, special=True), prompt


def _append_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None or eos in ids:  # a rendered turn usually ends in it already
        return ids
    return ids + [eos]


def _completion_ids(tokenizer, prompt: Any, completion: Any) -> list[int]:
    """Tokens of the answer to ``prompt``: a string plus eos, or an assistant turn rendered after the
    (conversational) prompt — the text the full conversation adds to the prompt's rendering."""
    if not _is_conversation(completion) and not _is_conversation(prompt):
        return _append_eos(tokenizer, _ids(tokenizer, completion, special=False))
    convo = _as_conversation(prompt)
    turn = completion if _is_conversation(completion) else [{"role": "assistant", "content": str(completion)}]
    before = _render(tokenizer, convo, add_generation_prompt=True)
    full = _render(tokenizer, convo + list(turn), add_generation_prompt=False)
    if not full.startswith(before):
        raise UserError("the chat template does not render the prompt as a prefix of the whole "
                         "conversation, so the completion's tokens cannot be told apart")
    return _append_eos(tokenizer, _ids(tokenizer, full[len(before):], special=False))


def _truncate(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    keep = min(len(completion), max_length - min(len(prompt), max_length // 2))
    completion = completion[:keep]
    room = max_length - keep
    return (prompt[-room:] if room > 0 else []), completion


def _join(prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + list(completion)


def _conversation_pieces(tokenizer, messages: list) -> list[tuple[list[int], bool]]:
    """A conversation as token pieces, each flagged True where it is an assistant turn's text (the
    model's to learn). Pieces come from rendering growing prefixes; a template whose prefixes do not
    render as prefixes (one that drops earlier reasoning, say) falls back to the last assistant turn."""
    texts, prev = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        after = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not before.startswith(prev) or not after.startswith(before):
            texts = None
            break
        texts += [(before[len(prev):], False), (after[len(before):], True)]
        prev = after
    if texts is None:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt_ids, _ = _prompt_ids(tokenizer, messages[:last])
        return [(prompt_ids, False), (_completion_ids(tokenizer, messages[:last], messages[last: last + 1]), True)]
    if not texts:
        raise UserError("a conversation for SFT needs at least one assistant message")
    full = _render(tokenizer, messages, add_generation_prompt=False)
    if full.startswith(prev) and len(full) > len(prev):
        texts.append((full[len(prev):], False))
    pieces = [(_ids(tokenizer, text, special=False), trained) for text, trained in texts]
    last_trained = max(i for i, (_, trained) in enumerate(pieces) if trained)
    pieces[last_trained] = (_append_eos(tokenizer, pieces[last_trained][0]), True)
    return pieces


def _sft_row(tokenizer, row: Mapping, fmt: str, max_length: int) -> dict[str, list[int]]:
    cut = 0
    if fmt == "prompt + completion":
        prompt_ids, _ = _prompt_ids(tokenizer, row["prompt"])
        full_completion = _completion_ids(tokenizer, row["prompt"], row["completion"])
        kept_prompt, completion_ids = _truncate(prompt_ids, full_completion, max_length)
        cut = _cut_flags(prompt_ids, kept_prompt, full_completion, completion_ids)
        input_ids, labels = _join(kept_prompt, completion_ids)
    elif fmt == "text":
        input_ids = _append_eos(tokenizer, _ids(tokenizer, row["text"], special=True))
        cut = 2 * (len(input_ids) > max_length)
        input_ids = input_ids[:max_length]
        labels = list(input_ids)
    else:
        input_ids, labels = [], []
        for ids, trained in _conversation_pieces(tokenizer, row["messages"]):
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        cut = 2 * (len(input_ids) > max_length)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, _CUT_COLUMN: cut}


def _cut_flags(prompt: list, kept_prompt: list, completion: list, kept_completion: list) -> int:
    return (len(kept_prompt) < len(prompt)) | 2 * (len(kept_completion) < len(completion))


def _preference_row(tokenizer, row: Mapping, fmt: str, max_length: int) -> dict[str, list[int]]:
    if fmt == "prompt + chosen + rejected":
        prompt = row["prompt"]
        chosen, rejected = row["chosen"], row["rejected"]
    else:  # the prompt is the conversation both share, the answers their last turns
        chosen_all, rejected_all = row["chosen"], row["rejected"]
        if _plain_messages(chosen_all[:-1]) != _plain_messages(rejected_all[:-1]):
            raise UserError("chosen and rejected conversations must share every turn but the last")
        prompt, chosen, rejected = chosen_all[:-1], chosen_all[-1:], rejected_all[-1:]
    prompt_ids, _ = _prompt_ids(tokenizer, prompt)
    out = {"prompt_input_ids": prompt_ids, _CUT_COLUMN: 0}
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        full = _completion_ids(tokenizer, prompt, answer)
        p, c = _truncate(prompt_ids, full, max_length)
        out[_CUT_COLUMN] |= _cut_flags(prompt_ids, p, full, c)
        out[f"{name}_input_ids"], out[f"{name}_labels"] = _join(p, c)
    return out


def _prompt_row(tokenizer, row: Mapping, fmt: str, max_prompt_length: int) -> dict[str, Any]:
    if fmt == "prompt":
        prompt = row["prompt"]
    else:
        messages = row["messages"]
        cut = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        prompt = messages[:cut]
    ids, text = _prompt_ids(tokenizer, prompt)
    cut = int(len(ids) > max_prompt_length)  # the prompt's start goes
    return {"prompt_input_ids": ids[-max_prompt_length:], "prompt": text, _CUT_COLUMN: cut}


# ---------------------------------------------------------------------------------------------------
# tokenization of a dataset


def _check_length(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 2:
        raise UserError(f"{name} must be an int >= 2, got {value!r}")


def _drop_untrained(ds, label_columns: Sequence[str], purpose: str):
    """Rows whose labels are all ignored (nothing to learn after truncation) are dropped, with a warning."""
    before = len(ds)
    ds = ds.filter(lambda row: all(any(t != IGNORE_INDEX for t in row[c]) for c in label_columns))
    if len(ds) < before:
        logger.warning("%s: dropped %d of %d rows with no trained token after truncation", purpose,
                       before - len(ds), before)
    return ds


def tokenize_sft(ds, tokenizer, max_length: int, *, num_proc: int | None = None, source: str | None = None):
    """``input_ids`` and ``labels`` (``-100`` on prompt tokens, eos appended) for prompt/completion,
    ``messages`` or ``text`` data; other columns are dropped. ``ds`` is a dataset, or a file, directory or hub
    name for ``load_records``; ``source`` names a dataset in errors and in the warning about rows cut to
    ``max_length`` (a name given as ``ds`` is used by itself)."""
    return _tokenize_examples(ds, "sft", _sft_row, tokenizer, max_length, num_proc, source, ["labels"])


def tokenize_preferences(ds, tokenizer, max_length: int, *, num_proc: int | None = None, source: str | None = None):
    """``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels`` (prompt masked
    with ``-100``) and ``prompt_input_ids``; other columns are dropped."""
    return _tokenize_examples(ds, "preferences", _preference_row, tokenizer, max_length, num_proc, source,
                                   ["chosen_labels", "rejected_labels"])  # fmt: skip


def _tokenize_examples(ds, kind, make_row, tokenizer, max_length, num_proc, source, labels):
    """``tokenize_sft`` / ``tokenize_preferences``: each row of ``kind``'s format through ``make_row``, other
    columns dropped, cut rows reported, rows with a ``labels`` column all -100 (nothing to train on) dropped."""
    ds, source = _records(ds, source)
    _check_length("max_length", max_length)
    fmt = detect_format(ds, kind)
    out = ds.map(_per_row(lambda row: make_row(tokenizer, row, fmt, max_length), fmt, kind, source),
                 with_indices=True, remove_columns=ds.column_names, num_proc=num_proc, desc=f"tokenize {kind}")
    out = _report_cuts(out, kind, source, f"max_length={max_length}")
    return _drop_untrained(out, labels, kind)


def tokenize_prompts(ds, tokenizer, max_prompt_length: int, *, num_proc: int | None = None,
                     source: str | None = None):  # fmt: skip
    """``prompt_input_ids`` (the last ``max_prompt_length`` tokens) and ``prompt`` (the text, rendered for
    conversations); every other column is kept (answers for a ``reward_fn``, say)."""
    ds, source = _records(ds, source)
    _check_length("max_prompt_length", max_prompt_length)
    fmt = detect_format(ds, "prompts")
    drop = ["prompt"] if "prompt" in ds.column_names else []
    out = ds.map(_per_row(lambda row: _prompt_row(tokenizer, row, fmt, max_prompt_length), fmt, "prompts", source),
                 with_indices=True, remove_columns=drop, num_proc=num_proc, desc="tokenize prompts")
    return _report_cuts(out, "prompts", source, f"max_prompt_length={max_prompt_length}")


# What each format's columns must hold: "text" a string, "conversation" a list of {role, content} messages.
_COLUMN_KINDS = {
    "prompt + completion": {"prompt": ("text", "conversation"), "completion": ("text", "conversation")},
    "text": {"text": ("text",)},
    "messages": {"messages": ("conversation",)},
    "prompt + chosen + rejected": {c: ("text", "conversation") for c in ("prompt", "chosen", "rejected")},
    "chosen + rejected (conversations)": {"chosen": ("conversation",), "rejected": ("conversation",)},
    "prompt": {"prompt": ("text", "conversation")},  # prompts; their "messages" format is the sft one's
}
_CUT_COLUMN = "__rlhf_fast_cut"  # per row: 1 the prompt's start was cut, 2 the completion's (or text's) end


def _records(ds, source):
    """A dataset and its name for messages: a path or hub name is loaded with ``load_records``."""
    if isinstance(ds, (str, Path)):
        return load_records(ds), str(ds)
    return ds, source


def _per_row(fn, fmt: str, purpose: str, source: str | None):
    """``fn(row)`` for ``ds.map(..., with_indices=True)``, after checking the types of the format's columns;
    a ``UserError`` from either names the data and the row."""
    kinds = _COLUMN_KINDS[fmt]

    def mapped(row, index):
        try:
            for column, allowed in kinds.items():
                value = row[column]
                ok = (("text" in allowed and isinstance(value, str))
                      or ("conversation" in allowed and _is_conversation(value)))
                if not ok:
                    want = " or ".join({"text": "a string", "conversation": "a list of {role, content} messages"}[k]
                                       for k in allowed)  # fmt: skip
                    raise UserError(f"column {column!r} must be {want}, got {type(value).__name__} "
                                    f"{_short(value)}")  # fmt: skip
            return fn(row)
        except UserError as e:
            raise UserError(f"{purpose} data {str(source) + ' ' if source else ''}row {index} (0-based): {e}") from None

    return mapped


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _report_cuts(ds, purpose: str, source: str | None, limit: str):
    """One warning with the number of rows cut to the length limit and which side of them; drops the column."""
    if _CUT_COLUMN not in ds.column_names:
        return ds
    cuts = ds[_CUT_COLUMN]
    ds = ds.remove_columns(_CUT_COLUMN)
    start, end = sum(1 for c in cuts if c & 1), sum(1 for c in cuts if c & 2)
    if start or end:
        sides = []
        if start:
            sides.append(f"{start} lose the start of their prompt (cut on the left; the end, next to the answer, "
                         "is kept)")  # fmt: skip
        if end:
            sides.append(f"{end} lose the end of their completion or text (cut on the right)")
        logger.warning("%s data%s: %d of %d rows are longer than %s tokens and are cut: %s", purpose,
                       f" {str(source)!r}" if source else "", sum(1 for c in cuts if c), len(cuts), limit,
                       "; ".join(sides))  # fmt: skip
    return ds


# ---------------------------------------------------------------------------------------------------
# collators


def pad_batch(
    sequences: Sequence[Sequence[int] | torch.Tensor],
    pad_id: int,
    side: str = "right",
    *,
    pad_to_multiple_of: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, T] long, attention_mask [B, T] long)`` with ``pad_id`` on ``side`` (``"left"`` for
    ``generate``); T is the longest row, rounded up to ``pad_to_multiple_of``."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if len(sequences) == 0:
        raise ValueError("pad_batch needs at least one sequence")
    rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    length = max(len(r) for r in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(length - len(r), length)
        ids[i, span] = r
        mask[i, span] = 1
    return ids, mask


def collate_sft(features: Sequence[Mapping], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of ``tokenize_sft`` → ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on padding),
    right-padded."""
    input_ids, attention_mask = pad_batch([f["input_ids"] for f in features], pad_id)
    labels, _ = pad_batch([f["labels"] for f in features], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_preferences(features: Sequence[Mapping], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of ``tokenize_preferences`` → one right-padded ``[2B, T]`` batch: the B chosen rows, then the B
    rejected rows (the layout of ``rf.linear_dpo_loss``), with ``attention_mask`` and ``labels``."""
    seqs = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
    labs = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
    input_ids, attention_mask = pad_batch(seqs, pad_id)
    labels, _ = pad_batch(labs, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(features: Sequence[Mapping] | Sequence[Sequence[int]], pad_id: int):
    """Rows of ``tokenize_prompts`` → left-padded ``input_ids`` and ``attention_mask`` (ready for
    ``generate``), plus every other column as a list (``prompt`` texts, reference answers...).

    Given bare token sequences (``rows["prompt_input_ids"]``) instead of rows, returns the tuple
    ``(input_ids, attention_mask)``, as ``pad_batch(sequences, pad_id, side="left")``."""
    if len(features) and not isinstance(features[0], Mapping):
        return pad_batch(features, pad_id, side="left")
    input_ids, attention_mask = pad_batch([f["prompt_input_ids"] for f in features], pad_id, side="left")
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    for key in features[0]:
        if key != "prompt_input_ids":
            batch[key] = [f[key] for f in features]
    return batch
