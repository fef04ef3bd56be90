"""Truncated sampling (top_k / top_p / min_p) with ``process_group``: on a vocabulary split over 2 and 4 gloo
processes (odd, unequal slices), every truncated op equals the float64 reference on the whole vocabulary
(rlhf_fast/reference.py ``truncated_logprobs_reference``, the issue's 2e-5 bar): log-probs (``-inf`` exactly
where the label is outside the kept set, never NaN), entropy, and each rank's gradients, with an upstream
gradient on every row (a missed label's row must get no log-prob gradient on any rank). The two PPO ops
equal their own one-process result. Both impls (Triton under the interpreter): small shapes.

Cases: top-k, top-p, min-p alone and combined, both samplers, per-row tensors with some rows off (so that
top-p takes both of its paths: from the gathered top-k values, and the search without top-k), a flat row
set whose nucleus is wider than 256 tokens (the gathered prefix widens), a row whose slice on rank 0 is all
``-inf``, ignored labels, temperature != 1.

Arguments every rank must pass alike (the row arguments of every op; a PPO loss's tensors and options; the
full-KL ops' temperature and rows; linear_dpo_loss's reference log-probs and options), passed otherwise on
some rank: a ValueError naming the argument on every rank, and the group still usable.
"""

import pytest
import torch
import torch.distributed as dist
from conftest import IMPLS, spawn_gloo

import rlhf_fast as rf
from rlhf_fast.reference import truncated_logprobs_reference

SIZES = {2: [7, 12], 4: [5, 9, 3, 8]}  # odd, unequal slices
WIDE = {2: [150, 173], 4: [80, 91, 77, 75]}  # a vocabulary whose flat rows' nucleus is wider than 256
B, T, H, TEMP = 2, 3, 8, 0.7
RTOL = 2e-5


def _configs(B, T):
    row = torch.arange(B * T).view(B, T)
    return {
        "top_k": dict(top_k=3),
        "top_p": dict(top_p=0.8),
        "min_p": dict(min_p=0.1),
        "all_vllm": dict(top_k=5, top_p=0.9, min_p=0.05),
        "all_hf": dict(top_k=5, top_p=0.9, min_p=0.05, sampler="hf"),
        # some rows off in each; rows without top-k but with top-p take the search path
        "per_row": dict(top_k=torch.where(row % 3 == 0, 0, 2 + row % 4), top_p=torch.where(row % 2 == 0, 0.7, 1.0),
                        min_p=torch.where(row % 4 == 1, 0.2, 0.0)),  # fmt: skip
    }


def _case(world: int, wide: bool = False) -> dict:
    sizes = (WIDE if wide else SIZES)[world]
    V = sum(sizes)
    g = torch.Generator().manual_seed(7 * world + wide)
    logits = torch.randn(B, T, V, generator=g) * (0.05 if wide else 2)
    logits[1, 2, : sizes[0]] = -float("inf")  # rank 0's whole slice masked in this row
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = -100
    labels[1, 0] = logits[1, 0].argmax()  # a kept label on every config
    return dict(sizes=sizes, logits=logits, labels=labels, hidden=torch.randn(B, T, H, generator=g),
                weight=torch.randn(V, H, generator=g), bias=torch.randn(V, generator=g),
                g1=torch.randn(B, T, generator=g), g2=torch.randn(B, T, generator=g),
                old_logp=-3 * torch.rand(B, T, generator=g), advantages=torch.randn(B, T, generator=g),
                mask=(torch.rand(B, T, generator=g) > 0.2).float())  # fmt: skip


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _run(d, impl, sl, group, wide=False):
    """Every truncated op on the vocabulary slice ``sl`` (``group=None``, ``slice(None)``: one process)."""
    out, kw = {}, dict(impl=impl, process_group=group)
    labels, g1, g2 = d["labels"], d["g1"], d["g2"]
    configs = {"wide": dict(top_p=0.97)} if wide else _configs(B, T)
    for name, tr in configs.items():
        x = _leaf(d["logits"][..., sl])
        logp, ent = rf.logprobs(x, labels, temperature=TEMP, return_entropy=True, **tr, **kw)
        torch.autograd.backward([logp, ent], [g1, g2])  # an upstream gradient on missed rows too
        out.update({f"logprobs/{name}/logp": logp, f"logprobs/{name}/entropy": ent, f"logprobs/{name}/d_logits": x.grad})
        if wide:
            continue
        h, w, b = _leaf(d["hidden"]), _leaf(d["weight"][sl]), _leaf(d["bias"][sl])
        logp, ent = rf.linear_logprobs(h, w, labels, bias=b, temperature=TEMP, return_entropy=True, **tr, **kw)
        torch.autograd.backward([logp, ent], [g1, g2])
        out.update({f"linear/{name}/logp": logp, f"linear/{name}/entropy": ent, f"linear/{name}/d_hidden": h.grad,
                    f"linear/{name}/d_weight": w.grad, f"linear/{name}/d_bias": b.grad})  # fmt: skip
    if wide:
        return {k: v.detach() for k, v in out.items()}
    tr = _configs(B, T)["per_row"]
    x = _leaf(d["logits"][..., sl])
    seq = rf.sequence_logprobs(x, labels, temperature=TEMP, **tr, **kw)
    seq.backward(g1[:, 0])
    out.update({"sequence/per_row/logp": seq, "sequence/per_row/d_logits": x.grad})
    ppo = dict(temperature=TEMP, entropy_coef=0.01, top_k=4, top_p=0.9, **kw)
    x = _leaf(d["logits"][..., sl])
    loss, m = rf.ppo_loss_from_logits(x, labels, d["old_logp"], d["advantages"], d["mask"], **ppo)
    loss.backward()
    out.update({"ppo/loss": loss, "ppo/miss": m["truncation_miss_frac"], "ppo/entropy": m["entropy"], "ppo/d_logits": x.grad})
    h, w, b = _leaf(d["hidden"]), _leaf(d["weight"][sl]), _leaf(d["bias"][sl])
    loss, m = rf.linear_ppo_loss(h, w, labels, d["old_logp"], d["advantages"], d["mask"], bias=b, **ppo)
    loss.backward()
    out.update({"linear_ppo/loss": loss, "linear_ppo/miss": m["truncation_miss_frac"], "linear_ppo/d_hidden": h.grad,
                "linear_ppo/d_weight": w.grad, "linear_ppo/d_bias": b.grad})  # fmt: skip
    return {k: v.detach() for k, v in out.items()}


def _run_bf16(d, impl, sl, group):
    """The truncated ops on bf16 inputs: ``rf.logprobs`` on bf16 logits, ``rf.linear_logprobs`` and
    ``rf.linear_ppo_loss`` on float32 leaves under CPU bf16 autocast (a GPU trainer's mixed-precision path)."""
    out, kw = {}, dict(impl=impl, process_group=group, temperature=TEMP)
    tr = _configs(B, T)["per_row"] | dict(top_p=0.9)
    x = _leaf(d["logits"][..., sl].bfloat16())
    logp, ent = rf.logprobs(x, d["labels"], return_entropy=True, **tr, **kw)
    torch.autograd.backward([logp, ent], [d["g1"], d["g2"]])
    out.update({"bf16/logp": logp, "bf16/entropy": ent, "bf16/d_logits": x.grad})
    h, w, b = _leaf(d["hidden"]), _leaf(d["weight"][sl]), _leaf(d["bias"][sl])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = rf.linear_logprobs(h, w, d["labels"], bias=b, return_entropy=True, **tr, **kw)
        loss, m = rf.linear_ppo_loss(h, w, d["labels"], d["old_logp"], d["advantages"], d["mask"], bias=b,
                                     top_k=4, top_p=0.9, **kw)  # fmt: skip
    torch.autograd.backward([logp, ent, loss], [d["g1"], d["g2"], torch.tensor(1.0)])
    out.update({"bf16_linear/logp": logp, "bf16_linear/entropy": ent, "bf16_linear/loss": loss,
                "bf16_linear/miss": m["truncation_miss_frac"], "bf16_linear/d_hidden": h.grad,
                "bf16_linear/d_weight": w.grad, "bf16_linear/d_bias": b.grad})  # fmt: skip
    return {k: v.detach() for k, v in out.items()}


MISMATCHED = {  # name: (the argument the error must name, rank -> keywords)
    "top_k": ("top_k", lambda r: dict(top_k=3 + r)),
    "one_rank_off": ("top_p", lambda r: dict(top_p=0.9) if r == 0 else {}),
    "per_row_tensor": ("top_k", lambda r: dict(top_k=torch.tensor([[2, 3, 4], [5, 6, 2 + (r > 0)]]))),
    "sampler": ("sampler", lambda r: dict(top_k=3, sampler="vllm" if r == 0 else "hf")),
    "temperature": ("temperature", lambda r: dict(temperature=1.0 + r, top_k=3)),
    "labels": ("labels", lambda r: dict(labels_shift=r)),  # one label differs on ranks > 0, no truncation
}  # fmt: skip


def _mismatched(d, impl, sl, group, rank):
    """The error each op raises on this rank for arguments that differ between ranks (``None``: none raised),
    then a correct call on the same group (the group is still in step)."""
    errors = {}
    for name, (_, kw_of) in MISMATCHED.items():
        kw = dict(temperature=TEMP) | kw_of(rank)
        labels = d["labels"].clone()
        labels[0, 0] = (labels[0, 0] + kw.pop("labels_shift", 0)) % d["logits"].shape[-1]
        for op in ("logprobs", "linear_logprobs", "ppo_loss_from_logits"):
            try:
                if op == "logprobs":
                    rf.logprobs(d["logits"][..., sl], labels, impl=impl, process_group=group, **kw)
                elif op == "linear_logprobs":
                    rf.linear_logprobs(d["hidden"], d["weight"][sl], labels, impl=impl, process_group=group, **kw)
                else:
                    rf.ppo_loss_from_logits(d["logits"][..., sl], labels, d["old_logp"], d["advantages"],
                                            impl=impl, process_group=group, **kw)  # fmt: skip
                errors[f"{name}/{op}"] = None
            except ValueError as e:
                errors[f"{name}/{op}"] = str(e)
    errors["after"] = rf.logprobs(d["logits"][..., sl], d["labels"], impl=impl, process_group=group, top_k=3)
    return errors


LOSS_MISMATCHED = {  # name: (the argument the error must name, (rank, data) -> keywords of the PPO loss ops)
    "old_logp": ("old_logp", lambda r, d: dict(old_logp=d["old_logp"] - 0.01 * r)),
    "advantages": ("advantages", lambda r, d: dict(advantages=d["advantages"] * (1 + r))),
    "mask": ("mask", lambda r, d: dict(mask=torch.where(torch.arange(B * T).view(B, T) == 0, float(r > 0), d["mask"]))),
    "ref_logp_on_one_rank": ("ref_logp", lambda r, d: dict(ref_logp=d["old_logp"]) if r == 0 else {}),
    "clip_low": ("clip_low", lambda r, d: dict(clip_low=0.2 + 0.05 * r)),
}  # fmt: skip
KL_MISMATCHED = {  # name: (the argument the error must name, rank -> (keywords, transpose the rows))
    "temperature": ("temperature", lambda r: (dict(temperature=1.0 + r), False)),
    "rows": ("shape[:-1]", lambda r: ({}, r > 0)),  # [B, T] rows on rank 0, [T, B] elsewhere: the same count
}


def _mismatched_loss_and_kl(d, impl, sl, group, rank):
    """As ``_mismatched``, for what the PPO loss ops and the full-KL ops must also be passed alike."""
    errors = {}
    base = dict(old_logp=d["old_logp"], advantages=d["advantages"], mask=d["mask"])
    for name, (_, kw_of) in LOSS_MISMATCHED.items():
        kw = base | kw_of(rank, d)
        for op in ("ppo_loss_from_logits", "linear_ppo_loss"):
            try:
                if op == "ppo_loss_from_logits":
                    rf.ppo_loss_from_logits(d["logits"][..., sl], d["labels"], impl=impl, process_group=group, **kw)
                else:
                    rf.linear_ppo_loss(d["hidden"], d["weight"][sl], d["labels"], impl=impl, process_group=group, **kw)
                errors[f"{name}/{op}"] = None
            except ValueError as e:
                errors[f"{name}/{op}"] = str(e)
    for name, (_, kw_of) in KL_MISMATCHED.items():
        kw, transpose = kw_of(rank)
        rows = (lambda t: t.transpose(0, 1)) if transpose else (lambda t: t)
        for op in ("full_kl", "linear_full_kl"):
            try:
                if op == "full_kl":
                    rf.full_kl(rows(d["logits"][..., sl]), rows(d["logits"][..., sl].flip(0)), impl=impl,
                               process_group=group, **kw)  # fmt: skip
                else:
                    rf.linear_full_kl(rows(d["hidden"]), d["weight"][sl], rows(d["hidden"].flip(0)),
                                      d["weight"][sl] / 2, impl=impl, process_group=group, **kw)  # fmt: skip
                errors[f"{name}/{op}"] = None
            except ValueError as e:
                errors[f"{name}/{op}"] = str(e)
    for name, kw in (("ref_chosen_logp", dict(ref_chosen_logp=torch.tensor([-5.0 - rank]))),
                     ("beta", dict(beta=0.1 * (1 + rank)))):  # fmt: skip
        kw = dict(ref_chosen_logp=torch.tensor([-5.0]), ref_rejected_logp=torch.tensor([-6.0])) | kw
        try:  # one pair: row 0 chosen, row 1 rejected
            rf.linear_dpo_loss(d["hidden"], d["weight"][sl], d["labels"], impl=impl, process_group=group, **kw)
            errors[f"{name}/linear_dpo_loss"] = None
        except ValueError as e:
            errors[f"{name}/linear_dpo_loss"] = str(e)
    errors["after"] = rf.ppo_loss_from_logits(d["logits"][..., sl], d["labels"], impl=impl, process_group=group,
                                              **base)[0].detach()  # fmt: skip
    return errors


def _rank_results(rank, world, impls):
    """What rank ``rank`` of ``world`` computes on its slice, both cases (run by conftest.spawn_gloo)."""
    saved = {}
    for wide in (False, True):
        d = _case(world, wide)
        lo = sum(d["sizes"][:rank])
        sl = slice(lo, lo + d["sizes"][rank])
        saved[wide] = ({impl: _run(d, impl, sl, dist.group.WORLD, wide) for impl in impls}, (sl.start, sl.stop))
        if not wide:
            saved["bf16"] = {impl: _run_bf16(d, impl, sl, dist.group.WORLD) for impl in impls}
            saved["mismatch"] = {impl: _mismatched(d, impl, sl, dist.group.WORLD, rank) for impl in impls}
            saved["mismatch_loss_kl"] = {impl: _mismatched_loss_and_kl(d, impl, sl, dist.group.WORLD, rank)
                                         for impl in impls}  # fmt: skip
    return saved


@pytest.fixture(scope="module", params=[2, 4], ids=["P2", "P4"])
def spawned(request, tmp_path_factory):
    world = request.param
    return world, spawn_gloo(_rank_results, world, tmp_path_factory.mktemp(f"trunc_tp{world}"), list(IMPLS))


def _reference(d, wide):
    """Float64 outputs and gradients of the whole vocabulary, keyed as ``_run``'s."""
    ref = {}
    labels, g1, g2 = d["labels"], d["g1"].double(), d["g2"].double()
    configs = {"wide": dict(top_p=0.97)} if wide else _configs(B, T)
    for name, tr in configs.items():
        x = _leaf(d["logits"].double())
        logp, ent = truncated_logprobs_reference(x, labels, temperature=TEMP, **tr)
        torch.autograd.backward([logp, ent], [g1, g2])
        ref.update({f"logprobs/{name}/logp": logp, f"logprobs/{name}/entropy": ent, f"logprobs/{name}/d_logits": x.grad})
        if wide:
            continue
        h, w, b = _leaf(d["hidden"].double()), _leaf(d["weight"].double()), _leaf(d["bias"].double())
        logp, ent = truncated_logprobs_reference(h @ w.T + b, labels, temperature=TEMP, **tr)
        torch.autograd.backward([logp, ent], [g1, g2])
        ref.update({f"linear/{name}/logp": logp, f"linear/{name}/entropy": ent, f"linear/{name}/d_hidden": h.grad,
                    f"linear/{name}/d_weight": w.grad, f"linear/{name}/d_bias": b.grad})  # fmt: skip
    if not wide:
        x = _leaf(d["logits"].double())
        logp, _ = truncated_logprobs_reference(x, labels, temperature=TEMP, **_configs(B, T)["per_row"])
        seq = torch.where(labels == -100, 0.0, logp).sum(-1)
        seq.backward(g1[:, 0])
        ref.update({"sequence/per_row/logp": seq, "sequence/per_row/d_logits": x.grad})
    return {k: v.detach() for k, v in ref.items()}


def _close(got, want, what):
    assert not got.isnan().any(), f"{what}: NaN"
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf), f"{what}: -inf (missed labels) differ"
    finite = want[~inf]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    err = (got[~inf].double() - finite).abs().max().item() if finite.numel() else 0.0
    assert err <= RTOL * max(scale, 1.0), f"{what}: error {err:.3g} vs scale {scale:.3g}"


def _shard(key, full, sl):
    name = key.rsplit("/", 1)[1]
    if name == "d_logits":
        return full[..., sl]
    return full[sl] if name in ("d_weight", "d_bias") else full


@pytest.mark.parametrize("wide", [False, True], ids=["small", "wide_nucleus"])
@pytest.mark.parametrize("impl", IMPLS)
def test_truncated_ops_match_the_float64_reference_of_the_whole_vocabulary(spawned, impl, wide):
    world, ranks = spawned
    d = _case(world, wide)
    ref = _reference(d, wide)
    missed = ref["logprobs/top_k/logp" if not wide else "logprobs/wide/logp"].isinf()
    assert wide or missed.any()  # the data has labels outside the kept set
    for rank, saved in enumerate(ranks):
        results, sl = saved[wide]
        got = results[impl]
        for key, want in ref.items():
            _close(got[key], _shard(key, want, slice(*sl)), f"{key} on rank {rank} of {world}")


@pytest.mark.parametrize("impl", IMPLS)
def test_truncated_ppo_ops_match_one_process(spawned, impl):
    world, ranks = spawned
    d = _case(world)
    ref = {k: v for k, v in _run(d, impl, slice(None), None).items() if k.startswith(("ppo/", "linear_ppo/"))}
    assert ref["ppo/miss"] > 0  # some tokens are outside the kept set
    for rank, saved in enumerate(ranks):
        results, sl = saved[False]
        for key, want in ref.items():
            got = results[impl][key]
            assert not got.isnan().any(), key
            torch.testing.assert_close(got, _shard(key, want, slice(*sl)), rtol=1e-5, atol=1e-5,
                                       msg=lambda m, key=key: f"{key} on rank {rank} of {world}: {m}")  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_truncated_outputs_are_identical_on_every_rank(spawned, impl):
    _, ranks = spawned
    for wide in (False, True):
        first = ranks[0][wide][0][impl]
        for saved in ranks[1:]:
            for key, value in saved[wide][0][impl].items():
                if key.rsplit("/", 1)[1] not in ("d_logits", "d_weight", "d_bias"):
                    assert torch.equal(value, first[key]), key


@pytest.mark.parametrize("impl", IMPLS)
def test_truncated_ops_on_bf16_and_under_cpu_autocast_match_one_process(spawned, impl):
    """bf16 logits, and the linear ops under CPU bf16 autocast, sharded: the one-process result on the same
    inputs (log-probs, entropy and loss to 1e-5; the gradients, made of bf16 products, within bf16 rounding; no
    NaN, ``-inf`` exactly where one process has it), in the inputs' dtypes."""
    world, ranks = spawned
    d = _case(world)
    ref = _run_bf16(d, impl, slice(None), None)
    assert ref["bf16/logp"].isinf().any() and ref["bf16_linear/miss"] > 0  # labels outside the kept set
    assert ref["bf16/d_logits"].dtype == torch.bfloat16 and ref["bf16_linear/d_weight"].dtype == torch.float32
    for rank, saved in enumerate(ranks):
        _, sl = saved[False]
        for key, want in ref.items():
            got, want = saved["bf16"][impl][key], _shard(key, want, slice(*sl))
            assert got.dtype == want.dtype and not got.isnan().any(), key
            assert torch.equal(got.isinf(), want.isinf()), key
            grad = key.rsplit("/", 1)[1].startswith("d_")  # from bf16 products: summed over slices in another order
            tol = dict(rtol=1.6e-2, atol=1e-3) if grad else dict(rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.masked_fill(got.isinf(), 0), want.masked_fill(want.isinf(), 0), **tol,
                                       msg=lambda m, key=key: f"{key} on rank {rank} of {world}: {m}")  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_arguments_that_differ_between_ranks_raise_on_every_rank(spawned, impl):
    """A truncation argument, the temperature or the labels differing between ranks is a ValueError naming
    it, on every rank and every op, before any threshold collective (a top_k on one rank only would otherwise
    hang the group; other labels would silently mix rows); the group is still usable afterwards."""
    world, ranks = spawned
    d = _case(world)
    for name, (arg, _) in MISMATCHED.items():
        for op in ("logprobs", "linear_logprobs", "ppo_loss_from_logits"):
            for rank, saved in enumerate(ranks):
                message = saved["mismatch"][impl][f"{name}/{op}"]
                assert message is not None, f"{name}/{op}: no error on rank {rank}"
                assert message.startswith(f"{arg} differs between the ranks of process_group"), message
    want = truncated_logprobs_reference(d["logits"].double(), d["labels"], top_k=3)[0]
    for rank, saved in enumerate(ranks):
        _close(saved["mismatch"][impl]["after"], want, f"the call after the errors on rank {rank}")


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_and_kl_arguments_that_differ_between_ranks_raise_on_every_rank(spawned, impl):
    """The PPO loss ops' tensors (old_logp, advantages, mask, ref_logp given on one rank only) and options
    (clip_low), the full-KL ops' temperature and row shape (the same row count, transposed), and
    linear_dpo_loss's reference log-probs and beta, differing
    between ranks: a ValueError naming the argument on every rank and both ops of each pair (before, the loss
    ops computed a different loss on each rank and the KL ops combined other rows, silently); the group is
    still usable afterwards."""
    world, ranks = spawned
    d = _case(world)
    cases = [(name, arg, op) for name, (arg, _) in LOSS_MISMATCHED.items()
             for op in ("ppo_loss_from_logits", "linear_ppo_loss")]  # fmt: skip
    cases += [(name, arg, op) for name, (arg, _) in KL_MISMATCHED.items() for op in ("full_kl", "linear_full_kl")]
    cases += [("ref_chosen_logp", "ref_chosen_logp", "linear_dpo_loss"), ("beta", "beta", "linear_dpo_loss")]
    for name, arg, op in cases:
        for rank, saved in enumerate(ranks):
            message = saved["mismatch_loss_kl"][impl][f"{name}/{op}"]
            assert message is not None, f"{name}/{op}: no error on rank {rank}"
            if arg == "shape[:-1]":
                arg = ("logits" if op == "full_kl" else "hidden") + ".shape[:-1]"
            assert message.startswith(f"{arg} differs between the ranks of process_group"), message
    want, _ = rf.ppo_loss_from_logits(d["logits"], d["labels"], d["old_logp"], d["advantages"], d["mask"], impl=impl)
    for rank, saved in enumerate(ranks):
        torch.testing.assert_close(saved["mismatch_loss_kl"][impl]["after"], want.detach(), rtol=1e-5, atol=1e-6)
