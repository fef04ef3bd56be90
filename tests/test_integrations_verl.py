"""rlhf_fast.integrations.verl against verl's own code (verl 0.9.1, ``pip install --no-deps verl``).

``import verl`` pulls in Ray, so these tests do not import the package: they load the functions they
compare with from the installed verl files themselves (``verl/trainer/ppo/core_algos.py``: ``agg_loss``,
``compute_policy_loss_vanilla`` / ``_gspo`` / ``_cispo`` / ``_sapo`` / ``_geo_mean``, ``kl_penalty``, ``kl_penalty_forward``; ``verl/utils/torch_functional.py``:
``masked_sum``, ``masked_mean``) by parsing the source and compiling those functions alone, and
``verl/utils/experimental/torch_functional.py`` (which imports only torch) as a module. The verl side
runs in float64.
"""

import ast
import importlib.util
import inspect
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch
from peer_wheels import package_dir

import rlhf_fast as rf
from rlhf_fast.integrations import count_op_calls
from rlhf_fast.integrations import verl as rfv

VERL_VERSION = "0.9.1"

# verl's files at the tested version: the installed package if it is that one, else its wheel, fetched once
# (tests/peer_wheels.py); never imported (its __init__ needs Ray)
VERL_DIR = package_dir("verl", VERL_VERSION)


def _functions(relpath: str, names: list[str], namespace: dict) -> dict:
    """Compile the top-level functions ``names`` of the verl file ``relpath`` (decorators dropped) into ``namespace``."""
    tree = ast.parse((VERL_DIR / relpath).read_text())
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert sorted(n.name for n in nodes) == sorted(names), f"verl moved one of {names}"
    for n in nodes:
        n.decorator_list = []
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(VERL_DIR / relpath), "exec"), namespace)
    return namespace


class _AlgoConfig:  # core_algos asserts the config is not an AlgoConfig
    pass


MODES = ("vanilla", "gspo", "cispo", "sapo", "geo_mean")  # verl's loss_modes that rlhf_fast registers
_F = _functions("utils/torch_functional.py", ["masked_sum", "masked_mean"], {"torch": torch})
VERL = _functions(
    "trainer/ppo/core_algos.py",
    ["agg_loss", "kl_penalty", "kl_penalty_forward", *(f"compute_policy_loss_{m}" for m in MODES)],
    {"torch": torch, "Optional": Optional, "Any": Any, "ActorConfig": object, "AlgoConfig": _AlgoConfig, "DictConfig": object,
     "verl_F": SimpleNamespace(**{k: _F[k] for k in ("masked_sum", "masked_mean")})},
)  # fmt: skip


class _Config(dict):
    """What verl's loss reads from its ActorConfig: attributes and ``.get``."""

    __getattr__ = dict.get


def _batch(B=5, T=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).to(dtype)
    old = (logp.double() + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(dtype)
    mask[1] = 0  # a response without any token
    mask[0, :3] = 1
    old[0, :3] = (logp[0, :3].double() - 1.5).to(dtype)  # ratio e^1.5 > clip_ratio_c = 3 ...
    adv[0, :3] = -1.0  # ... with a negative advantage: the dual clip is active
    is_w = torch.rand(B, T, generator=g, dtype=torch.float64).to(dtype) + 0.5
    return logp, old, adv, mask, is_w


GLOBAL = [
    {},  # verl's single-process defaults
    {"dp_size": 4, "batch_num_tokens": 61, "global_batch_size": 13, "loss_scale_factor": 32},
    {"dp_size": 2, "batch_num_tokens": 40.0, "global_batch_size": 9, "loss_scale_factor": None},
]


@pytest.mark.parametrize("bool_mask", [False, True])  # verl's ppo_loss passes response_mask.to(bool)
@pytest.mark.parametrize("global_info", GLOBAL)
@pytest.mark.parametrize("agg", rfv.VERL_AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_matches_verl(mode, agg, global_info, bool_mask):
    logp, old, adv, mask, is_w = _batch()
    if bool_mask:
        mask = mask.bool()
    cfg = _Config(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, tau_pos=1.3,
                  tau_neg=0.8, global_batch_info=global_info)  # fmt: skip
    lp64 = logp.double().requires_grad_()
    m64 = mask if bool_mask else mask.double()
    verl_loss = VERL[f"compute_policy_loss_{mode}"]
    want, want_m = verl_loss(old.double(), lp64, adv.double(), m64, agg, cfg, is_w.double())
    want.backward()
    lp = logp.clone().requires_grad_()
    with count_op_calls("ppo_policy_loss") as calls:
        got, got_m = rfv.POLICY_LOSSES[f"rlhf_fast_{mode}"](old, lp, adv, mask, agg, cfg, is_w)
    assert calls["ppo_policy_loss"] == 1  # the loss is rlhf_fast's op
    got.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lp.grad.double(), lp64.grad, rtol=1e-5, atol=1e-7)
    assert got_m.keys() == want_m.keys()
    for k in want_m:
        assert got_m[k] == pytest.approx(want_m[k], rel=1e-5, abs=1e-7), k
    if mode != "sapo":  # the batch does clip (and, for vanilla and geo_mean, on the negative side too)
        assert want_m["actor/pg_clipfrac"] > 0
        assert (want_m["actor/pg_clipfrac_lower"] > 0) == (mode in ("vanilla", "geo_mean"))


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_defaults_and_no_rollout_weights_match_verl(mode):
    """verl's own defaults (the function's loss_agg_mode, ActorConfig's clip_ratio_c / tau_pos / tau_neg),
    no global figures and no rollout weights."""
    logp, old, adv, mask, _ = _batch(seed=7)
    adv = adv[:, :1].expand_as(adv)  # one advantage per sequence, as GRPO's
    cfg = _Config(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0, tau_pos=1.0,
                  tau_neg=1.05, global_batch_info={})  # fmt: skip
    lp64 = logp.double().requires_grad_()
    want, want_m = VERL[f"compute_policy_loss_{mode}"](old.double(), lp64, adv.double(), mask.bool(), config=cfg)
    want.backward()
    lp = logp.clone().requires_grad_()
    got, got_m = getattr(rfv, f"policy_loss_{mode}")(old, lp, adv, mask.bool(), config=cfg)
    got.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lp.grad.double(), lp64.grad, rtol=1e-5, atol=1e-7)
    assert got_m == pytest.approx(want_m, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("agg", rfv.VERL_AGG_MODES)
def test_agg_scale_is_verl_agg_loss(agg):
    """Every mode and global figure: factor * rf.aggregate == verl's agg_loss, on weights (not only 0/1 masks)."""
    g = torch.Generator().manual_seed(1)
    L = torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=g, dtype=torch.float64) * (torch.rand(6, 9, generator=g) > 0.4)
    mask[4] = 0
    for info in GLOBAL:
        want = VERL["agg_loss"](L, mask, agg, **info)
        name, factor = rfv.agg_scale(mask, agg, **info)
        got = factor * rf.aggregate(L.float(), mask.float(), agg=name)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_agg_scale_demands_global_figures_as_verl_does():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        rfv.agg_scale(mask, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        rfv.agg_scale(mask, "seq-mean-token-mean", dp_size=2)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        rfv.agg_scale(mask, "token_mean")


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "abs+", "k2+"])
def test_kl_penalty_matches_verl(name):
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 4
    ref[0, 0] = logp[0, 0] - 30  # verl's clamps: the log-ratio at 20, k3 at 10
    lp64 = logp.clone().requires_grad_()
    want = VERL["kl_penalty"](lp64, ref, name)
    want.sum().backward()
    lp = logp.float().requires_grad_()
    got = rfv.kl_penalty(lp, ref.float(), name)
    got.sum().backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad.double(), lp64.grad, rtol=1e-5, atol=1e-6)


def test_kl_penalty_full_is_the_exact_kl_where_verl_raises():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    with pytest.raises(NotImplementedError):
        VERL["kl_penalty"](logits, ref_logits, "full")
    lp = torch.log_softmax(logits / 0.7, -1)
    want = (lp.exp() * (lp - torch.log_softmax(ref_logits / 0.7, -1))).sum(-1)
    got = rfv.kl_penalty(None, None, "full", logits=logits.float(), ref_logits=ref_logits.float(), temperature=0.7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logits and ref_logits"):
        rfv.kl_penalty(lp, lp, "full")


def _verl_experimental():
    spec = importlib.util.spec_from_file_location("_verl_experimental_tf", VERL_DIR / "utils/experimental/torch_functional.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", [(13,), (2, 7)])
def test_fused_linear_for_ppo_matches_verl(shape):
    g = torch.Generator().manual_seed(4)
    H, V = 16, 37
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    ids = torch.randint(0, V, shape, generator=g)
    gl, ge = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)

    def run(module, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp, ent = module(h, w, ids, temperature=0.8)
        ((logp.double() * gl).sum() + (ent.double() * ge).sum()).backward()
        return logp, ent, h.grad, w.grad

    want = run(_verl_experimental().FusedLinearForPPO(chunk_size=4, impl_backend="torch"), hidden, weight)
    got = run(rfv.FusedLinearForPPO(), hidden.float(), weight.float())
    assert got[0].shape == shape and got[1].shape == shape
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


def test_register_puts_the_loss_in_a_verl_style_registry():
    registry = {}

    def register_policy_loss(name):  # verl's decorator factory, core_algos.register_policy_loss
        def decorator(fn):
            registry[name] = fn
            return fn

        return decorator

    rfv.register(register_policy_loss)
    assert registry == {f"rlhf_fast_{m}": getattr(rfv, f"policy_loss_{m}") for m in MODES}
    assert tuple(registry) == rfv.LOSS_NAMES
    for name, fn in registry.items():  # verl's signature, names and defaults
        verl_fn = VERL[f"compute_policy_loss_{name[len('rlhf_fast_'):]}"]
        assert inspect.signature(fn).parameters.keys() == inspect.signature(verl_fn).parameters.keys()
        assert fn.__defaults__ == verl_fn.__defaults__, name


def _rollout_defaults() -> dict:
    """verl's ``RolloutConfig`` sampling fields and their defaults, read from the installed file (so a renamed
    or re-defaulted field fails here)."""
    tree = ast.parse((VERL_DIR / "workers/config/rollout.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RolloutConfig")
    fields = {n.target.id: n.value for n in cls.body if isinstance(n, ast.AnnAssign) and n.value is not None}
    keys = ("top_k", "top_p", "do_sample", "repetition_penalty")
    return {k: ast.literal_eval(fields[k]) for k in keys}


def test_rollout_truncation_reads_verls_rollout_config():
    defaults = _rollout_defaults()
    assert defaults == {"top_k": -1, "top_p": 1.0, "do_sample": True, "repetition_penalty": 1.0}
    cfg = SimpleNamespace(name="vllm", **defaults)
    assert rfv.rollout_truncation(cfg) == {}  # verl's defaults: the full softmax
    assert rfv.rollout_truncation(SimpleNamespace(**{**vars(cfg), "top_k": 50, "top_p": 0.9})) == dict(
        top_k=50, top_p=0.9, sampler="vllm")
    assert rfv.rollout_truncation(SimpleNamespace(**{**vars(cfg), "name": "hf", "top_p": 0.8})) == dict(
        top_p=0.8, sampler="hf")
    for change, match in ((dict(name="sglang"), "name='sglang'"), (dict(do_sample=False), "do_sample=False"),
                          (dict(repetition_penalty=1.2), "repetition_penalty=1.2")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            rfv.rollout_truncation(SimpleNamespace(**{**vars(cfg), "top_k": 20, **change}))


def test_fused_linear_for_ppo_with_truncation_is_the_truncated_distributions():
    """``FusedLinearForPPO(truncation=...)`` against the float64 truncated reference (vLLM's sampler):
    log-probs (``-inf`` outside the kept set), entropy and gradients; off values are the plain module."""
    from rlhf_fast.reference import truncated_logprobs_reference

    g = torch.Generator().manual_seed(9)
    H, V, shape, T = 16, 41, (3, 5), 0.8
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    ids = torch.randint(0, V, shape, generator=g)
    ids[:, ::2] = (hidden @ weight.T)[:, ::2].argmax(-1)  # kept labels next to (mostly) missed random ones
    gl, ge = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    trunc = dict(top_k=6, top_p=0.85, sampler="vllm")
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want_lp, want_ent = truncated_logprobs_reference(h64 @ w64.T, ids, temperature=T, **trunc)
    missed = torch.isinf(want_lp)
    assert missed.any() and not missed.all()
    ((want_lp.masked_fill(missed, 0) * gl).sum() + (want_ent * ge).sum()).backward()
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    lp, ent = rfv.FusedLinearForPPO(truncation=trunc)(h, w, ids, temperature=T)
    assert torch.equal(torch.isinf(lp), missed)
    ((lp.masked_fill(missed, 0).double() * gl).sum() + (ent.double() * ge).sum()).backward()
    torch.testing.assert_close(lp.masked_fill(missed, 0).double(), want_lp.detach().masked_fill(missed, 0), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), want_ent.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    off = rfv.FusedLinearForPPO(truncation=rfv.rollout_truncation(SimpleNamespace(name="vllm", top_k=-1, top_p=1.0)))
    plain = rfv.FusedLinearForPPO()
    for a, b in zip(off(hidden.float(), weight.float(), ids, 0.8), plain(hidden.float(), weight.float(), ids, 0.8)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="truncation takes"):
        rfv.FusedLinearForPPO(truncation={"top_n": 3})
