"""Tiny models and data for the trainer tests: a word-level tokenizer and a small Llama built from a config."""

import json
from pathlib import Path

import torch


def tiny_causal_lm_dir(path: Path, *, hidden_size: int = 32, num_layers: int = 1, num_heads: int = 2,
                       seed: int = 0) -> str:  # fmt: skip
    """Save the demo task's tokenizer and a randomly initialised tiny Llama to ``path``; returns it."""
    from rlhf_fast import task
    from rlhf_fast.train.models import build_causal_lm

    tok = task.build_tokenizer()
    model = build_causal_lm(len(tok), hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                            max_position_embeddings=32, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, seed=seed)  # fmt: skip
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def same_weights(dir_a, dir_b) -> bool:
    """Whether two saved models hold bit-identical tensors."""
    from safetensors.torch import load_file

    a, b = load_file(str(Path(dir_a) / "model.safetensors")), load_file(str(Path(dir_b) / "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
