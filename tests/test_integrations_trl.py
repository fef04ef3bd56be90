"""rlhf_fast.integrations.trl against stock TRL (the real package, trl 1.16) on a tiny Llama on CPU.

Each test builds the stock trainer and ours from the same saved model and config, feeds both the same
batch and compares losses and gradients of every parameter: within 1e-5 relative in float32; under
TRL's default bf16 config, ours is no further from the float32 gradients than stock TRL's bf16 ones.
"""

import math
import warnings
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

from rlhf_fast.integrations import count_op_calls  # noqa: E402
from rlhf_fast.integrations import trl as rft  # noqa: E402

from train_utils import tiny_causal_lm_dir  # noqa: E402

PROMPTS = ["a b c", "d e f g", "h i", "j k l m n"]
COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0, max_steps=1,
              disable_tqdm=True)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_causal_lm_dir(tmp_path_factory.mktemp("tiny_llama"), hidden_size=32, num_layers=1)


def _reward(completions, **kwargs):
    return [float(len(c) % 5) for c in completions]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def _loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    # the autocast accelerate wraps a prepared model's forward in under bf16 (a no-op in float32)
    with trainer.compute_loss_context_manager(), trainer.accelerator.autocast():
        loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _assert_matches_stock(stock, ours, inputs, rtol=1e-5):
    """On one batch, our loss and every parameter's gradient equal stock TRL's within ``rtol`` relative."""
    want_loss, want = _loss_and_grads(stock, inputs)
    got_loss, got = _loss_and_grads(ours, inputs)
    assert got.keys() == want.keys() and len(want) > 5
    assert torch.allclose(got_loss, want_loss, rtol=rtol, atol=1e-7), (got_loss, want_loss)
    for name in want:
        assert _rel(got[name], want[name]) < rtol, name
    return want_loss


def _assert_bf16_no_worse_than_stock(ref32, stock, ours, inputs):
    """On one batch, our bf16 loss and gradients (all parameters, one relative norm) are no further from the
    float32 run's than stock TRL's bf16 ones (plus a margin of 1e-3)."""
    exact_loss, exact = _loss_and_grads(ref32, inputs)
    stock_loss, stock_g = _loss_and_grads(stock, inputs)
    got_loss, got = _loss_and_grads(ours, inputs)
    flat = lambda g: torch.cat([g[n].float().flatten() for n in sorted(exact)])  # noqa: E731
    err_ours, err_stock = _rel(flat(got), flat(exact)), _rel(flat(stock_g), flat(exact))
    assert err_ours <= 1.5 * err_stock + 1e-3, (err_ours, err_stock)
    assert err_ours < 3e-2
    assert abs(got_loss - exact_loss) <= 1.5 * abs(stock_loss - exact_loss) + 1e-3


def _grpo(cls, model_dir, tmp_path, **cfg):
    args = trl.GRPOConfig(output_dir=str(tmp_path / cls.__module__), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=5, **{**COMMON, **cfg})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        t = cls(model=model_dir, reward_funcs=_reward, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    t.model.train()
    t.current_gradient_accumulation_steps = 2  # the losses divide by it: check that too
    return t


def _grpo_inputs(trainer):
    """A scored batch from stock TRL, made off-policy: old and reference log-probs and advantages that
    clip, a completion with a hole in its mask and one without any token."""
    g = torch.Generator().manual_seed(1)
    inputs = trainer._prepare_inputs([{"prompt": p} for p in PROMPTS[:2]] * 2)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].size(1))  # fmt: skip
    mask = inputs["completion_mask"].clone()
    mask[0, 1] = 0
    mask[1] = 0
    inputs["completion_mask"] = mask
    inputs["old_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    inputs["ref_per_token_logps"] = logp + 0.5 * torch.randn(logp.shape, generator=g)
    inputs["advantages"] = torch.randn(logp.shape[0], generator=g)
    inputs["num_items_in_batch"] = mask.sum().float()
    trainer._metrics["train"].clear()  # what scoring logged: the tests compare what the loss logs
    return inputs


# TRL configs on rf.ppo_policy_loss: name -> (GRPOConfig fields, a change of one of them that must move the
# gradients: the batch exercises the option, so a mapping that ignored it would fail)
GRPO_CONFIGS = {
    "grpo": (dict(loss_type="grpo"), None),
    "bnpo": (dict(loss_type="bnpo"), None),
    "dr_grpo": (dict(loss_type="dr_grpo"), None),
    "dapo": (dict(loss_type="dapo"), None),
    "luspo": (dict(loss_type="luspo"), None),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.3), ("epsilon_high", 5.0)),
    "sapo": (dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
             ("args.sapo_temperature_neg", 1.05)),
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.05, epsilon_high=0.06),
             ("importance_sampling_level", "token")),
    "delta": (dict(loss_type="bnpo", delta=1.25), ("args.delta", None)),
}  # fmt: skip


def _grads_move(trainer, inputs, want, change):
    """Our gradients with one option changed are > 1e-3 (relative) away from ``want``."""
    name, value = change
    obj = trainer.args if name.startswith("args.") else trainer
    setattr(obj, name.removeprefix("args."), value)
    _, moved = _loss_and_grads(trainer, inputs)
    flat = lambda g: torch.cat([g[n].float().flatten() for n in sorted(want)])  # noqa: E731
    assert _rel(flat(moved), flat(want)) > 1e-3, change


def _assert_same_metrics(stock, ours, rel=1e-5):
    """Ours logs the metric names stock TRL's loss logs (GRPO: _grpo_inputs clears what scoring logged), with
    the same values."""
    want, got = stock._metrics["train"], ours._metrics["train"]
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-6), key


@pytest.mark.parametrize("bias_kl", [True, False])
@pytest.mark.parametrize("config", list(GRPO_CONFIGS))
def test_grpo_gradients_match_stock_trl_fp32(model_dir, tmp_path, config, bias_kl):
    fields, change = GRPO_CONFIGS[config]
    cfg = dict(bf16=False, beta=0.04, use_bias_correction_kl=bias_kl, epsilon_high=0.28, temperature=0.7)
    cfg.update(fields)
    stock = _grpo(trl.GRPOTrainer, model_dir, tmp_path, **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a supported config: no fallback warning
        rft.warn_once.cache_clear()
        ours = _grpo(rft.GRPOTrainer, model_dir, tmp_path, **cfg)
    assert ours._rf_loss_unsupported is None
    inputs = _grpo_inputs(stock)
    with count_op_calls("linear_logprobs", "ppo_policy_loss") as calls:
        _assert_matches_stock(stock, ours, inputs)
    assert calls == {"linear_logprobs": 1, "ppo_policy_loss": 1}  # our ops did the work
    _assert_same_metrics(stock, ours)
    clip_metric = {"cispo": "cispo_clip_ratio", "sapo": None}.get(config, "clip_ratio/region_mean")
    assert clip_metric is None or stock._metrics["train"][clip_metric][0] > 0  # the batch does clip
    if change is not None:
        _grads_move(ours, inputs, _loss_and_grads(stock, inputs)[1], change)


@pytest.mark.parametrize("loss_type", ["grpo", "luspo", "sapo", "cispo"])
def test_grpo_sequence_level_with_token_weights_matches_stock(model_dir, tmp_path, loss_type):
    """GSPO's sequence ratio under per-token weights (entropy mask, token-level vLLM importance sampling,
    off-policy mask) and the entropy bonus; luspo, sapo and cispo at the sequence level."""
    cfg = dict(bf16=False, beta=0.04, loss_type=loss_type, importance_sampling_level="sequence", epsilon=0.05,
               epsilon_high=1.3 if loss_type == "cispo" else 0.06, top_entropy_quantile=0.5, entropy_coef=0.1,
               off_policy_mask_threshold=0.05)  # fmt: skip
    stock = _grpo(trl.GRPOTrainer, model_dir, tmp_path, **cfg)
    ours = _grpo(rft.GRPOTrainer, model_dir, tmp_path, **cfg)
    inputs = _grpo_inputs(stock)
    B, T = inputs["completion_mask"].shape
    inputs["importance_sampling_ratio"] = torch.rand(B, T, generator=torch.Generator().manual_seed(5)) * 2
    for t in (stock, ours):
        t.use_vllm, t.vllm_importance_sampling_correction = True, True
    with count_op_calls("ppo_policy_loss") as calls:
        _assert_matches_stock(stock, ours, inputs)
    assert calls == {"ppo_policy_loss": 1}
    _assert_same_metrics(stock, ours)


@pytest.mark.parametrize(
    "fields, match",
    [(dict(loss_type="cispo"), "loss_type='cispo' with epsilon_high=0.2 <= 1"),  # TRL's default epsilon_high
     (dict(loss_type="vespo"), "loss_type='vespo'"),
     (dict(loss_type="sapo", sapo_temperature_neg=-1.0), "sapo_temperature_pos / _neg = \\(1.0, -1.0\\)"),
     (dict(use_adaptive_entropy=True), "use_adaptive_entropy")],
)  # fmt: skip
def test_grpo_unsupported_config_warns_and_runs_stock_loss(model_dir, tmp_path, fields, match):
    cfg = dict(bf16=False, beta=0.04, **fields)
    stock = _grpo(trl.GRPOTrainer, model_dir, tmp_path, **cfg)
    rft.warn_once.cache_clear()
    with pytest.warns(UserWarning, match=match + ".*stock TRL's loss"):
        ours = _grpo(rft.GRPOTrainer, model_dir, tmp_path, **cfg)
    inputs = _grpo_inputs(stock)
    with count_op_calls("ppo_policy_loss") as calls:
        _assert_matches_stock(stock, ours, inputs)  # stock loss on our log-probs
    assert calls == {"ppo_policy_loss": 0}


def test_grpo_sequence_level_with_per_token_advantages_warns_and_runs_stock_loss(model_dir, tmp_path):
    cfg = dict(bf16=False, beta=0.04, importance_sampling_level="sequence")
    stock = _grpo(trl.GRPOTrainer, model_dir, tmp_path, **cfg)
    ours = _grpo(rft.GRPOTrainer, model_dir, tmp_path, **cfg)
    inputs = _grpo_inputs(stock)
    B, T = inputs["completion_mask"].shape
    inputs["advantages"] = torch.randn(B, T, generator=torch.Generator().manual_seed(2))
    rft.warn_once.cache_clear()
    with pytest.warns(UserWarning, match="sequence.*per-token advantages.*stock TRL's loss"):
        _assert_matches_stock(stock, ours, inputs)


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_grpo_entropy_bonus_and_entropy_mask_match_stock(model_dir, tmp_path, loss_type):
    cfg = dict(bf16=False, beta=0.0, loss_type=loss_type, entropy_coef=0.1, top_entropy_quantile=0.5)
    stock = _grpo(trl.GRPOTrainer, model_dir, tmp_path, **cfg)
    ours = _grpo(rft.GRPOTrainer, model_dir, tmp_path, **cfg)
    inputs = _grpo_inputs(stock)
    _assert_matches_stock(stock, ours, inputs)
    _assert_same_metrics(stock, ours)  # policy_loss and entropy_coef included


@pytest.mark.parametrize("is_shape", ["token", "sequence"])
def test_grpo_off_policy_mask_and_vllm_is_correction_match_stock(model_dir, tmp_path, is_shape):
    """The off-policy sequence mask, and vLLM's importance-sampling correction: the trainers' loss reads
    only ``use_vllm``, ``vllm_importance_sampling_correction`` and the batch's ratio (TRL computes it,
    truncated or masked, while scoring), so both are set by hand here (no vLLM on CPU)."""
    cfg = dict(bf16=False, beta=0.04, loss_type="dapo", off_policy_mask_threshold=0.05)
    stock = _grpo(trl.GRPOTrainer, model_dir, tmp_path, **cfg)
    ours = _grpo(rft.GRPOTrainer, model_dir, tmp_path, **cfg)
    inputs = _grpo_inputs(stock)
    B, T = inputs["completion_mask"].shape
    g = torch.Generator().manual_seed(7)
    ratio = torch.rand(B, T if is_shape == "token" else 1, generator=g) * 2
    inputs["importance_sampling_ratio"] = torch.where(ratio > 1.6, 0.0, ratio)  # some tokens masked out
    for t in (stock, ours):
        t.use_vllm, t.vllm_importance_sampling_correction = True, True
    _assert_matches_stock(stock, ours, inputs)
    _assert_same_metrics(stock, ours)


def test_grpo_bf16_default_config_runs_and_is_no_worse_than_stock(model_dir, tmp_path):
    """TRL's default config is bf16 (autocast on CPU): a real two-step train() runs, and on one batch our
    gradients are no further from the float32 ones than stock TRL's bf16 gradients (TRL rounds the logits
    to bf16, we keep them float32)."""
    assert trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True).bf16  # the default
    ours = _grpo(rft.GRPOTrainer, model_dir, tmp_path, beta=0.04, max_steps=2)
    assert ours.accelerator.mixed_precision == "bf16"
    ours.train()
    losses = [r["loss"] for r in ours.state.log_history if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

    ref32 = _grpo(trl.GRPOTrainer, model_dir, tmp_path, beta=0.04, bf16=False)
    stock = _grpo(trl.GRPOTrainer, model_dir, tmp_path, beta=0.04)
    ours = _grpo(rft.GRPOTrainer, model_dir, tmp_path, beta=0.04)
    inputs = _grpo_inputs(ref32)
    _assert_bf16_no_worse_than_stock(ref32, stock, ours, inputs)


def test_grpo_bf16_with_lm_head_cast_to_fp32_matches_stock(model_dir, tmp_path):
    """``cast_lm_head_to_fp32``: the backbone under bf16 autocast, the head in float32 on both sides, so
    the two agree far below bf16 rounding (a bf16 head would be ~1e-3 off)."""
    cfg = dict(beta=0.04, cast_lm_head_to_fp32=True)
    stock = _grpo(trl.GRPOTrainer, model_dir, tmp_path, **cfg)
    ours = _grpo(rft.GRPOTrainer, model_dir, tmp_path, **cfg)
    inputs = _grpo_inputs(stock)
    _assert_matches_stock(stock, ours, inputs)  # measured: 2e-7


def test_fused_head_matches_trl_fused_head(model_dir, monkeypatch):
    """install_fused_head against TRL's own add_fused_lm_head on the same model: log-probs, entropy, mean
    logits and is_top1 (half the labels the model's argmax, some -100), the is_top1 pass in several chunks."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from rlhf_fast.integrations import _trl_head

    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    stock, ours = (AutoModelForCausalLM.from_pretrained(model_dir) for _ in range(2))
    ids = torch.randint(4, stock.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        labels = ids.clone()
        labels[:, 1::2] = stock(input_ids=ids).logits[:, :-1:2].argmax(-1)  # label t: the argmax at t - 1
    labels[0, 3], labels[2, 6] = -100, -100
    add_fused_lm_head(stock, temperature=0.7, outputs=outputs)
    rft.install_fused_head(ours, temperature=0.7, outputs=outputs)
    monkeypatch.setattr(_trl_head, "_TOP1_CHUNK_LOGITS", 5 * stock.config.vocab_size)  # 5 rows a chunk
    with torch.no_grad():
        want = stock(input_ids=ids, labels=labels, fused_lm_head=True)
        got = ours(input_ids=ids, labels=labels, fused_lm_head=True)
    for name in outputs[:3]:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)
    assert got.is_top1.dtype == torch.bool and torch.equal(got.is_top1, want.is_top1)
    assert want.is_top1.sum() >= 11 and not want.is_top1.all()  # 12 argmax labels, one of them -100


# ------------------------------------------------------------------------------------------------- DPO


DPO_ROWS = {"prompt": ["a b", "c d e", "f", "g h i"], "chosen": ["x y", "z", "q r s", "t"],
            "rejected": ["u", "v w", "o p", "m n o p"]}  # fmt: skip


def _dpo(cls, model_dir, tmp_path, data=None, **cfg):
    from transformers import AutoTokenizer

    data = Dataset.from_dict(DPO_ROWS) if data is None else data
    args = trl.DPOConfig(**{"output_dir": str(tmp_path / cls.__module__), "per_device_train_batch_size": 4,
                            "beta": 0.2, **COMMON, **cfg})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        t = cls(model=model_dir, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_dir))
    t.model.train()
    return t


def _dpo_batch(trainer, seed=0):
    torch.manual_seed(seed)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def _some_labels_argmax(trainer, inputs):
    """Every other completion token of the chosen half replaced by the policy's argmax there (left to right,
    as greedy decoding would), so that mean_token_accuracy is neither 0 nor 1."""
    ids, cm = inputs["input_ids"].clone(), inputs["completion_mask"].bool()
    n = ids.shape[0] // 2
    with torch.no_grad():
        for t in range(1, ids.shape[1], 2):
            pred = trainer.model(input_ids=ids, attention_mask=inputs["attention_mask"]).logits[:n, t - 1].argmax(-1)
            ids[:n, t] = torch.where(cm[:n, t], pred, ids[:n, t])
    return {**inputs, "input_ids": ids}


def _perturb(trainer, seed=3):
    """Move the policy away from the reference, so the DPO logratios are not all 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_dpo_gradients_match_stock_trl_fp32(model_dir, tmp_path, loss_type):
    stock = _dpo(trl.DPOTrainer, model_dir, tmp_path, bf16=False, loss_type=loss_type)
    ours = _dpo(rft.DPOTrainer, model_dir, tmp_path, bf16=False, loss_type=loss_type)
    assert ours._rf_unsupported is None
    _perturb(stock), _perturb(ours)
    inputs = _some_labels_argmax(stock, _dpo_batch(stock))
    with count_op_calls("linear_logprobs", "dpo_loss") as calls:
        want_loss = _assert_matches_stock(stock, ours, inputs)
    assert calls == {"linear_logprobs": 2, "dpo_loss": 1}  # policy and reference heads, our loss
    assert float(want_loss) != pytest.approx(math.log(2), abs=1e-4) or loss_type == "hinge"
    _assert_same_metrics(stock, ours)  # all of TRL's names, mean_token_accuracy included
    assert 0 < stock._metrics["train"]["mean_token_accuracy"][0] < 1


def test_dpo_bf16_default_config_runs_and_is_no_worse_than_stock(model_dir, tmp_path):
    ours = _dpo(rft.DPOTrainer, model_dir, tmp_path)  # DPOConfig's default bf16
    assert ours.accelerator.mixed_precision == "bf16"
    ours.train()
    assert torch.isfinite(torch.tensor(ours.state.log_history[0]["loss"]))
    ref32 = _dpo(trl.DPOTrainer, model_dir, tmp_path, bf16=False)
    stock = _dpo(trl.DPOTrainer, model_dir, tmp_path)
    ours = _dpo(rft.DPOTrainer, model_dir, tmp_path)
    for t in (ref32, stock, ours):
        _perturb(t)
    inputs = _dpo_batch(ref32)
    _assert_bf16_no_worse_than_stock(ref32, stock, ours, inputs)


def test_dpo_unsupported_loss_type_warns_and_runs_stock(model_dir, tmp_path):
    rft.warn_once.cache_clear()
    with pytest.warns(UserWarning, match="ipo.*stock TRL"):
        ours = _dpo(rft.DPOTrainer, model_dir, tmp_path, bf16=False, loss_type="ipo")
    stock = _dpo(trl.DPOTrainer, model_dir, tmp_path, bf16=False, loss_type="ipo")
    inputs = _dpo_batch(stock)
    assert torch.equal(_loss_and_grads(ours, inputs)[0], _loss_and_grads(stock, inputs)[0])


# ---------------------------------------------------------------------------------------------- Reward


def _reward_trainer(cls, model_dir, tmp_path, **cfg):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    data = Dataset.from_dict({"chosen": ["a b c", "d e", "f g h i", "j"], "rejected": ["k", "l m n", "o p", "q r"],
                              "margin": [0.5, 0.0, 1.0, -0.2]})  # fmt: skip
    args = trl.RewardConfig(output_dir=str(tmp_path / cls.__module__), per_device_train_batch_size=4,
                            center_rewards_coefficient=0.01, **{**COMMON, **cfg})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        t = cls(model=model, args=args, train_dataset=data, processing_class=tok)
    t.model.train()
    return t


def test_reward_gradients_match_stock_trl_fp32(model_dir, tmp_path):
    stock = _reward_trainer(trl.RewardTrainer, model_dir, tmp_path, bf16=False)
    ours = _reward_trainer(rft.RewardTrainer, model_dir, tmp_path, bf16=False)
    ours.model.load_state_dict(stock.model.state_dict())
    inputs = _dpo_batch(stock)
    assert "margin" in inputs
    with count_op_calls("pairwise_sigmoid_loss") as calls:
        _assert_matches_stock(stock, ours, inputs, rtol=1e-6)
    assert calls == {"pairwise_sigmoid_loss": 1}
    _assert_same_metrics(stock, ours, rel=1e-6)


def test_reward_bf16_default_config_runs_and_is_no_worse_than_stock(model_dir, tmp_path):
    """Under bf16 the scores come out of the model in bf16; TRL takes the log-sigmoid in bf16, we in
    float32: against the float32 run, our loss and gradients are no further off than TRL's."""
    ref32 = _reward_trainer(trl.RewardTrainer, model_dir, tmp_path, bf16=False)
    stock = _reward_trainer(trl.RewardTrainer, model_dir, tmp_path)
    ours = _reward_trainer(rft.RewardTrainer, model_dir, tmp_path)
    for t in (stock, ours):
        t.model.load_state_dict(ref32.model.state_dict())
    assert ours.accelerator.mixed_precision == "bf16"
    inputs = _dpo_batch(ref32)
    _assert_bf16_no_worse_than_stock(ref32, stock, ours, inputs)
    ours.train()
    assert torch.isfinite(torch.tensor(ours.state.log_history[0]["loss"]))


@pytest.mark.parametrize("name", ["GRPOTrainer", "DPOTrainer", "RewardTrainer"])
def test_unsupported_trl_version_fails_clearly(monkeypatch, name):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match=f"trl.{name} replaces TRL.*tested with trl 1.16.x; found trl 1.17.0"):
        getattr(rft, name)(model=None)


def test_count_op_calls_counts_inside_the_block_only():
    import rlhf_fast

    op = rlhf_fast.kl_penalty
    x = torch.zeros(2, 3)
    with count_op_calls("kl_penalty", "aggregate") as calls:
        rlhf_fast.kl_penalty(x, x)
        rlhf_fast.kl_penalty(x, x, estimator="k3")
    rlhf_fast.kl_penalty(x, x)
    assert calls == {"kl_penalty": 2, "aggregate": 0} and rlhf_fast.kl_penalty is op
    with pytest.raises(ValueError, match="no op.*nonexistent"):
        with count_op_calls("nonexistent"):
            pass
