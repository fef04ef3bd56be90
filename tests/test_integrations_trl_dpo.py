"""rlhf_fast.integrations.trl.DPOTrainer's reference log-probs against stock TRL 1.16's, trained for real.

At the first step the policy is the reference, so stock TRL logs DPO rewards, margins and accuracies of
exactly 0 (and the loss log 2): ours must log the same, in float32 and in TRL's default bf16 (CPU autocast
here), with the reference model run each step or precomputed by TRL's constructor
(``precompute_ref_log_probs``). That holds only if the reference log-probs come from the same head and the
same precision as the policy's.
"""

import json
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import load_dataset  # noqa: E402
from test_integrations_trl import DPO_ROWS, _dpo, model_dir  # noqa: E402, F401

from rlhf_fast.integrations import count_op_calls  # noqa: E402
from rlhf_fast.integrations import trl as rft  # noqa: E402

EXACT_AT_STEP_1 = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _first_step_logs(cls, model_dir, tmp_path, **cfg):
    """The metrics the trainer logs for its first (only) training step, and its linear_logprobs calls."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's tokenization notes on this toy dataset
        trainer = _dpo(cls, model_dir, tmp_path, **cfg)
        with count_op_calls("linear_logprobs") as calls:
            trainer.train()
    return trainer, trainer.state.log_history[0], calls["linear_logprobs"]


@pytest.mark.parametrize("precompute", [False, True], ids=["ref-model", "precomputed"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_dpo_step_1_rewards_equal_stock_exactly(model_dir, tmp_path, bf16, precompute):
    cfg = dict(bf16=bf16, precompute_ref_log_probs=precompute)
    ours, got, our_calls = _first_step_logs(rft.DPOTrainer, model_dir, tmp_path, **cfg)
    stock, want, stock_calls = _first_step_logs(trl.DPOTrainer, model_dir, tmp_path, **cfg)
    assert ours._rf_unsupported is None and ours.accelerator.mixed_precision == ("bf16" if bf16 else "no")
    # our head scores the policy, and the reference in the constructor or at each step; stock keeps TRL's own
    assert (our_calls, stock_calls) == (1 if precompute else 2, 0)
    for key in EXACT_AT_STEP_1:
        assert want[key] == 0.0, key  # policy = reference: stock TRL's are exact
        assert got[key] == want[key], (key, got[key])
    assert got["loss"] == want["loss"] == pytest.approx(0.6931, abs=1e-4)  # -log sigmoid(0) = log 2
    assert got["logps/chosen"] == pytest.approx(want["logps/chosen"], rel=1e-5 if not bf16 else 1e-3)


def test_dpo_precomputed_reference_is_not_read_from_stock_trl_cache(model_dir, tmp_path):
    """TRL caches precomputed reference log-probs under the hash of the dataset and the weights; with a dataset
    on disk, stock TRL's cache (its own head's log-probs) must not be read as ours, nor ours as stock's."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(dict(zip(DPO_ROWS, row))) + "\n" for row in zip(*DPO_ROWS.values())))

    def disk_run(cls):
        data = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
        # one output_dir for both trainers (TRL's dataset fingerprints depend on it): a user swapping the class
        return _first_step_logs(cls, model_dir, tmp_path, data=data, output_dir=str(tmp_path / "out"), bf16=False,
                                precompute_ref_log_probs=True)  # fmt: skip

    _, want, _ = disk_run(trl.DPOTrainer)
    for cls in (rft.DPOTrainer, trl.DPOTrainer):  # ours after stock's cache, then stock after ours
        _, got, _ = disk_run(cls)
        for key in EXACT_AT_STEP_1:
            assert want[key] == 0.0 and got[key] == 0.0, (cls.__module__, key, got[key])


def test_dpo_bf16_reference_forward_runs_under_autocast_as_stock(model_dir, tmp_path):
    """The reference model's per-step log-probs: TRL wraps its forward in accelerate's bf16 autocast, so ours
    (under that wrapper) equal our policy head's on the same weights, bit for bit, and so equal them as stock's
    reference equals stock's policy."""
    for cls in (trl.DPOTrainer, rft.DPOTrainer):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = _dpo(cls, model_dir, tmp_path, bf16=True)
        t.model.eval()
        batch = t._prepare_inputs(next(iter(t.get_train_dataloader())))
        kwargs = {k: v for k, v in batch.items() if k not in ("completion_mask",)}
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        with torch.no_grad():
            ref = t.ref_model(**kwargs, labels=labels, fused_lm_head=True).log_probs
            with t.accelerator.autocast():  # as the Trainer runs the policy
                policy = t.model(**kwargs, labels=labels, fused_lm_head=True).log_probs
        assert ref.dtype == policy.dtype == torch.float32 and (labels[:, 1:] != -100).sum() > 8
        assert torch.equal(ref, policy), (cls.__module__, (ref - policy).abs().max().item())


def test_dpo_without_trl_head_call_warns_and_runs_stock(model_dir, tmp_path, monkeypatch):
    """Should TRL's constructor never put its fused head on a model (our head follows that call), the
    trainer says so and computes stock TRL's loss."""
    import contextlib

    monkeypatch.setattr(rft, "after_trl_heads", lambda module, callback: contextlib.nullcontext())
    rft.warn_once.cache_clear()
    with pytest.warns(UserWarning, match="added no fused LM head.*stock TRL"):
        ours = _dpo(rft.DPOTrainer, model_dir, tmp_path, bf16=False)
    stock = _dpo(trl.DPOTrainer, model_dir, tmp_path, bf16=False)
    batch = stock._prepare_inputs(next(iter(stock.get_train_dataloader())))
    with count_op_calls("linear_logprobs", "dpo_loss") as calls:
        got = ours.compute_loss(ours.model, dict(batch))
    assert calls == {"linear_logprobs": 0, "dpo_loss": 0}
    assert torch.equal(got, stock.compute_loss(stock.model, dict(batch)))
