"""rlhf_fast.integrations.trl.GRPOTrainer(truncated_logprobs=True): the loss's log-probs, and the old log-probs
TRL computes for importance sampling, are those of the truncated distribution generation samples from,
checked against transformers' own warpers (TemperatureLogitsWarper, TopK / TopP / MinP LogitsWarper in
``generate``'s order, then log_softmax) on the model's logits in float64; a token outside the kept set gets
weight 0 (exactly as if masked out), never NaN; with the option off, the loss is stock TRL's."""

import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,  # noqa: E402
                                                    TopKLogitsWarper, TopPLogitsWarper)

import rlhf_fast as rf  # noqa: E402
from rlhf_fast.integrations import trl as rft  # noqa: E402

from test_integrations_trl import COMMON, PROMPTS, _assert_matches_stock, _grpo, _grpo_inputs, _loss_and_grads  # noqa: E402
from train_utils import tiny_causal_lm_dir  # noqa: E402

SAMPLING = dict(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_causal_lm_dir(tmp_path_factory.mktemp("tiny_llama_trunc"), hidden_size=32, num_layers=1)


def _trainer(model_dir, tmp_path, truncated_logprobs=True, **cfg):
    args = trl.GRPOConfig(output_dir=str(tmp_path / "ours"), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=6, num_iterations=2,
                          **{**COMMON, "bf16": False, "loss_type": "bnpo", **SAMPLING, **cfg})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        t = rft.GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **kw: [float(len(c) % 5) for c in completions],
                            args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                            truncated_logprobs=truncated_logprobs)  # fmt: skip
    t.model.train()
    t.current_gradient_accumulation_steps = 2  # as train() sets it
    return t


def _ids(inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    return ids, torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)


@torch.no_grad()
def _warped_logprobs(trainer, inputs):
    """float64 log-probs of the completion tokens under transformers' warpers on the model's logits, in
    ``generate``'s order (temperature, top-k, top-p, min-p), then log_softmax: ``-inf`` outside the kept set."""
    ids, attn = _ids(inputs)
    T = inputs["completion_ids"].size(1)
    logits = trainer.model(input_ids=ids, attention_mask=attn).logits[:, -T - 1 : -1].double()
    scores = logits.reshape(-1, logits.size(-1))
    for warper in (TemperatureLogitsWarper(SAMPLING["temperature"]), TopKLogitsWarper(SAMPLING["top_k"]),
                   TopPLogitsWarper(SAMPLING["top_p"]), MinPLogitsWarper(SAMPLING["min_p"])):  # fmt: skip
        scores = warper(None, scores)
    logp = torch.log_softmax(scores, -1).gather(-1, inputs["completion_ids"].reshape(-1, 1))
    return logp.view(-1, T), logits


def _capture_policy_loss(monkeypatch):
    """Record the log-probs, old log-probs and mask the trainer hands rf.ppo_policy_loss."""
    seen = []
    real = rf.ppo_policy_loss

    def spy(logp, old_logp, advantages, mask, **kw):
        seen.append((logp.detach().clone(), old_logp.detach().clone(), mask.detach().clone()))
        return real(logp, old_logp, advantages, mask, **kw)

    monkeypatch.setattr(rf, "ppo_policy_loss", spy)
    return seen


def test_loss_and_old_logprobs_are_the_warpers_truncated_logprobs(model_dir, tmp_path, monkeypatch):
    trainer = _trainer(model_dir, tmp_path)
    assert rft.generation_truncation(trainer.args) == dict(top_k=6, top_p=0.8, min_p=0.05, sampler="hf")
    inputs = trainer._prepare_inputs([{"prompt": p} for p in PROMPTS[:2]] * 2)
    want, _ = _warped_logprobs(trainer, inputs)
    on = inputs["completion_mask"] != 0
    assert on.sum() > 8
    # TRL's old log-probs for importance sampling (num_iterations=2: TRL computes them) come from the same head
    old = inputs["old_per_token_logps"]
    assert torch.isfinite(want[on]).all()  # sampled by generate with these warpers: every token kept
    torch.testing.assert_close(old[on].double(), want[on], rtol=1e-5, atol=1e-5)
    seen = _capture_policy_loss(monkeypatch)
    loss, _ = _loss_and_grads(trainer, inputs)
    logp, old_seen, mask = seen[-1]
    torch.testing.assert_close(logp[on].double(), want[on], rtol=1e-5, atol=1e-5)
    assert torch.equal(old_seen[on], old[on]) and torch.isfinite(loss)
    # the full softmax (stock TRL's) differs: the kept mass is not 1
    trainer_full = _trainer(model_dir, tmp_path, truncated_logprobs=False)
    full, _, _ = trainer_full._get_per_token_logps_and_entropies(trainer_full.model, *_ids(inputs), want.size(1))
    assert (full[on].double() - want[on]).abs().max() > 1e-2


def test_a_token_outside_the_kept_set_gets_weight_zero(model_dir, tmp_path, monkeypatch):
    """A completion token the truncated distribution excludes (log-prob -inf) changes nothing: loss, gradients
    and log-probs equal those of the same batch with that token masked out (by ``tool_mask``, which leaves the
    attention unchanged), all finite; truncation_miss_frac counts it."""
    trainer = _trainer(model_dir, tmp_path)
    inputs = trainer._prepare_inputs([{"prompt": p} for p in PROMPTS[:2]] * 2)
    mask = inputs["completion_mask"]
    row, col = int(mask.sum(1).argmax()), 1
    assert mask[row, : col + 2].all()
    _, logits = _warped_logprobs(trainer, inputs)
    inputs["completion_ids"][row, col] = logits[row, col].argmin()  # the least likely token: outside top_k=6
    want, _ = _warped_logprobs(trainer, inputs)
    # the miss, and maybe later tokens that the changed context no longer keeps
    missed = torch.isneginf(want) & (mask != 0)
    assert missed[row, col] and torch.isfinite(want[(mask != 0) & ~missed]).all()
    with torch.no_grad():  # the old log-probs of the changed batch, as TRL computes them (-inf at the miss)
        inputs["old_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, *_ids(inputs), mask.size(1))  # fmt: skip
    assert torch.isneginf(inputs["old_per_token_logps"][row, col])
    inputs["advantages"] = torch.tensor([1.0, -0.5, 0.7, -1.2])
    inputs["ref_per_token_logps"] = inputs["old_per_token_logps"]
    seen = _capture_policy_loss(monkeypatch)
    trainer._metrics["train"].clear()
    loss, grads = _loss_and_grads(trainer, inputs)
    assert torch.equal(seen[-1][2] != 0, (mask != 0) & ~missed) and torch.isfinite(seen[-1][0]).all()
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    want_frac = float(missed.sum()) / float(mask.sum())
    assert trainer._metrics["train"]["truncation_miss_frac"] == [pytest.approx(want_frac)]
    masked = dict(inputs, tool_mask=(~missed).long())
    want_loss, want_grads = _loss_and_grads(trainer, masked)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-6, atol=1e-9)


def test_option_off_is_stock_trl_with_top_k_set(model_dir, tmp_path):
    """Without truncated_logprobs (the default) a config with top_k / top_p / min_p gets stock TRL's loss and
    gradients (the full softmax)."""
    stock = _grpo(trl.GRPOTrainer, model_dir, tmp_path, bf16=False, beta=0.04, **SAMPLING)
    ours = _grpo(rft.GRPOTrainer, model_dir, tmp_path, bf16=False, beta=0.04, **SAMPLING)
    _assert_matches_stock(stock, ours, _grpo_inputs(stock))


def test_option_on_without_truncation_is_the_untruncated_loss(model_dir, tmp_path):
    """truncated_logprobs=True with every setting off (top_k=0, top_p=1, min_p=None: TRL's defaults) is a no-op."""
    off = dict(top_k=0, top_p=1.0, min_p=None)
    on_trainer = _trainer(model_dir, tmp_path, truncated_logprobs=True, **off)
    assert on_trainer._rf_truncation is None
    plain = _trainer(model_dir, tmp_path, truncated_logprobs=False, **off)
    inputs = _grpo_inputs(plain)
    a, ga = _loss_and_grads(on_trainer, inputs)
    b, gb = _loss_and_grads(plain, inputs)
    assert torch.equal(a, b) and all(torch.equal(ga[k], gb[k]) for k in gb)


@pytest.mark.parametrize(
    "fields,want",
    [
        (dict(top_k=50, top_p=0.95), dict(top_k=50, top_p=0.95, sampler="hf")),
        (dict(use_vllm=True, top_k=50), dict(top_k=50, sampler="vllm")),
        (dict(min_p=0.1, generation_kwargs={"top_k": -1, "top_p": 0.9}),
         dict(top_p=0.9, min_p=0.1, sampler="hf")),  # generation_kwargs override, as in TRL
        (dict(top_k=0, top_p=1.0, min_p=0.0), None),
    ],
)  # fmt: skip
def test_generation_truncation_reads_trl_settings(fields, want):
    args = trl.GRPOConfig(output_dir="unused", report_to=[], use_cpu=True, **fields)
    assert rft.generation_truncation(args) == want


def test_truncated_logprobs_refuses_what_it_cannot_do(model_dir, tmp_path):
    with pytest.raises(ValueError, match="truncated_logprobs"):
        _trainer(model_dir, tmp_path, truncated_logprobs="yes")
    with pytest.raises(ValueError, match="truncated_logprobs=True is not supported with loss_type='vespo'"):
        _trainer(model_dir, tmp_path, loss_type="vespo")


def test_bf16_training_with_truncation_and_a_reference_model_runs(model_dir, tmp_path):
    """A real two-step train() under TRL's default bf16, with a KL term (the reference model keeps the full
    softmax): finite losses, and the share of missed tokens logged."""
    trainer = _trainer(model_dir, tmp_path, bf16=True, beta=0.04, max_steps=2)
    assert trainer.ref_model is not None
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    misses = [r["truncation_miss_frac"] for r in trainer.state.log_history if "truncation_miss_frac" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert len(misses) == 2 and all(0 <= x < 0.5 for x in misses)


@pytest.mark.parametrize(
    "fields,want",
    [
        (dict(repetition_penalty=1.1), "repetition_penalty=1.1"),
        (dict(generation_kwargs={"typical_p": 0.9}), "typical_p=0.9"),
        (dict(use_vllm=True, generation_kwargs={"presence_penalty": 0.5}), "presence_penalty=0.5"),
        (dict(generation_kwargs={"do_sample": False}), "do_sample=False"),
        (dict(generation_kwargs={"num_beams": 4}), "num_beams=4"),
        (dict(generation_kwargs={"bad_words_ids": [[3]]}), "bad_words_ids=[[3]]"),
        (dict(repetition_penalty=1.2, generation_kwargs={"repetition_penalty": 1.0}), None),  # overridden, as in TRL
        (dict(generation_kwargs={"typical_p": 1.0, "suppress_tokens": [], "min_new_tokens": None, "seed": 3}), None),
        (dict(), None),
    ],
)  # fmt: skip
def test_generation_unmatched_names_what_changes_the_sampled_distribution(fields, want):
    args = trl.GRPOConfig(output_dir="unused", report_to=[], use_cpu=True, **fields)
    assert rft.generation_unmatched(args) == want


def test_truncated_logprobs_refuses_a_repetition_penalty_and_the_option_off_takes_it(model_dir, tmp_path):
    """transformers' RepetitionPenaltyLogitsProcessor changes the sampled distribution per row and step: the
    truncated log-probs would be of another distribution, so the option refuses it by name; stock TRL (option
    off) scores the full softmax whatever generation did, as before."""
    with pytest.raises(ValueError, match=r"truncated_logprobs=True is not supported with repetition_penalty=1\.3"):
        _trainer(model_dir, tmp_path, repetition_penalty=1.3)
    with pytest.raises(ValueError, match=r"typical_p=0\.5 in the generation settings"):
        _trainer(model_dir, tmp_path, generation_kwargs={"typical_p": 0.5})
    assert _trainer(model_dir, tmp_path, truncated_logprobs=False, repetition_penalty=1.3)._rf_truncation is None


def test_a_peft_policy_scores_its_reference_over_the_full_softmax(model_dir, tmp_path):
    """A LoRA policy without a reference model (TRL scores the reference through the policy, its adapter off):
    with truncated_logprobs=True and beta != 0, TRL's reference log-probs are the base model's full softmax (the
    reference a separate model would give: finite on every token), the old log-probs the warpers' truncated
    ones, and two train() steps have finite losses. (This combination used to be refused: the reference pass went
    through the policy's truncated head, so a token outside its kept set would have given an infinite KL.)"""
    peft = pytest.importorskip("peft")
    args = trl.GRPOConfig(output_dir=str(tmp_path / "peft"), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=6, num_iterations=2, beta=0.04,
                          **{**COMMON, "bf16": False, "loss_type": "bnpo", "max_steps": 2, **SAMPLING})  # fmt: skip
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = rft.GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **kw: [float(len(c) % 5) for c in completions],
                                  args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}), peft_config=lora,
                                  truncated_logprobs=True)  # fmt: skip
    assert trainer.ref_model is None and isinstance(trainer.model, peft.PeftModel)
    trainer.current_gradient_accumulation_steps = 2
    inputs = trainer._prepare_inputs([{"prompt": p} for p in PROMPTS[:2]] * 2)
    truncated, logits = _warped_logprobs(trainer, inputs)  # a fresh LoRA adapter (B = 0): the base model's logits
    T = inputs["completion_ids"].size(1)
    full = torch.log_softmax(logits / SAMPLING["temperature"], -1).gather(-1, inputs["completion_ids"][..., None])[..., 0]
    on = inputs["completion_mask"] != 0
    assert on.sum() > 8 and full.shape == (4, T)
    ref, old = inputs["ref_per_token_logps"], inputs["old_per_token_logps"]
    assert torch.isfinite(ref[on]).all()
    torch.testing.assert_close(ref[on].double(), full[on], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(old[on].double(), truncated[on], rtol=1e-5, atol=1e-5)
    assert (truncated[on] - full[on]).abs().max() > 1e-2  # the two passes really differ
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
