"""Sampling and scoring shared by the PPO and best-of-n trainers (and the evaluation of any policy).

A rollout is a ``[B, P + R]`` batch: ``P`` left-padded prompt tokens, then ``R`` sampled response tokens,
right-padded after each response's end-of-sequence token. Sampling is plain ancestral sampling from
``softmax(logits / temperature)`` — no top-k / top-p — so the log-probs the PPO loss computes at the same
temperature are those of the distribution the tokens were drawn from.
"""

import importlib
import math
from dataclasses import dataclass

import torch

from .models import reward_scores


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
    """``"package.module:function"`` → the function (a reward function or an evaluation oracle)."""
    if ":" not in spec:
        raise ValueError(f"a function must be given as 'module:function', got {spec!r}")
    module, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load function {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable")
    return fn


@torch.no_grad()
def generate(policy, tokenizer, prompt_ids, prompt_mask, prompts, *, max_new_tokens: int,
             temperature: float = 1.0) -> Rollout:  # fmt: skip
    """Sample one response per row of the left-padded ``prompt_ids [B, P]`` with the global torch RNG."""
    was_training = policy.training
    policy.eval()
    out = policy.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=temperature,
        top_k=0,  # no truncation: the trainer's log-probs are those of softmax(logits / T)
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    policy.train(was_training)
    P = prompt_ids.shape[1]
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
def score(rollout: Rollout, *, reward_model=None, reward_fn=None) -> torch.Tensor:
    """``[B]`` float32 scores: the reward model on prompt + response, or ``reward_fn(prompts, completions)``."""
    if reward_fn is not None:
        values = reward_fn(rollout.prompts, rollout.completions)
        if len(values) != len(rollout.prompts):
            raise ValueError(f"reward_fn returned {len(values)} scores for {len(rollout.prompts)} completions")
        return torch.tensor([float(v) for v in values], dtype=torch.float32, device=rollout.input_ids.device)
    # A reward model scores finished answers (it was trained on completions that end with EOS): a response
    # cut at max_new_tokens is scored with EOS appended, not at a position the model never learned to
    # score (a policy learns to exploit that). Penalise truncation with ppo's missing_eos_penalty.
    B = rollout.input_ids.shape[0]
    cut = ~rollout.finished
    extra = torch.full((B, 1), rollout.eos_token_id, dtype=rollout.input_ids.dtype, device=rollout.input_ids.device)
    ids = torch.cat([rollout.input_ids, extra], dim=1)
    mask = torch.cat([rollout.attention_mask, cut[:, None].to(rollout.attention_mask.dtype)], dim=1)
    return reward_scores(reward_model, ids, mask).float()


def mean_and_stderr(values) -> tuple[float, float]:
    x = torch.as_tensor(values, dtype=torch.float64)
    n = x.numel()
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(x.mean()), se
