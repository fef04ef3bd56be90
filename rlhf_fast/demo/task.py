"""The built-in synthetic task of ``rlhf-fast demo``: repeat a word, graded by a programmatic oracle.

The task
    A prompt is 4 to 6 distinct letters followed by the separator ``>``, e.g. ``"q c k z >"``; the right
    completion repeats the letters, ``"q c k z"``. Symbols are whitespace-separated words, so the
    tokenizer is a word-level one with one token per letter (``VOCAB``: 34 tokens). A prompt is at most
    8 tokens with ``<s>`` and ``>``, a completion at most 7 with ``</s>``, so a rollout is a handful of
    forward passes. (Reversing the word instead was tried: a 2-layer model learns it about half as fast
    and its reward model reached 0.64 accuracy where this task's reaches 0.71; see ``DemoDefaults``.)

The oracle (playing the human labeler)
    ``oracle_score(prompt, completion)`` is the fraction of positions that are right: the number of
    positions ``i`` where the completion's ``i``-th letter equals the prompt's ``i``-th letter, divided
    by the longer of the two lengths (a completion too short or too long loses the missing or extra
    positions). It lies in ``[0, 1]`` in steps of ``1/len``; 1 means exactly the prompt's word.
    ``<pad>`` and ``<s>`` in a completion are ignored and ``</s>`` ends it. A prompt's letters are the
    letter tokens in it, so a chat rendering of the same prompt scores the same.

The demonstrator (the imperfect SFT data)
    A sloppy labeler: each letter of its completion is the right one with probability
    ``P_CORRECT = 0.4``, the *next* letter of the alphabet (``z`` wraps to ``a``) with probability
    ``P_NEAR_MISS = 0.45``, and a uniformly random letter otherwise (0.15). Its length is always right.
    Its mean score is ``P_CORRECT + P_RANDOM / 26 = 0.406`` (``DEMONSTRATOR_MEAN``; the per-completion
    standard deviation is 0.22). Because the near miss is its most frequent answer, SFT learns the
    habit: sampled at temperature 1 an SFT model scores about 0.40, and greedy decoding does not rescue
    it (0.17 to 0.32 in the prototype runs: mostly off by one letter). The preferences say which of two
    completions is better, so a reward model learns that the right letter beats the near miss, and RL
    against it moves the policy far past its demonstrations (0.85 to 0.88 in the prototype).

The preferences
    For each preference prompt, two candidates come from the same noisy labeler with a quality drawn per
    candidate: each letter is right with probability ``q ~ U(0, 1)``, otherwise a near miss or a random
    letter in the demonstrator's 3 : 1 ratio; and with probability ``P_LENGTH_ERROR = 0.2`` a candidate
    is 1 or 2 letters too short or too long, so that the reward model learns that length matters too.
    The oracle scores both, and the first is preferred with the Bradley-Terry probability
    ``sigmoid((score_a - score_b) / TAU)``, ``TAU = 0.2``: one letter of difference in a 5-letter word
    (0.2 of score) is labeled the right way round 73% of the time, equal scores are a coin flip. Measured
    over 10^5 pairs, 15% of pairs tie and the labels of the others agree with the oracle's ordering 85.4%
    of the time (``BT_AGREEMENT``); so a perfect reward model would score 0.80 on noisy held-out labels
    (``BT_ACCURACY_CEILING``), and 0.5 is chance.

Evaluation
    The oracle score of a policy is the mean over held-out prompts of one completion sampled at
    temperature 1 (the distribution RL optimises); its standard error is the std over prompts / sqrt(n),
    about 0.01 at ``n_eval = 512``.

``DemoDefaults`` holds the sizes and hyperparameters measured to work on a 2-core CPU.
Everything here is pure Python + numpy and deterministic given the seed; ``build_tokenizer`` needs
``tokenizers`` and ``transformers``, imported when it is called.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------------
# Vocabulary and formats
# ----------------------------------------------------------------------------------------------------

LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
SEP = ">"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# chat roles, so that conversational (``messages``) data renders with the same tokenizer
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
VOCAB = SPECIAL_TOKENS + (SEP,) + tuple(ROLE_TOKENS.values()) + LETTERS

MIN_LEN, MAX_LEN = 4, 6  # prompt letters; 26*25*24*23 = 358800 four-letter prompts alone, never short

CHAT_TEMPLATE = (
    "{{ bos_token + ' ' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# ----------------------------------------------------------------------------------------------------
# Demonstrator, preference labeler
# ----------------------------------------------------------------------------------------------------

P_CORRECT = 0.4  # the demonstrator's letter is right ...
P_NEAR_MISS = 0.45  # ... or the next letter of the alphabet (its habit, more often than right) ...
P_RANDOM = 1.0 - P_CORRECT - P_NEAR_MISS  # ... or uniform over the 26 letters (0.15)
DEMONSTRATOR_MEAN = P_CORRECT + P_RANDOM / len(LETTERS)  # expected score: 0.4058
# a preference candidate is 1-2 letters too short or too long with this probability, so the reward model
# sees that length matters: without such pairs every candidate had the right length, and a policy that
# stopped late was not penalised (a demo run's PPO drifted to max_new_tokens, oracle score 0.38 -> 0.23)
P_LENGTH_ERROR = 0.2
TAU = 0.2  # Bradley-Terry temperature of the labeler, in units of oracle score
BT_AGREEMENT = 0.854  # P(label agrees with the oracle | scores differ), measured over 10^5 pairs
BT_ACCURACY_CEILING = 0.802  # a perfect reward model's expected accuracy on the noisy labels (ties: 0.5)


@dataclass(frozen=True)
class DemoDefaults:
    """Sizes and hyperparameters of ``rlhf-fast demo``, measured with plain PyTorch loops on a 2-core CPU.

    Prototype runs (plain PyTorch loops, fp32, ``torch.set_num_threads(1)``: an SFT step took 30 ms of CPU
    with one thread and 40 ms with two, and two threads spin 3-10x slower when other jobs share the
    cores). Seeds 0 / 1 / 2, before ``P_LENGTH_ERROR`` was added (every preference candidate had the
    right length), CPU seconds:

    ========================  =======================  =======================  =======================
    stage                     seed 0                   seed 1                   seed 2
    ========================  =======================  =======================  =======================
    SFT, 600 steps            18 s, 0.409 +- 0.010     21 s, 0.388 +- 0.009     19 s, 0.400 +- 0.010
    (greedy decoding)         0.317                    0.175                    0.165
    RM, 1000 steps            61 s, acc 0.71 (0.85)    57 s, acc 0.72 (0.85)    55 s, acc 0.75 (0.88)
    PPO (RLOO), 200 steps     67 s, 0.847 +- 0.007     74 s, 0.880 +- 0.007     72 s, 0.931 +- 0.009
    KL to the SFT policy      3.3 nats                 3.5 nats                 4.3 nats
    ========================  =======================  =======================  =======================

    Scores are the oracle's on one completion sampled at T = 1 per held-out prompt (512), +- one
    standard error; RM accuracy is on 512 held-out pairs' noisy labels (ceiling 0.80), in brackets on the
    oracle's strict ordering. PPO passes 0.8 by step 50. GAE with a critic initialised from the reward
    model (256 prompts x 1 sample, seed 0) reached 0.845 +- 0.007 in 115 s. PPO throughput ~2,200-2,450
    response tokens/s of wall time (rollout + update) at 256 samples per step.

    With ``P_LENGTH_ERROR = 0.2``, ``rlhf-fast demo`` itself (its trainers, at commit c9c5771, seed 0, the
    counter-based sampler): SFT 0.416 +- 0.009, reward model accuracy 0.668, PPO 0.778 +- 0.008 (+29.0
    standard errors), KL to the reference 3.0 nats, 170 s in all on the 2-core machine with other jobs
    running (at 71ba8e4, with torch's sampler: 0.386 -> 0.755, +27.7 standard errors, 3.1 nats).
    """

    # data; SFT and RM see each example once (steps * batch_size), a small model memorises repeats:
    # SFT on 4000 demonstrations for 19 epochs went below the demonstrator's entropy and scored worse
    n_sft: int = 40_000
    n_pref: int = 64_000
    n_pref_eval: int = 512
    n_prompts: int = 2048
    n_eval: int = 512
    seed: int = 0
    # model: a LlamaForCausalLM from a config, 133,568 parameters
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 32
    tie_word_embeddings: bool = True
    # sft: AdamW (no weight decay), loss on completion tokens and </s>, 50 warmup steps then linear decay
    # to 0, gradient norm clipped at 1
    sft_lr: float = 3e-3
    sft_batch_size: int = 64
    sft_steps: int = 600
    sft_warmup_steps: int = 50
    # reward model: LlamaForSequenceClassification(num_labels=1) initialised from the SFT weights (the
    # score head new), -logsigmoid(r_chosen - r_rejected), read at </s> (right padding); 20 warmup
    # steps then linear decay. The accuracy sits near 0.5 for ~300 steps, then climbs: lr 1e-3 was
    # slower (0.69 at 1000 steps), lr 3e-4 plateaued at 0.67
    rm_lr: float = 3e-3
    rm_batch_size: int = 64  # pairs
    rm_steps: int = 1000
    rm_warmup_steps: int = 20
    # ppo: policy and frozen reference from SFT; reward = the RM's score at the last response token
    # (normalised by the mean and std of the RM's scores on 256 SFT samples: std ~1.2, so about the raw
    # scale) minus kl_coef * k1 per token; clipped surrogate (0.2), advantages whitened, 2 epochs of
    # 2 minibatches over each rollout, constant lr, gradient norm clipped at 1. lr 1e-3 blew the KL up to
    # 5 nats in 10 steps against a weak reward model and the oracle score fell (reward hacking)
    ppo_lr: float = 3e-4
    ppo_prompts_per_step: int = 64
    ppo_samples_per_prompt: int = 4  # RLOO/GRPO; with GAE: 256 prompts x 1 sample
    ppo_steps: int = 200
    ppo_epochs: int = 2
    ppo_minibatches: int = 2
    cliprange: float = 0.2
    kl_coef: float = 0.05
    # gae: critic = a copy of the reward model with its score head read at every token; lr 1e-3,
    # clipped value loss (0.2), gamma 1
    vf_lr: float = 1e-3
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0  # rollouts and evaluation sample at T = 1, top_k = 0, top_p = 1
    max_new_tokens: int = MAX_LEN + 1  # the word and </s>


# ----------------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------------


def prompt_letters(prompt: str) -> list[str]:
    """The letters of a prompt (plain ``"q c k z >"`` or a rendered chat turn), in order."""
    return [w for w in prompt.split() if w in _LETTER_SET]


def target_letters(prompt: str) -> list[str]:
    """The letters of the right completion of a prompt: the prompt's letters."""
    return prompt_letters(prompt)


def target(prompt: str) -> str:
    """The right completion of a prompt."""
    return " ".join(target_letters(prompt))


def oracle_score(prompt: str, completion: str) -> float:
    """Fraction of positions where ``completion`` matches the prompt's word, over the longer length."""
    want = target_letters(prompt)
    got = _completion_words(completion)
    n = max(len(want), len(got))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(want, got)) / n


def oracle_scores(prompts: list[str], completions: list[str]) -> list[float]:
    """``oracle_score`` over a batch."""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts ({len(prompts)}) and completions ({len(completions)}) differ in length")
    return [oracle_score(p, c) for p, c in zip(prompts, completions)]


def reward_fn(prompts: list[str], completions: list[str]) -> list[float]:
    """The oracle as a Python reward function (the PPO trainer's ``reward_fn`` option)."""
    return oracle_scores(prompts, completions)


def _completion_words(completion: str) -> list[str]:
    words = []
    for w in completion.split():
        if w == EOS:
            break
        if w not in (PAD, BOS):
            words.append(w)
    return words


_LETTER_SET = frozenset(LETTERS)

# ----------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------


def _random_prompt(rng: np.random.Generator) -> str:
    n = int(rng.integers(MIN_LEN, MAX_LEN + 1))
    # distinct letters: a copy shifted by a position scores 0 instead of matching repeats by chance
    letters = rng.choice(len(LETTERS), size=n, replace=False)
    return " ".join(LETTERS[i] for i in letters) + " " + SEP


def sample_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct random prompts, deterministic given ``seed``."""
    rng = np.random.default_rng(seed)
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(_random_prompt(rng))
    return list(seen)


def _noisy_completion(prompt: str, rng: np.random.Generator, p_correct: float, p_length_error: float = 0.0) -> str:
    """Each letter right with ``p_correct``, else a near miss or random letter in the 3 : 1 ratio; with
    probability ``p_length_error`` the completion then loses its last 1 or 2 letters (keeping at least
    one) or gains 1 or 2 random ones, either way equally likely."""
    p_near = (1.0 - p_correct) * P_NEAR_MISS / (P_NEAR_MISS + P_RANDOM)
    out = []
    for letter in target_letters(prompt):
        u = rng.random()
        if u < p_correct:
            out.append(letter)
        elif u < p_correct + p_near:
            out.append(_next_letter(letter))
        else:
            out.append(_random_letter(rng))
    if rng.random() < p_length_error:
        k = int(rng.integers(1, 3))
        if rng.random() < 0.5:
            out = out[: max(1, len(out) - k)]
        else:
            out += [_random_letter(rng) for _ in range(k)]
    return " ".join(out)


def _next_letter(letter: str) -> str:
    return LETTERS[(LETTERS.index(letter) + 1) % len(LETTERS)]


def _random_letter(rng: np.random.Generator) -> str:
    return LETTERS[int(rng.integers(len(LETTERS)))]


def demonstration(prompt: str, rng: np.random.Generator) -> str:
    """The imperfect demonstrator's completion (mean score ``DEMONSTRATOR_MEAN``)."""
    return _noisy_completion(prompt, rng, P_CORRECT)


def preference_pair(prompt: str, rng: np.random.Generator) -> dict:
    """Two candidates of random quality, labeled by the oracle through Bradley-Terry noise (``TAU``).

    Returns ``prompt``, ``chosen``, ``rejected`` and the oracle's ``chosen_score`` / ``rejected_score``.
    """
    a = _noisy_completion(prompt, rng, float(rng.random()), P_LENGTH_ERROR)
    b = _noisy_completion(prompt, rng, float(rng.random()), P_LENGTH_ERROR)
    sa, sb = oracle_score(prompt, a), oracle_score(prompt, b)
    a_wins = rng.random() < _sigmoid((sa - sb) / TAU)
    chosen, rejected = (a, b) if a_wins else (b, a)
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_score": sa if a_wins else sb,
        "rejected_score": sb if a_wins else sa,
    }


def _without_scores(pair: dict) -> dict:
    return {k: pair[k] for k in ("prompt", "chosen", "rejected")}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------


def write_datasets(
    out_dir: str | os.PathLike,
    *,
    n_sft: int = DemoDefaults.n_sft,
    n_pref: int = DemoDefaults.n_pref,
    n_prompts: int = DemoDefaults.n_prompts,
    n_eval: int = DemoDefaults.n_eval,
    n_pref_eval: int = DemoDefaults.n_pref_eval,
    seed: int = DemoDefaults.seed,
) -> dict[str, Path]:
    """Write the demo's JSONL files to ``out_dir``; returns ``{name: path}``.

    - ``sft``: ``prompt``/``completion`` from the demonstrator;
    - ``preferences``: ``prompt``/``chosen``/``rejected``, the labeler's noisy choice (no scores: that is
      all a human labeler gives);
    - ``prompts``: ``prompt``, for RL;
    - ``eval_prompts``: ``prompt``, held out: disjoint from every training prompt above;
    - ``eval_preferences``: pairs on the first ``n_pref_eval`` held-out prompts, for the reward model's
      accuracy, with the oracle's ``chosen_score``/``rejected_score`` (accuracy on the oracle's order).
    Prompts are distinct within and across the training files and the eval files; the files depend only on
    the arguments.
    """
    if n_eval < 1:
        raise ValueError(f"n_eval must be positive, got {n_eval}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((seed, 1))  # the labelers' stream, apart from the prompts' (seed)
    sizes = {"sft": n_sft, "preferences": n_pref, "prompts": n_prompts, "eval_prompts": n_eval}
    pool = sample_prompts(sum(sizes.values()), seed)
    split, start = {}, 0
    for name, n in sizes.items():
        split[name], start = pool[start : start + n], start + n
    eval_pref_prompts = split["eval_prompts"][: min(n_pref_eval, n_eval)]
    rows = {
        "sft": [{"prompt": p, "completion": demonstration(p, rng)} for p in split["sft"]],
        "preferences": [_without_scores(preference_pair(p, rng)) for p in split["preferences"]],
        "prompts": [{"prompt": p} for p in split["prompts"]],
        "eval_prompts": [{"prompt": p} for p in split["eval_prompts"]],
        "eval_preferences": [preference_pair(p, rng) for p in eval_pref_prompts],
    }
    paths = {}
    for name, records in rows.items():
        paths[name] = out / f"{name}.jsonl"
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return paths


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over ``VOCAB``, built locally (no downloads).

    Text is split on whitespace, one token per word; ``<s>`` is prepended when special tokens are added
    (``tokenizer(prompt)``), never ``</s>`` (the trainer appends it to completions). Decoding joins
    tokens with spaces. It carries a ``chat_template`` with ``<|system|>``/``<|user|>``/``<|assistant|>``
    role tokens, and round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import decoders, pre_tokenizers

    from ..train.models import word_level_tokenizer

    vocab = {w: i for i, w in enumerate(VOCAB)}
    return word_level_tokenizer(vocab, pre_tokenizers.WhitespaceSplit(),
                                decoders.WordPiece(prefix="##", cleanup=False),  # joins words with single spaces
                                bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                additional_special_tokens=list(ROLE_TOKENS.values()), chat_template=CHAT_TEMPLATE,
                                padding_side="left")  # generation appends to the right; trainers may switch  # fmt: skip
