"""Data (rlhf_fast.train.data, rlhf_fast.train.records): loading files, the formats, tokenization, truncation, collators."""

import json

import pytest
import torch
from torch import nn

from rlhf_fast.train.data import (
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
from rlhf_fast.train.models import build_char_tokenizer, lm_hidden_states
from train_utils import CHARS, _lm, tokenizer


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
