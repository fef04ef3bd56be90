"""benchmarks/demo_cross_eval.py's teacher-forced measure of where the right tokens sit, on a tiny random
policy against a float64 recomputation from its logits: without truncation the truncated numbers are the
full ones; with top_k=1 a right token is kept exactly where it is the argmax, with probability 1."""

import pytest
import torch

from benchmarks.demo_cross_eval import teacher_forced
from rlhf_fast.demo import task
from rlhf_fast.train.data import tokenize_prompts
from rlhf_fast.train.models import load_causal_lm, load_tokenizer
from train_utils import tiny_causal_lm_dir, write_jsonl

OFF = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cross_eval")
    path = tiny_causal_lm_dir(tmp / "model", seed=3)
    tok = load_tokenizer(path, padding_side="left")
    prompts = tokenize_prompts(write_jsonl(tmp / "p.jsonl", [{"prompt": p} for p in task.sample_prompts(12, seed=1)]),
                               tok, 64)  # fmt: skip
    return load_causal_lm(path, dtype="fp32", device="cpu").eval(), tok, prompts


def _reference(policy, tok, prompts, temperature):
    """float64 probabilities of the right tokens and whether each is its row's argmax."""
    probs, top = [], []
    for row in prompts:
        answer = tok(task.target(row["prompt"]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = policy(torch.tensor([list(row["prompt_input_ids"]) + answer])).logits[0, -len(answer) - 1 : -1]
        p = torch.softmax(logits.double() / temperature, -1)
        right = torch.tensor(answer)
        probs.append(p[torch.arange(len(answer)), right])
        top.append(p.argmax(-1) == right)
    return torch.cat(probs), torch.cat(top)


def test_teacher_forced_without_truncation_is_the_full_softmax(setup):
    policy, tok, prompts = setup
    got = teacher_forced(policy, tok, prompts.select(range(8)), OFF | dict(temperature=0.8))
    probs, _ = _reference(policy, tok, prompts.select(range(8)), 0.8)
    assert got["tokens"] == probs.numel()
    assert got["right_kept_frac"] == 1.0
    assert got["p_right_full"] == pytest.approx(float(probs.mean()), rel=1e-5)
    assert got["p_right_truncated"] == pytest.approx(got["p_right_full"], rel=1e-6)


def test_teacher_forced_with_top_k_1_keeps_only_argmax_right_tokens(setup):
    policy, tok, prompts = setup
    got = teacher_forced(policy, tok, prompts, OFF | dict(top_k=1))
    probs, top = _reference(policy, tok, prompts, 1.0)
    assert 0 < top.double().mean() < 1  # some right tokens are the argmax, some are not
    assert got["right_kept_frac"] == pytest.approx(float(top.double().mean()), abs=1e-12)
    assert got["p_right_truncated"] == pytest.approx(float(top.double().mean()), abs=1e-6)  # kept: probability 1
    assert got["p_right_full"] == pytest.approx(float(probs.mean()), rel=1e-5)
