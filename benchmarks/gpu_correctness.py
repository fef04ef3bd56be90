"""Native correctness of every Triton kernel: the GPU suite's second section (``benchmarks/gpu_suite.py``).

Each :class:`Case` runs one public op with ``impl="triton"`` (one launcher specialisation: entropy or
log-probs only, bias or none, a reference model or none, ...) and checks its outputs and gradients against
float64, with the bar the CPU tests use (``tests/reference.py`` ``assert_no_worse``): the error against the
float64 composition at most 1.25x that of the same plain-PyTorch composition in the input dtype, plus a
margin of ``rel_margin`` of the scale (and half an ulp for bf16/fp16 results); float32 results must in
addition be within the absolute bar the tests put on them (``fp32_tol``, relative to the scale).
Inputs come from the op benchmarks' own ``make_inputs`` (the same data as the timings).

Adding a kernel (or a specialisation) is one more :class:`Case` in :data:`CASES`; ``test_gpu_suite`` checks
that every kernel of ``rlhf_fast.kernels._aot.all_builds()`` is exercised by some case.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

import rlhf_fast as rf
from rlhf_fast.reference import (
    linear_dpo_loss_reference,
    logprobs_reference,
    truncated_logprobs_reference,
    pairwise_sigmoid_loss_reference,
    ppo_loss_reference,
)

from . import bench_gae, bench_linear_dpo, bench_linear_logprobs, bench_logprobs, bench_pairwise, bench_ppo
from . import bench_sampling

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 2^31: a [N, V] tensor with more elements than this needs 64-bit offsets in the kernels
INT32_LIMIT = 2**31
# Test hook: RLHF_FAST_SUITE_INJECT=<case name substring> perturbs that case's Triton outputs, so that the
# table can be seen to FAIL (tests/test_gpu_suite.py). Never set in a real run (the summary says if it was).
INJECT_ENV = "RLHF_FAST_SUITE_INJECT"


@dataclass(frozen=True)
class Case:
    """One op in one launcher specialisation.

    ``inputs(shape, dtype, device)`` builds the inputs; ``grad_inputs`` are differentiated.
    ``ours(inputs)`` runs the Triton kernels and ``reference(inputs)`` the plain composition; both return a
    dict of named outputs. The reference runs twice: on float64 copies (the truth) and on the inputs as
    they are (the plain-PyTorch bar). ``row_inputs``: inputs indexed by row along dim 0 (row-wise ops): for
    shapes too large for a float64 copy, only some rows are checked (``Shape.rows``).
    """

    name: str
    kernels: tuple[str, ...]  # the kernel functions it launches
    inputs: Callable[[tuple, torch.dtype, torch.device], dict]
    grad_inputs: tuple[str, ...]
    ours: Callable[[dict], dict]
    reference: Callable[[dict], dict]
    shapes: dict[str, tuple[int, ...]]  # label -> shape, on CUDA
    dry_shapes: dict[str, tuple[int, ...]]  # label -> shape, for --dry-run on CPU
    dtypes: tuple[torch.dtype, ...] = DTYPES
    rel_margin: float | Callable[[tuple], float] = 2e-6  # a callable: of the shape
    fp32_tol: float | None = None  # float32: |ours - truth| <= fp32_tol * scale as well
    row_inputs: tuple[str, ...] = ()
    check: Callable[[dict, dict, dict], list[dict]] | None = None  # custom comparison (the sampler)
    big: dict[str, int] = field(default_factory=dict)  # label -> rows checked for a shape too big for float64


# ------------------------------------------------------------------------------------------- the bar


def no_worse(quantity: str, ours: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, *, rel_margin: float,
             fp32_tol: float | None) -> dict:  # fmt: skip
    """``tests/reference.py``'s ``assert_no_worse`` as a measurement: error, bar, pass."""
    truth = truth.double()
    scale = 1.0 + (truth.abs().max().item() if truth.numel() else 0.0)
    margin = rel_margin * scale
    if ours.dtype in (torch.bfloat16, torch.float16):
        margin += 0.5 * torch.finfo(ours.dtype).eps * scale
    err = (ours.double() - truth).abs().max().item() if truth.numel() else 0.0
    plain_err = (plain.double() - truth).abs().max().item() if truth.numel() else 0.0
    bar = 1.25 * plain_err + margin
    bar_text = f"1.25 x plain {str(plain.dtype).removeprefix('torch.')} ({plain_err:.3g}) + {margin:.2g}"
    if fp32_tol is not None and ours.dtype == torch.float32 and plain.dtype == torch.float32:
        bar = min(bar, fp32_tol * scale)  # the tests' float32 assert_close holds as well
        bar_text += f", at most {fp32_tol:g} x scale"
    ok = math.isfinite(err) and err <= bar
    return {"quantity": quantity, "max_abs_err": err, "bar": bar, "bar_rule": bar_text, "scale": scale, "ok": ok}


# ------------------------------------------------------------------------------------------ running


def _to(inputs: dict, dtype: torch.dtype | None, grad: tuple[str, ...]) -> dict:
    """Detached copies (float inputs cast to ``dtype`` if given), the ``grad`` ones requiring grad."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.detach()
            v = v.to(dtype) if dtype is not None and v.is_floating_point() else v.clone()
            out[k] = v.requires_grad_(k in grad)
        else:
            out[k] = v
    return out


def _forward_backward(fn, inputs: dict, grad: tuple[str, ...], cot: dict | None):
    outs = fn(inputs)
    diff = {k: v for k, v in outs.items() if v.requires_grad}
    if cot is None:
        gen = torch.Generator(device=next(iter(outs.values())).device).manual_seed(1)
        cot = {k: torch.randn(v.shape, generator=gen, device=v.device, dtype=torch.float32) for k, v in diff.items()}
    grads = {}
    if diff and grad:
        wide = {k: v if v.dtype == torch.float64 else v.float() for k, v in diff.items()}
        loss = sum((v * cot[k].to(v)).sum() for k, v in wide.items())
        gs = torch.autograd.grad(loss, [inputs[k] for k in grad])
        grads = {f"d_{k}": g for k, g in zip(grad, gs)}
    return {k: v.detach() for k, v in outs.items()}, grads, cot


def run_case(case: Case, label: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> dict:
    """Measure one (case, shape, dtype): a row of the table. Never raises."""
    row = {"case": case.name, "kernels": list(case.kernels), "shape_label": label, "shape": list(shape),
           "dtype": str(dtype).removeprefix("torch."), "device": device.type}  # fmt: skip
    try:
        base = case.inputs(tuple(shape), dtype, device)
        ours_in = _to(base, None, case.grad_inputs)
        ours_out, ours_grads, cot = _forward_backward(case.ours, ours_in, case.grad_inputs, None)
        del ours_in
        rows_checked = case.big.get(label)
        if rows_checked:  # the first and last rows only: a float64 copy of the whole would not fit
            n = next(iter(base[k] for k in case.row_inputs)).shape[0]
            idx = torch.cat([torch.arange(rows_checked // 2), torch.arange(n - rows_checked // 2, n)]).to(device)
            base = {k: (v.detach()[idx] if k in case.row_inputs else v) for k, v in base.items()}
            ours_out = {k: v[idx] for k, v in ours_out.items()}
            ours_grads = {k: v[idx] for k, v in ours_grads.items()}
            cot = {k: v[idx] for k, v in cot.items()}
            row["rows_checked"] = f"first and last {rows_checked // 2} of {n}"
        truth_out, truth_grads, _ = _forward_backward(case.reference, _to(base, torch.float64, case.grad_inputs),
                                                      case.grad_inputs, cot)  # fmt: skip
        if os.environ.get(INJECT_ENV) and os.environ[INJECT_ENV] in case.name:  # a kernel gone wrong
            ours_out = {k: v + 0.1 * (1 + v.abs()) if v.is_floating_point() else v for k, v in ours_out.items()}
            row["injected_error"] = True
        ours_all, truth_all = {**ours_out, **ours_grads}, {**truth_out, **truth_grads}
        if case.check is not None:
            checks = case.check(ours_all, truth_all, base)
        else:
            plain_out, plain_grads, _ = _forward_backward(case.reference, _to(base, None, case.grad_inputs),
                                                          case.grad_inputs, cot)  # fmt: skip
            plain_all = {**plain_out, **plain_grads}
            margin = case.rel_margin(tuple(shape)) if callable(case.rel_margin) else case.rel_margin
            checks = [no_worse(q, ours_all[q], plain_all[q], truth_all[q], rel_margin=margin, fp32_tol=case.fp32_tol)
                      for q in ours_all]  # fmt: skip
        worst = max(checks, key=lambda c: c["max_abs_err"] / c["bar"] if c["bar"] > 0 else math.inf)
        row.update(checks=checks, status="PASS" if all(c["ok"] for c in checks) else "FAIL",
                   worst=worst["quantity"], worst_err=worst["max_abs_err"], worst_bar=worst["bar"])  # fmt: skip
    except Exception as exc:  # a crash is a failure of the case, reported, and the section goes on
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row.update(status="ERROR", reason=f"{type(exc).__name__}: {first}"[:300])
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def planned(dry_run: bool) -> list[tuple[Case, str, tuple, torch.dtype]]:
    """Every (case, shape label, shape, dtype) the section runs, cheapest shapes first."""
    out = []
    for case in CASES:
        shapes = case.dry_shapes if dry_run else case.shapes
        for label, shape in shapes.items():
            for dtype in case.dtypes:
                out.append((case, label, shape, dtype))
    order = {"odd": 0, "big": 1, "real": 2}  # the N·V > 2^31 case (64-bit offsets) before the real shapes
    return sorted(out, key=lambda t: order.get(t[1], 0))


# --------------------------------------------------------------------------------------------- cases


def _logprobs_case(name: str, return_entropy: bool, inplace: bool = False) -> Case:
    def ours(x):
        kw = dict(return_entropy=return_entropy, impl="triton", temperature=0.7)
        if inplace:  # the gradient overwrites the logits buffer: give it its own copy
            x = {**x, "logits": x["logits"] * 1}
            kw["inplace_backward"] = True
        out = rf.logprobs(x["logits"], x["labels"], **kw)
        return {"logp": out[0], "entropy": out[1]} if return_entropy else {"logp": out}

    def reference(x):
        logp, ent = logprobs_reference(x["logits"], x["labels"], temperature=0.7)
        return {"logp": logp, "entropy": ent} if return_entropy else {"logp": logp}

    big_rows = INT32_LIMIT // 151936 + 200  # N·V > 2^31
    return Case(name, ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"), bench_logprobs.make_inputs, ("logits",),
                ours, reference, shapes={"odd": (37, 1001), "real": (2048, 151936),
                                         **({"big": (big_rows, 151936)} if return_entropy and not inplace else {})},
                dry_shapes={"odd": (5, 67)}, fp32_tol=1e-5, row_inputs=("logits", "labels"),
                big={"big": 256})  # fmt: skip


def _linear_inputs(bias: bool):
    def make(shape, dtype, device):
        x = bench_linear_logprobs.make_inputs(shape, dtype, device)
        if bias:
            gen = torch.Generator(device=device).manual_seed(2)
            x["bias"] = torch.randn(shape[2], generator=gen, device=device).to(dtype)
        return x

    return make


def _linear_case(name: str, bias: bool, return_entropy: bool) -> Case:
    def ours(x):
        out = rf.linear_logprobs(x["hidden"], x["weight"], x["labels"], bias=x.get("bias"), impl="triton",
                                 return_entropy=return_entropy)  # fmt: skip
        return {"logp": out[0], "entropy": out[1]} if return_entropy else {"logp": out}

    def reference(x):
        logits = torch.nn.functional.linear(x["hidden"], x["weight"], x.get("bias"))
        logp, ent = logprobs_reference(logits, x["labels"])
        return {"logp": logp, "entropy": ent} if return_entropy else {"logp": logp}

    grad = ("hidden", "weight") + (("bias",) if bias else ())
    return Case(name, ("_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_kernel"), _linear_inputs(bias), grad,
                ours, reference, shapes={"odd": (77, 129, 1001), "real": (512, 4096, 151936)},
                dry_shapes={"odd": (6, 16, 40)}, rel_margin=5e-6, fp32_tol=2e-5)  # fmt: skip


def _kl_inputs(shape, dtype, device):
    x = bench_logprobs.make_inputs(shape, dtype, device)
    gen = torch.Generator(device=device).manual_seed(3)
    ref = x["logits"].detach().float() + 0.5 * torch.randn(shape, generator=gen, device=device)
    return {"logits": x["logits"], "ref_logits": ref.to(dtype)}


def _kl_reference(x):
    log_p = torch.log_softmax(x["logits"] / 0.7, -1)
    log_q = torch.log_softmax(x["ref_logits"].to(x["logits"].dtype) / 0.7, -1)
    diff = torch.where(log_p == -float("inf"), 0.0, log_p - log_q)
    return {"kl": (torch.softmax(x["logits"] / 0.7, -1) * diff).sum(-1)}


def _ppo_case(name: str, ref: bool, estimator: str) -> Case:
    kw = dict(kl_coef=0.1 if ref else 0.0, kl_estimator=estimator, entropy_coef=0.01, dual_clip=3.0 if ref else None)

    def ours(x):
        loss, _ = rf.ppo_loss_from_logits(x["logits"], x["labels"], x["old_logp"], x["advantages"], x["mask"],
                                          ref_logp=x["ref_logp"] if ref else None, impl="triton", **kw)  # fmt: skip
        return {"loss": loss}

    def reference(x):
        return {"loss": ppo_loss_reference(x["logits"], x["labels"], x["old_logp"], x["advantages"], x["mask"],
                                           ref_logp=x["ref_logp"] if ref else None, **kw)}  # fmt: skip

    return Case(name, ("_ppo_fwd_kernel", "_logprobs_bwd_kernel"), bench_ppo.make_inputs, ("logits",), ours, reference,
                shapes={"odd": (3, 37, 1001), "real": (4, 512, 151936)}, dry_shapes={"odd": (2, 5, 67)},
                fp32_tol=1e-5)  # fmt: skip


def _gae_loop(x):
    """GAE by its definition, a reverse loop over time (vectorized over rows); masked steps are skipped."""
    r, v, m = x["rewards"], x["values"], x["mask"] > 0
    B, T = r.shape
    adv, ret = torch.zeros_like(r), torch.zeros_like(r)
    next_v, next_a = torch.zeros(B, dtype=r.dtype, device=r.device), torch.zeros(B, dtype=r.dtype, device=r.device)
    for t in reversed(range(T)):
        a = r[:, t] + _GAMMA * next_v - v[:, t] + _GAMMA * _LAM * next_a
        on = m[:, t]
        adv[:, t] = torch.where(on, a, 0.0)
        ret[:, t] = torch.where(on, a + v[:, t], 0.0)
        next_v, next_a = torch.where(on, v[:, t], next_v), torch.where(on, a, next_a)
    return {"advantages": adv, "returns": ret}


_GAMMA, _LAM = 0.99, 0.95


def _gae_ours(x, with_mask: bool):
    adv, ret = rf.gae(x["rewards"], x["values"], x["mask"] if with_mask else None, gamma=_GAMMA, lam=_LAM,
                      impl="triton")  # fmt: skip
    return {"advantages": adv, "returns": ret}


def _gae_inputs(with_mask: bool):
    def make(shape, dtype, device):
        x = bench_gae.make_inputs(shape, dtype, device)
        if not with_mask:
            x["mask"] = torch.ones_like(x["mask"])
        return x

    return make


def _sampler_check(ours: dict, truth: dict, base: dict) -> list[dict]:
    """Gumbel-max: our token's float64 score may fall short of the best only by float32 rounding of the score."""
    score = truth["score"]
    best = score.max(-1).values
    got = score.gather(-1, ours["token"].long().unsqueeze(-1)).squeeze(-1)
    err = (best - got).max().item()
    scale = 1.0 + score.abs().max().item()
    bar = 4 * torch.finfo(torch.float32).eps * scale
    return [{"quantity": "token (score gap to float64 argmax)", "max_abs_err": err, "bar": bar,
             "bar_rule": "4 float32 ulps of the score (near-exact ties)", "scale": scale, "ok": err <= bar,
             "mismatched_rows": int((ours["token"].long() != score.argmax(-1)).sum())}]  # fmt: skip


def _sampler_reference(x):
    from rlhf_fast.sampling import gumbel_noise

    noise = gumbel_noise(x["seeds"], 3, x["logits"].shape[-1]).to(x["logits"].dtype)
    return {"score": x["logits"] / 0.7 + noise}


_TRUNCATION = dict(top_k=50, top_p=0.95, temperature=0.7)


def _truncated_inputs(shape, dtype, device):
    """``bench_logprobs``' logits with each row's label its largest logit: always in the kept set, so every
    log-prob is finite (a missed label's ``-inf`` has no error to measure; tests/test_truncation.py covers it)."""
    x = bench_logprobs.make_inputs(shape, dtype, device)
    return {**x, "labels": x["logits"].argmax(-1)}


def _truncated_ours(x):
    logp, ent = rf.logprobs(x["logits"], x["labels"], return_entropy=True, impl="triton", **_TRUNCATION)
    return {"logp": logp, "entropy": ent}


def _truncated_reference(x):
    logp, ent = truncated_logprobs_reference(x["logits"], x["labels"], **_TRUNCATION)
    return {"logp": logp, "entropy": ent}


CASES: list[Case] = [
    _logprobs_case("logprobs +entropy", return_entropy=True),
    _logprobs_case("logprobs logp only", return_entropy=False),
    _logprobs_case("logprobs inplace_backward", return_entropy=True, inplace=True),
    Case("logprobs top_k=50 top_p=0.95 (truncated)",
         ("_row_threshold_kernel", "_logprobs_fwd_kernel", "_logprobs_bwd_kernel"), _truncated_inputs, ("logits",),
         _truncated_ours, _truncated_reference, shapes={"odd": (37, 1001), "real": (256, 151936)},
         dry_shapes={"odd": (5, 67)}, fp32_tol=1e-5, row_inputs=("logits", "labels")),
    _linear_case("linear_logprobs bias +entropy", bias=True, return_entropy=True),
    _linear_case("linear_logprobs no bias, logp only", bias=False, return_entropy=False),
    Case("full_kl", ("_full_kl_fwd_kernel", "_full_kl_bwd_kernel"), _kl_inputs, ("logits",),
         lambda x: {"kl": rf.full_kl(x["logits"], x["ref_logits"], temperature=0.7, impl="triton")}, _kl_reference,
         shapes={"odd": (37, 1001), "real": (1024, 151936)}, dry_shapes={"odd": (5, 67)}, fp32_tol=1e-5),
    _ppo_case("ppo_loss_from_logits no ref", ref=False, estimator="k3"),
    _ppo_case("ppo_loss_from_logits ref k3, dual clip", ref=True, estimator="k3"),
    _ppo_case("ppo_loss_from_logits ref k1, dual clip", ref=True, estimator="k1"),
    Case("gae mask", ("_gae_kernel",), _gae_inputs(True), (), lambda x: _gae_ours(x, True), _gae_loop,
         shapes={"odd": (3, 77, 5), "real": (256, 2048, 8)}, dry_shapes={"odd": (2, 40, 1)},
         dtypes=(torch.float32, torch.bfloat16)),
    Case("gae no mask", ("_gae_kernel",), _gae_inputs(False), (), lambda x: _gae_ours(x, False), _gae_loop,
         shapes={"odd": (3, 77), "real": (256, 2048)}, dry_shapes={"odd": (2, 9)}, dtypes=(torch.float32,)),
    Case("pairwise_sigmoid_loss margin", ("_pairwise_sigmoid_kernel",), bench_pairwise.make_inputs,
         ("chosen", "rejected"),
         lambda x: {"loss": rf.pairwise_sigmoid_loss(x["chosen"], x["rejected"], margin=x["margin"], beta=0.5,
                                                     impl="triton")},
         lambda x: {"loss": pairwise_sigmoid_loss_reference(x["chosen"], x["rejected"], margin=x["margin"], beta=0.5)},
         shapes={"odd": (1001,), "real": (4096,)}, dry_shapes={"odd": (33,)}),
    Case("pairwise_sigmoid_loss no margin", ("_pairwise_sigmoid_kernel",), bench_pairwise.make_inputs,
         ("chosen", "rejected"),
         lambda x: {"loss": rf.pairwise_sigmoid_loss(x["chosen"], x["rejected"], beta=0.5, impl="triton")},
         lambda x: {"loss": pairwise_sigmoid_loss_reference(x["chosen"], x["rejected"], beta=0.5)},
         shapes={"odd": (1001,), "real": (4096,)}, dry_shapes={"odd": (33,)}),
    Case("linear_dpo_loss", ("_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_kernel"),
         bench_linear_dpo.make_inputs, ("hidden", "weight"),
         lambda x: {"loss": rf.linear_dpo_loss(x["hidden"], x["weight"], x["labels"], x["ref_chosen_logp"],
                                               x["ref_rejected_logp"], beta=0.1, impl="triton")[0]},
         lambda x: {"loss": linear_dpo_loss_reference(x["hidden"], x["weight"], x["labels"], x["ref_chosen_logp"],
                                                      x["ref_rejected_logp"], beta=0.1)[0]},
         shapes={"odd": (2, 37, 129, 1001), "real": (2, 512, 4096, 151936)}, dry_shapes={"odd": (1, 6, 16, 40)},
         rel_margin=lambda shape: 5e-6 * shape[1]),  # summed over T tokens, as in tests/test_linear_dpo.py
    Case("sampler (Gumbel-max)", ("_gumbel_argmax_kernel",), bench_sampling.make_inputs, (),
         lambda x: {"token": rf.sample_tokens(
             x["logits"], x["seeds"], 3, 0.7, impl="triton")},
         _sampler_reference, shapes={"odd": (37, 1001), "real": (256, 151936)}, dry_shapes={"odd": (5, 67)},
         check=_sampler_check),
]
