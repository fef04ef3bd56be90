"""The demo's synthetic task: oracle, demonstrator, Bradley-Terry labels, datasets, tokenizer."""

import json
import math

import numpy as np
import pytest

from rlhf_fast.demo import task


# ----------------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, completion, score",
    [
        ("q c k z >", "q c k z", 1.0),
        ("q c k z >", "r c k z", 0.75),  # a near miss in the first letter
        ("q c k z >", "r d l a", 0.0),  # all near misses, z wraps to a
        ("q c k z >", "c k z", 0.0),  # shifted by a position: nothing matches
        ("q c k z >", "q c", 0.5),  # too short: the missing letters are wrong
        ("q c k z >", "q c k z z z", 4 / 6),  # too long: the extra letters are wrong
        ("q c k z >", "", 0.0),
        ("q c k z >", "q c k z </s>", 1.0),  # </s> ends the completion ...
        ("q c k z >", "q c </s> k z", 0.5),  # ... and what follows it is not read
        ("q c k z >", "<pad> q c k <pad> z", 1.0),  # padding is ignored
        ("q c k z >", "q > k z", 0.75),  # a non-letter token is a wrong letter
        ("a b c d e f >", "a b c d e f", 1.0),
        ("a b c d e f >", "a x c y e z", 0.5),
        ("<s> <|user|> q c k z <|assistant|>", "q c k z", 1.0),  # a chat rendering scores the same
    ],
)
def test_oracle_hand_made_cases(prompt, completion, score):
    assert task.oracle_score(prompt, completion) == pytest.approx(score)


def test_oracle_batch_and_reward_fn():
    prompts = ["q c k z >", "a b c d e >"]
    completions = ["q c k z", "b b c d x"]
    assert task.oracle_scores(prompts, completions) == [1.0, 0.6]
    assert task.reward_fn(prompts, completions) == [1.0, 0.6]
    assert task.target(prompts[1]) == "a b c d e"
    with pytest.raises(ValueError, match="differ in length"):
        task.oracle_scores(prompts, completions[:1])


def test_oracle_is_graded_in_unit_interval():
    rng = np.random.default_rng(0)
    prompts = task.sample_prompts(500, seed=1)
    scores = [task.oracle_score(p, task.demonstration(p, rng)) for p in prompts]
    assert min(scores) >= 0.0 and max(scores) <= 1.0
    assert len(set(scores)) > 5  # fractions, not just 0/1


# ----------------------------------------------------------------------------------------------------
# Prompts, demonstrator, labeler
# ----------------------------------------------------------------------------------------------------


def test_sample_prompts_shape_and_determinism():
    prompts = task.sample_prompts(300, seed=3)
    assert prompts == task.sample_prompts(300, seed=3)
    assert prompts != task.sample_prompts(300, seed=4)
    assert len(set(prompts)) == 300
    for p in prompts:
        words = p.split()
        assert words[-1] == task.SEP
        letters = words[:-1]
        assert task.MIN_LEN <= len(letters) <= task.MAX_LEN
        assert len(set(letters)) == len(letters) and set(letters) <= set(task.LETTERS)


def test_demonstrator_mean_score_in_documented_range():
    rng = np.random.default_rng(0)
    prompts = task.sample_prompts(4000, seed=5)
    demos = [task.demonstration(p, rng) for p in prompts]
    scores = np.array(task.oracle_scores(prompts, demos))
    # the documented mean, within 5 standard errors (std ~0.22 -> 5 SE ~0.018)
    assert abs(scores.mean() - task.DEMONSTRATOR_MEAN) < 5 * scores.std() / math.sqrt(len(scores))
    assert 0.38 < scores.mean() < 0.43
    # the near miss (next letter) is the demonstrator's most frequent letter, not the right one
    near = right = total = 0
    for p, d in zip(prompts, demos):
        for want, got in zip(task.target_letters(p), d.split()):
            right += got == want
            near += got == task.LETTERS[(task.LETTERS.index(want) + 1) % 26]
            total += 1
    assert near / total == pytest.approx(task.P_NEAR_MISS + task.P_RANDOM / 26, abs=0.015)
    assert right / total == pytest.approx(task.DEMONSTRATOR_MEAN, abs=0.015)
    assert all(len(d.split()) == len(task.target_letters(p)) for p, d in zip(prompts, demos))


def test_bradley_terry_labels_agree_with_oracle_at_the_expected_rate():
    """The number of labels that follow the oracle is the sum of the pairs' BT probabilities (z < 4)."""
    rng = np.random.default_rng(0)
    pairs = [task.preference_pair(p, rng) for p in task.sample_prompts(6000, seed=6)]
    strict = [r for r in pairs if r["chosen_score"] != r["rejected_score"]]
    agree = sum(r["chosen_score"] > r["rejected_score"] for r in strict)
    p = np.array([1 / (1 + math.exp(-abs(r["chosen_score"] - r["rejected_score"]) / task.TAU)) for r in strict])
    z = (agree - p.sum()) / math.sqrt((p * (1 - p)).sum())
    assert abs(z) < 4, z
    # and the documented marginal rate, within 4 binomial standard errors
    rate, se = agree / len(strict), math.sqrt(task.BT_AGREEMENT * (1 - task.BT_AGREEMENT) / len(strict))
    assert abs(rate - task.BT_AGREEMENT) < 4 * se
    # the stored scores are the oracle's
    for r in pairs[:200]:
        assert r["chosen_score"] == task.oracle_score(r["prompt"], r["chosen"])
        assert r["rejected_score"] == task.oracle_score(r["prompt"], r["rejected"])


def test_some_preference_candidates_have_the_wrong_length():
    """P_LENGTH_ERROR of the candidates are 1-2 letters short or long (the reward model must see length
    errors to penalise a policy that stops late); the shorter and longer ones lose."""
    rng = np.random.default_rng(0)
    pairs = [task.preference_pair(p, rng) for p in task.sample_prompts(3000, seed=9)]
    diffs = [len(r[k].split()) - len(task.target_letters(r["prompt"])) for r in pairs for k in ("chosen", "rejected")]
    wrong = np.mean([d != 0 for d in diffs])
    se = math.sqrt(task.P_LENGTH_ERROR * (1 - task.P_LENGTH_ERROR) / len(diffs))
    assert abs(wrong - task.P_LENGTH_ERROR) < 4 * se
    assert set(diffs) == {-2, -1, 0, 1, 2}
    # a wrong length costs: such candidates are chosen less often than 1 in 5 (measured 0.169 over 10^5 pairs;
    # the bound is 3 standard errors of a 3000-pair fraction above that)
    chosen_wrong = np.mean([len(r["chosen"].split()) != len(task.target_letters(r["prompt"])) for r in pairs])
    assert chosen_wrong < task.P_LENGTH_ERROR - 0.01


# ----------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------

SIZES = dict(n_sft=300, n_pref=200, n_prompts=100, n_eval=256, n_pref_eval=64)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_write_datasets_deterministic(tmp_path):
    a = task.write_datasets(tmp_path / "a", seed=7, **SIZES)
    b = task.write_datasets(tmp_path / "b", seed=7, **SIZES)
    c = task.write_datasets(tmp_path / "c", seed=8, **SIZES)
    assert set(a) == {"sft", "preferences", "prompts", "eval_prompts", "eval_preferences"}
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
        assert a[name].read_bytes() != c[name].read_bytes(), name


def test_write_datasets_columns_sizes_and_disjoint_eval(tmp_path):
    paths = task.write_datasets(tmp_path, seed=0, **SIZES)
    rows = {name: _read(path) for name, path in paths.items()}
    assert [len(rows[n]) for n in ("sft", "preferences", "prompts", "eval_prompts", "eval_preferences")] == [
        300, 200, 100, 256, 64
    ]
    assert set(rows["sft"][0]) == {"prompt", "completion"}
    assert set(rows["preferences"][0]) == {"prompt", "chosen", "rejected"}
    assert set(rows["prompts"][0]) == {"prompt"}
    assert set(rows["eval_preferences"][0]) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}

    train = [r["prompt"] for n in ("sft", "preferences", "prompts") for r in rows[n]]
    held_out = [r["prompt"] for r in rows["eval_prompts"]]
    assert len(set(train)) == len(train)
    assert len(set(held_out)) == len(held_out) >= 256
    assert not set(train) & set(held_out)
    assert {r["prompt"] for r in rows["eval_preferences"]} <= set(held_out)


def test_write_datasets_rejects_empty_eval(tmp_path):
    with pytest.raises(ValueError, match="n_eval"):
        task.write_datasets(tmp_path, n_sft=1, n_pref=1, n_prompts=1, n_eval=0, seed=0)


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    return task.build_tokenizer()


def test_tokenizer_round_trip(tokenizer):
    prompt, completion = "q c k z >", "q c k z"
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 6  # <s> + 4 letters + >
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(c_ids + [tokenizer.eos_token_id]) == completion + " </s>"
    assert tokenizer.unk_token_id not in ids + c_ids
    assert len(tokenizer) == len(task.VOCAB)
    assert tokenizer.convert_ids_to_tokens(tokenizer("b > a")["input_ids"]) == ["<s>", "b", ">", "a"]
    assert {tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token} == {task.PAD, task.BOS, task.EOS}
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3


def test_tokenizer_left_pads_a_batch(tokenizer):
    enc = tokenizer(["a b c d >", "a b c d e f >"], padding=True)
    assert enc["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2
    assert enc["attention_mask"][0] == [0, 0, 1, 1, 1, 1, 1, 1]


def test_tokenizer_chat_template(tokenizer):
    messages = [{"role": "user", "content": "q c k z"}, {"role": "assistant", "content": "q c k z"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.split() == ["<s>", "<|user|>", "q", "c", "k", "z", "<|assistant|>", "q", "c", "k", "z", "</s>"]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.split()[-1] == "<|assistant|>" and text.startswith(prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and ids.count(tokenizer.bos_token_id) == 1
    system = [{"role": "system", "content": "a"}] + messages
    assert tokenizer.apply_chat_template(system, tokenize=False).split()[1:3] == ["<|system|>", "a"]
    assert task.oracle_score(prompt, "q c k z") == 1.0


def test_tokenizer_save_load_offline(tokenizer, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    texts = ["q c k z >", "a b c d e f > a b c", "<s> <|user|> x y <|assistant|> x y </s>"]
    for t in texts:
        assert loaded(t)["input_ids"] == tokenizer(t)["input_ids"]
        assert loaded.decode(loaded(t)["input_ids"]) == tokenizer.decode(tokenizer(t)["input_ids"])
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    assert loaded.padding_side == "left"
    messages = [{"role": "user", "content": "q c"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


def test_demo_defaults_are_consistent():
    d = task.DemoDefaults()
    assert d.n_sft >= d.sft_steps * d.sft_batch_size  # one pass, no repeats (see DemoDefaults)
    assert d.n_pref >= d.rm_steps * d.rm_batch_size
    assert d.n_eval >= 256
    assert d.max_new_tokens == task.MAX_LEN + 1
    assert d.hidden_size % d.num_attention_heads == 0
