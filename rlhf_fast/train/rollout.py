"""Sampling and scoring shared by the PPO and best-of-n trainers (and the evaluation of any policy).

A rollout is a ``[B, P + R]`` batch: ``P`` left-padded prompt tokens, then ``R`` sampled response tokens,
right-padded after each response's end-of-sequence token. Sampling is ancestral sampling from
``softmax(logits / temperature)``, truncated when the trainer's ``top_k`` / ``top_p`` / ``min_p`` are on
(``rf.sample_tokens``' vLLM sampler: only kept tokens, in their renormalised proportions) — no repetition
penalty or other processor from the checkpoint's ``generation_config`` — so the log-probs the PPO loss computes
at the same temperature and truncation are those of the distribution the tokens were drawn from.

The draws are Gumbel-max: token ``argmax_v(logits_v / T + g_v)`` with ``g_v`` standard Gumbel noise, which is
an exact sample of ``softmax(logits / T)``. The noise is a counter-based hash of ``(row seed, position, v)``,
not a draw from a stateful RNG, so a row's response depends only on its seed and its prompt: not on the other
rows of the batch, the batch size or the number of processes. A PPO run on 2 processes samples the same
responses as on one, and a resumed run the same as an uninterrupted one. The draw itself is the public op
``rf.sample_tokens`` (rlhf_fast/sampling.py; one Triton kernel on CUDA).
"""

import importlib
import math
import numbers
import os
import reprlib
import sys
from dataclasses import dataclass

import torch

import rlhf_fast as rf

from ..sampling import row_seeds, sample_tokens
from . import distributed
from .config import sampling_truncation
from .data import collate_prompts
from .errors import UserError
from .models import build_reward_model, reward_scores
from .runtime import autocast_context


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B, P + R] prompt (left-padded) then response (right-padded)
    attention_mask: torch.Tensor  # [B, P + R]
    response_mask: torch.Tensor  # [B, R] float32, 1 on response tokens up to and including EOS
    prompts: list[str]  # the prompt text of each row
    completions: list[str]  # the decoded response of each row (special tokens removed)
    eos_token_id: int | None = None

    @property
    def finished(self) -> torch.Tensor:
        """``[B]`` bool: the response ended with EOS (not cut at ``max_new_tokens``)."""
        R = self.response_mask.shape[1]
        return ((self.input_ids[:, -R:] == self.eos_token_id) & (self.response_mask > 0)).any(1)

    def to(self, device) -> "Rollout":
        return Rollout(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                       self.prompts, self.completions, self.eos_token_id)  # fmt: skip


def load_function(spec: str):
    """``"package.module:function"`` → the function (a reward function or an evaluation oracle). The module
    is looked up on ``sys.path`` with the working directory in front, as ``python -m`` has it, so that
    ``reward_fn=rewards:score`` finds ``./rewards.py`` from the ``rlhf-fast`` console script too (whose
    ``sys.path`` starts with its own folder); the working directory is taken off ``sys.path`` again after
    the import. ``UserError`` (naming ``spec``) when it cannot be found or is not callable."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise UserError(f"a function must be given as 'module:function', got {spec!r}")
    module_name, name = spec.split(":")
    try:
        fn = getattr(_import_with_cwd(module_name), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load function {spec!r} (looked for {module_name} in the working directory "
                        f"{os.getcwd()!r} and on sys.path): {e}") from e  # fmt: skip
    if not callable(fn):
        raise UserError(f"{spec!r} is not callable")
    return fn


def function_spec(fn) -> str:
    """``"module:qualname"`` of a callable (how a trainer names a ``reward_fn`` passed from Python)."""
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', '?')}"


def _import_with_cwd(module_name: str):
    cwd = os.getcwd()
    added = all(os.path.abspath(p or os.curdir) != cwd for p in sys.path)
    if added:
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


class GumbelSampler:
    """A ``transformers`` logits processor that turns greedy decoding into sampling from
    ``softmax(logits / temperature)`` (``sample_tokens``): it returns scores that are 0 at the drawn token
    and ``-inf`` elsewhere. Keyed by the response position (the prompt's width, left padding included, is
    ``prompt_width``)."""

    def __init__(self, seeds: torch.Tensor, temperature: float, prompt_width: int, impl: str = "auto",
                 truncation: dict | None = None):  # fmt: skip
        self.seeds, self.temperature, self.prompt_width, self.impl = seeds, temperature, prompt_width, impl
        self.truncation = truncation or {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = sample_tokens(scores, self.seeds, input_ids.shape[1] - self.prompt_width, self.temperature,
                               impl=self.impl, **self.truncation)  # fmt: skip
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens[:, None], 0.0)


@torch.no_grad()
def generate(policy, tokenizer, prompt_ids, prompt_mask, prompts, *, max_new_tokens: int,
             temperature: float = 1.0, seeds: torch.Tensor | None = None, synced: bool = False,
             impl: str = "auto", truncation: dict | None = None) -> Rollout:  # fmt: skip
    """Sample one response per row of the left-padded ``prompt_ids [B, P]``.

    ``seeds [B]`` (int64, from ``row_seeds``) fix each row's draws; None draws them from the global torch
    RNG. ``synced=True`` keeps every process stepping until all are done (``generate(synced_gpus=True)``),
    which a model whose forward is collective (FSDP) needs. ``impl``: ``sample_tokens``' (Triton on CUDA);
    ``truncation``: its ``top_k`` / ``top_p`` / ``min_p`` keywords (``config.sampling_truncation``)."""
    from transformers import GenerationConfig, LogitsProcessorList

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if seeds is None:
        seeds = torch.randint(-(2**62), 2**62, (prompt_ids.shape[0],), dtype=torch.int64)
    if seeds.shape != prompt_ids.shape[:1]:
        raise ValueError(f"seeds must hold one seed per row ({prompt_ids.shape[0]}), got shape {tuple(seeds.shape)}")
    # A fresh config: nothing from the checkpoint's generation_config (its temperature, top-k/top-p,
    # repetition penalty...) changes the distribution the trainer computes log-probs of.
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)  # fmt: skip
    # generate() fills the unset fields of a config it is passed from the model's own (transformers >= 4.5x):
    # swap the model's out for the call.
    P = prompt_ids.shape[1]
    was_training, model_config = policy.training, policy.generation_config
    policy.eval()
    policy.generation_config = config
    try:
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                              logits_processor=LogitsProcessorList([GumbelSampler(seeds, temperature, P, impl, truncation)]),
                              synced_gpus=synced)  # fmt: skip
    finally:
        policy.generation_config = model_config
        policy.train(was_training)
    response = out[:, P:]
    # Response tokens: up to and including the first EOS (generate pads the rest).
    is_eos = response == tokenizer.eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    response_mask = (~after_eos).to(torch.float32)
    attention_mask = torch.cat([prompt_mask.to(torch.long), response_mask.long()], dim=1)
    completions = tokenizer.batch_decode(response.masked_fill(after_eos, tokenizer.pad_token_id),
                                         skip_special_tokens=True)  # fmt: skip
    return Rollout(out, attention_mask, response_mask, list(prompts), completions, tokenizer.eos_token_id)


@torch.no_grad()
def score(rollout: Rollout, *, reward_model=None, reward_fn=None, name: str = "reward_fn") -> torch.Tensor:
    """``[B]`` float32 scores: the reward model on prompt + response, or ``reward_fn(prompts, completions)``.
    ``UserError`` naming ``name`` (``"reward_fn 'module:function'"``, ...) when the function returns anything
    but one real number per completion, or a score is not finite (NaN or inf, also after the cast to float32):
    a trainer stops there, before the scores reach an update."""
    if reward_fn is not None:
        values = reward_fn(rollout.prompts, rollout.completions)
        scores = torch.tensor(_as_numbers(values, len(rollout.prompts), name), dtype=torch.float32,
                              device=rollout.input_ids.device)  # fmt: skip
    else:
        # A reward model scores finished answers (it was trained on completions that end with EOS): a response
        # cut at max_new_tokens is scored with EOS appended, not at a position the model never learned to
        # score (a policy learns to exploit that). Penalise truncation with ppo's missing_eos_penalty.
        B = rollout.input_ids.shape[0]
        cut = ~rollout.finished
        extra = torch.full((B, 1), rollout.eos_token_id, dtype=rollout.input_ids.dtype,
                           device=rollout.input_ids.device)  # fmt: skip
        ids = torch.cat([rollout.input_ids, extra], dim=1)
        mask = torch.cat([rollout.attention_mask, cut[:, None].to(rollout.attention_mask.dtype)], dim=1)
        scores = reward_scores(reward_model, ids, mask).float()
    check_finite_scores(scores, rollout.completions, f"{name} gave")
    return scores


def check_finite_scores(scores: torch.Tensor, completions: list[str], source: str) -> None:
    """``UserError`` (``"<source> a non-finite score ..."``) for the first NaN or inf of ``scores [B]``, with
    the completion it belongs to."""
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{source} a non-finite score ({float(scores[i])} in float32 for completion {i} of "
                        f"{len(scores)}, {reprlib.repr(completions[i])}; {len(bad)} in all): scores must be finite "
                        "numbers; stopped before any update with them")  # fmt: skip


def _as_numbers(values, n: int, name: str) -> list[float]:
    """``values`` as ``n`` Python floats: a list or tuple of real numbers (bools, NumPy and 0-d tensor scalars
    too), or a 1-D tensor or array of ``n``; else ``UserError`` naming ``name`` and what it returned."""
    want = f"one real number per completion (a list of {n})"
    if hasattr(values, "tolist") and getattr(values, "ndim", None) == 1:  # a tensor or NumPy array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise UserError(f"{name} returned {reprlib.repr(values)} ({type(values).__name__}); it must return {want}")
    if len(values) != n:
        raise UserError(f"{name} returned {len(values)} scores for {n} completions; it must return {want}")
    out = []
    for i, v in enumerate(values):
        if hasattr(v, "ndim") and getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # 0-d tensor / array
            v = v.item()
        if not isinstance(v, numbers.Real):  # bools too: a check's pass / fail is a reward of 1 / 0
            raise UserError(f"{name} returned {reprlib.repr(v)} ({type(v).__name__}) as the score of completion {i}; "
                            f"it must return {want}")  # fmt: skip
        out.append(float(v))
    return out


def mean_and_stderr(values) -> tuple[float, float]:
    x = torch.as_tensor(values, dtype=torch.float64)
    n = x.numel()
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(x.mean()), se


def make_scorers(cfg, device, *, reward_fn=None, eval_fn=None):
    """``(reward, scorer)``, each ``rollout -> [B] float32 scores``. ``reward``: the frozen reward model
    ``cfg.reward_model`` (under ``cfg.precision``'s autocast; sharded with the others under FSDP), or the
    function ``reward_fn`` / ``cfg.reward_fn``. ``scorer``, the evaluation's: ``eval_fn`` / ``cfg.eval_fn``
    (an oracle), or the reward."""
    if cfg.reward_model is not None:
        reward_model = build_reward_model(cfg.reward_model, dtype="fp32", device=device).eval().requires_grad_(False)
        reward_model = distributed.shard_frozen(reward_model, cfg.parallel)

        def reward(ro: Rollout) -> torch.Tensor:
            with autocast_context(device, cfg.precision):
                return score(ro, reward_model=reward_model, name=f"reward_model {cfg.reward_model!r}")
    else:
        reward_function = reward_fn or load_function(cfg.reward_fn)

        def reward(ro: Rollout) -> torch.Tensor:
            return score(ro, reward_fn=reward_function, name=f"reward_fn {cfg.reward_fn!r}")

    if eval_fn is None and not cfg.eval_fn:
        return reward, reward
    eval_name = f"eval_fn {function_spec(eval_fn) if eval_fn else cfg.eval_fn!r}"
    eval_fn = eval_fn or load_function(cfg.eval_fn)
    return reward, lambda ro: score(ro, reward_fn=eval_fn, name=eval_name)


EVAL_STREAM = -1  # the sampling stream of evaluations (steps and rounds are 0, 1, ...): before and after share draws


@torch.no_grad()
def evaluate_policy(policy, ref, tokenizer, prompt_data, *, scorer, ops, seed: int, batch_size: int,
                    max_new_tokens: int, temperature: float, precision: str,
                    truncation: dict | None = None) -> dict:  # fmt: skip
    """Mean score (± standard error) of one sample per held-out prompt (``scorer``), and the exact KL to the
    reference ``ref`` per response (``rf.full_kl`` summed over the response's tokens), ``batch_size`` prompts
    at a time. Under torchrun each process takes a share of the prompts; every row's draws are keyed by
    ``(seed, EVAL_STREAM, row)``, so the result does not depend on the number of processes, and the
    evaluations before and after training share them. The responses are sampled with ``truncation`` (the
    trainer's ``top_k`` / ``top_p`` / ``min_p``); the KL is the full softmaxes'."""
    scores, kls = [], []
    device = next(policy.parameters()).device
    n = len(prompt_data)
    mine = distributed.local_rows(n)
    for start in range(mine.start, mine.stop, batch_size):
        index = list(range(start, min(start + batch_size, mine.stop)))
        rows = prompt_data.select([i % n for i in index])
        ids, mask = collate_prompts(rows["prompt_input_ids"], tokenizer.pad_token_id)
        ro = generate(policy, tokenizer, ids.to(device), mask.to(device), rows["prompt"],
                      max_new_tokens=max_new_tokens, temperature=temperature,
                      seeds=row_seeds(seed, EVAL_STREAM, index), synced=distributed.is_sharded(policy),
                      truncation=truncation)  # fmt: skip
        scores += scorer(ro).tolist()
        R = ro.response_mask.shape[1]
        with autocast_context(device, precision):
            logits = ops.response_logits(policy, ro.input_ids, ro.attention_mask, R)
            ref_logits = ops.response_logits(ref, ro.input_ids, ro.attention_mask, R)
        kl = rf.full_kl(logits.float(), ref_logits.float(), temperature=temperature)
        kls += (kl * ro.response_mask).sum(1).tolist()
    scores, kls = distributed.gather_objects(scores, n), distributed.gather_objects(kls, n)
    mean, se = mean_and_stderr(scores)
    return {"score": mean, "score_stderr": se, "kl_to_ref": float(torch.tensor(kls).mean()), "n": len(scores)}


def policy_evaluator(cfg, ref, tokenizer, prompt_data, *, scorer, ops):
    """``evaluate(policy) -> dict``: ``evaluate_policy`` with a trainer's sampling options (``cfg.seed``,
    ``cfg.prompts_per_step`` prompts a batch, ``cfg.max_new_tokens``, ``cfg.temperature`` and the truncation,
    ``cfg.precision``)."""
    return lambda policy: evaluate_policy(policy, ref, tokenizer, prompt_data, scorer=scorer, ops=ops, seed=cfg.seed,
                                          batch_size=cfg.prompts_per_step, max_new_tokens=cfg.max_new_tokens,
                                          temperature=cfg.temperature, precision=cfg.precision,
                                          truncation=sampling_truncation(cfg))  # fmt: skip
