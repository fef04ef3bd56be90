"""Tiny models and data for the trainer tests: a word-level tokenizer and a small Llama built from a config;
a character tokenizer fixture and a tiny LM for the model and data tests."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest
import torch

from rlhf_fast.train.models import build_causal_lm, build_char_tokenizer


def tiny_causal_lm_dir(path: Path, *, hidden_size: int = 32, num_layers: int = 1, num_heads: int = 2,
                       seed: int = 0) -> str:  # fmt: skip
    """Save the demo task's tokenizer and a randomly initialised tiny Llama to ``path``; returns it."""
    from rlhf_fast.demo import task
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


def same_weights(dir_a, dir_b, *, file: str = "model.safetensors") -> bool:
    """Whether two saved models hold bit-identical tensors."""
    return close_weights(dir_a, dir_b, atol=0.0, file=file)


def close_weights(dir_a, dir_b, *, atol: float, file: str = "model.safetensors") -> bool:
    """Whether two saved models (or two checkpoints' ``file``) hold the same tensor names, each pair within
    ``atol`` (``0``: bit-identical)."""
    from safetensors.torch import load_file

    a, b = load_file(str(Path(dir_a) / file)), load_file(str(Path(dir_b) / file))
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=0.0, atol=atol) for k in a
    )


def torchrun(script: str, cfg, nproc: int, tmp_path: Path, *args: str) -> None:
    """Run the Python ``script`` (it reads ``cfg``'s fields as JSON from ``sys.argv[1]``, then ``args``) under torchrun with
    ``nproc`` gloo processes of one thread each, without the Triton interpreter or progress bars; a failure
    raises with the processes' output."""
    import os
    import socket
    import subprocess
    import sys
    import textwrap

    path = tmp_path / f"torchrun_{nproc}.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "RLHF_FAST_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
           str(path), json.dumps(cfg.__dict__, default=str), *args]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise AssertionError(f"torchrun with {nproc} processes failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")


# bf16 autocast against float32 on the same steps: bf16 keeps 8 significant bits (a relative rounding of
# 2^-9), and the differences grow over a network's layers and one optimizer step. Measured on the trainer
# tests' tiny models over two steps: 1e-5 to 8e-3 relative on losses and gradient norms.
BF16_RTOL, BF16_ATOL = 2e-2, 2e-3


def assert_bf16_close(got: list[dict], want: list[dict], keys) -> None:
    """The records of two runs (``read_metrics``) log the same steps, and each of ``keys`` agrees within
    bf16 tolerance (``BF16_RTOL``, ``BF16_ATOL``)."""
    import pytest

    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for key in keys:
            assert g[key] == pytest.approx(w[key], rel=BF16_RTOL, abs=BF16_ATOL), (g["step"], key, g[key], w[key])


@dataclass
class PPOSection:
    kl_coef: float = 0.1
    target_kl: Optional[float] = None
    estimator: Literal["k1", "k3"] = "k1"


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
