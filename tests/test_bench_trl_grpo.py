"""``python -m benchmarks.bench_trl_grpo`` end to end on the tiny preset: stock ``trl.GRPOTrainer`` and
``rlhf_fast.integrations.trl.GRPOTrainer`` each run real GRPO steps in their own process, and the results
say so; the same-start check fails loudly when the runs differ."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import native_env

pytest.importorskip("trl")

from benchmarks import bench_trl_grpo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny preset, written where the GPU suite's trainer section puts it (``<suite out>/trainer``)."""
    suite_out = tmp_path_factory.mktemp("suite")
    out = suite_out / "trainer"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_trl_grpo", "--preset", "tiny", "--out", str(out)],
                          cwd=REPO, env=native_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return suite_out


def test_tiny_preset_end_to_end(tiny_run):
    out = tiny_run / "trainer"
    payload = json.loads((out / "trl_grpo.json").read_text())
    meta, results = payload["meta"], payload["results"]
    assert meta["preset"] == "tiny" and meta["trl"] and meta["commit"] and len(meta["load_average"]) == 3
    assert meta["same_start"]["same_weights"] and meta["same_start"]["rtol"] == 1e-4  # float32
    steps = bench_trl_grpo.PRESETS["tiny"]["steps"]
    assert [r["trainer"] for r in results] == ["stock", "rlhf_fast"]
    assert results[0]["class"] == "trl.trainer.grpo_trainer.GRPOTrainer"
    assert results[1]["class"] == "rlhf_fast.integrations.trl.GRPOTrainer"
    for r in results:
        assert r["status"] == "ok" and r["steps"] == steps and len(r["step_s_all"]) == steps, r
        assert r["step_s"] > 0 and r["compute_loss_s"] > 0 and r["backward_s"] > 0
        assert r["step_s"] > r["compute_loss_s"] + r["backward_s"]  # generation and the optimizer are in the step
        assert r["peak_memory"]["peak_extra_mib"] >= 0 and r["first_grad_norm"] > 0
        assert r["num_tokens"] > 0
    # the stock run touched no rlhf_fast op; ours scored (policy and reference) and took its loss on them
    assert not any(results[0]["rf_calls"].values())
    assert results[1]["rf_calls"]["ppo_policy_loss"] == steps and results[1]["rf_calls"]["kl_penalty"] == steps
    assert results[1]["rf_calls"]["linear_logprobs"] >= 2 * steps
    md = (out / "trl_grpo.md").read_text()
    assert "| stock |" in md and "| rlhf_fast |" in md and "Same start: identical weights" in md
    assert f"load average {meta['load_average'][0]:.1f}" in md


def _result(trainer, rf_calls, weights=((1.0, 2.0, 3.0),), loss=0.5, grad_norm=2.0):
    return {"trainer": trainer, "rf_calls": rf_calls, "weights": {"policy": [list(w) for w in weights],
            "reference": [[1.0, 2.0, 3.0]]}, "first_loss": loss, "first_grad_norm": grad_norm}  # fmt: skip


STOCK = {"linear_logprobs": 0, "ppo_policy_loss": 0, "kl_penalty": 0}
OURS = {"linear_logprobs": 4, "ppo_policy_loss": 2, "kl_penalty": 2}


def test_same_start_check_fails_loudly():
    ok = bench_trl_grpo.check_same_start([_result("stock", STOCK), _result("rlhf_fast", OURS, grad_norm=2.0001)], False)
    assert ok["same_weights"] and ok["abs_diff"]["first_grad_norm"] == pytest.approx(1e-4)
    with pytest.raises(RuntimeError, match="policy models .* differ"):
        bench_trl_grpo.check_same_start([_result("stock", STOCK), _result("rlhf_fast", OURS, weights=((1.0, 2.0, 3.5),))],
                                        False)  # fmt: skip
    with pytest.raises(RuntimeError, match="first_grad_norm"):
        bench_trl_grpo.check_same_start([_result("stock", STOCK), _result("rlhf_fast", OURS, grad_norm=2.01)], False)
    # bf16 allows 5e-2 relative, not more
    bench_trl_grpo.check_same_start([_result("stock", STOCK), _result("rlhf_fast", OURS, grad_norm=2.05)], True)
    with pytest.raises(RuntimeError, match="first_loss"):
        bench_trl_grpo.check_same_start([_result("stock", STOCK), _result("rlhf_fast", OURS, loss=0.6)], True)
    with pytest.raises(RuntimeError, match="rlhf_fast ops called"):  # our run must have used our ops
        bench_trl_grpo.check_same_start([_result("stock", STOCK), _result("rlhf_fast", STOCK)], False)


def test_gpu_suite_summary_shows_the_grpo_item(tiny_run):
    """The suite's summary reads the benchmark's files (here as after a section killed before it recorded
    them: ``trainer/trl_grpo.json`` only) into its TRL GRPO table; the item is in the trainer section's plan."""
    from benchmarks import gpu_suite

    assert gpu_suite.TRAINER_PLANNED_S["trl_grpo"] > 0
    trainer = next(s for s in gpu_suite.SECTIONS if s.name == "trainer")
    assert trainer.planned_s == sum(gpu_suite.TRAINER_PLANNED_S.values())
    ctx = gpu_suite.Context(tiny_run, True, 0.0, "rlhf-fast bench gpu --dry-run")
    gpu_suite.write_summary(tiny_run, {"meta": ctx.meta(), "sections": []})
    md = (tiny_run / "summary.md").read_text()
    table = md[md.index("### TRL GRPO step"):]
    assert "| stock |" in table and "| rlhf_fast |" in table and "same start checked" in table
    saved = json.loads((tiny_run / "summary.json").read_text())["trainer"]["trl_grpo"]
    assert [r["trainer"] for r in saved["results"]] == ["stock", "rlhf_fast"]
