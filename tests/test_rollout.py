"""Rollouts (rlhf_fast.train.rollout): a row's response depends on its seed and prompt alone, not on the rest of
the batch nor on the checkpoint's generation config (the draws themselves: tests/test_sampling.py)."""

import pytest
from conftest import IMPLS

from rlhf_fast.train.data import collate_prompts
from rlhf_fast.train.models import build_causal_lm, build_char_tokenizer
from rlhf_fast.train.rollout import generate, row_seeds


@pytest.fixture
def tokenizer():
    return build_char_tokenizer("abcdefghijklmnopqrstuvwxyz ")


@pytest.mark.parametrize("impl", IMPLS)
def test_a_rows_response_ignores_the_rest_of_the_batch(tokenizer, impl):
    """The same seed and prompt give the same response alone, in a batch, and under more left padding."""
    tokenizer.padding_side = "left"
    model = build_causal_lm(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, seed=1)  # fmt: skip
    texts = ["ab", "a much longer prompt", "cab", "b"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    seeds = row_seeds(0, 0, range(4))
    batch_ids, batch_mask = collate_prompts(ids, tokenizer.pad_token_id)
    together = generate(model, tokenizer, batch_ids, batch_mask, texts, max_new_tokens=6, temperature=1.3, seeds=seeds,
                        impl=impl)  # fmt: skip
    for i in (0, 2, 3):
        alone_ids, alone_mask = collate_prompts([ids[i]], tokenizer.pad_token_id)
        alone = generate(model, tokenizer, alone_ids, alone_mask, [texts[i]], max_new_tokens=6, temperature=1.3,
                         seeds=seeds[i : i + 1], impl=impl)  # fmt: skip
        assert alone.completions[0] == together.completions[i]
    other = generate(model, tokenizer, batch_ids, batch_mask, texts, max_new_tokens=6, temperature=1.3,
                     seeds=row_seeds(0, 1, range(4)), impl=impl)  # fmt: skip
    assert other.completions != together.completions  # and the seeds do matter
    with pytest.raises(ValueError, match="seeds"):
        generate(model, tokenizer, batch_ids, batch_mask, texts, max_new_tokens=2, seeds=seeds[:2])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tokenizer, batch_ids, batch_mask, texts, max_new_tokens=2, temperature=0.0)


def test_checkpoint_generation_config_does_not_change_the_distribution(tokenizer):
    """A repetition penalty in the model's generation_config (Qwen's chat models ship one) must not reshape the
    sampled distribution: the trainer's log-probs are those of softmax(logits / T)."""
    tokenizer.padding_side = "left"
    model = build_causal_lm(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, seed=2)  # fmt: skip
    ids, mask = collate_prompts([tokenizer("abc")["input_ids"]] * 3, tokenizer.pad_token_id)
    seeds = row_seeds(1, 0, range(3))
    plain = generate(model, tokenizer, ids, mask, ["abc"] * 3, max_new_tokens=8, seeds=seeds)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.top_k = 1
    assert generate(model, tokenizer, ids, mask, ["abc"] * 3, max_new_tokens=8, seeds=seeds).completions == plain.completions
