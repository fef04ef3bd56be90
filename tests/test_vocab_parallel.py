"""Tensor parallelism (``process_group=...``): every op on a vocabulary split over 2 and 4 gloo processes equals
the one-process op on the whole vocabulary, outputs and gradients, for both implementations.

One spawn per world size runs every op on its rank's slice (odd slice sizes, labels on every rank, ignored
rows, a row whose whole slice on rank 0 is ``-inf``) and saves what it got; the tests compare each rank's
outputs with the one-process result of the same op, within float32 rounding, and each rank's gradients with
the matching slice of the one-process gradient (``hidden``'s whole: it is all-reduced). Shapes are tiny:
the Triton implementation runs under the interpreter on CPU.
"""

import pytest
import torch
import torch.distributed as dist
from conftest import IMPLS, spawn_gloo

import rlhf_fast as rf

SIZES = {2: [7, 12], 4: [5, 9, 3, 8]}  # odd, unequal slices
B, T, H = 2, 3, 8
TEMPERATURE = 0.7


def _case(world: int) -> dict:
    """The inputs, identical in every process (a seeded generator)."""
    sizes = SIZES.get(world, [13])
    g = torch.Generator().manual_seed(1000 + world)
    V = sum(sizes)
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    logits = torch.randn(B, T, V, generator=g) * 2
    if world > 1:  # rank 0's whole slice is masked in this row (its label is elsewhere)
        logits[1, 2, : sizes[0]] = -float("inf")
    rows = B * T
    labels = torch.tensor([offsets[i % len(sizes)] + (3 * i + 1) % sizes[i % len(sizes)] for i in range(rows)])
    labels[1], labels[3] = -100, -100  # ignored rows
    labels = labels.view(B, T)
    return dict(
        sizes=sizes, logits=logits, ref_logits=torch.randn(B, T, V, generator=g) * 2, labels=labels,
        hidden=torch.randn(B, T, H, generator=g), weight=torch.randn(V, H, generator=g) / 2,
        bias=torch.randn(V, generator=g), ref_hidden=torch.randn(B, T, H, generator=g),
        ref_weight=torch.randn(V, H, generator=g) / 2, ref_bias=torch.randn(V, generator=g),
        g1=torch.randn(B, T, generator=g), g2=torch.randn(B, T, generator=g),
        old_logp=-3 * torch.rand(B, T, generator=g), advantages=torch.randn(B, T, generator=g),
        ref_logp=-3 * torch.rand(B, T, generator=g), mask=(torch.rand(B, T, generator=g) > 0.2).float(),
        ref_chosen=-torch.rand(1, generator=g), ref_rejected=-torch.rand(1, generator=g),
    )  # fmt: skip


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _run_ops(d: dict, impl: str, sl: slice, group) -> dict:
    """Every op on the vocabulary slice ``sl`` (``slice(None)``, ``group=None``: the one-process reference).
    Keys ``op/name``; gradients are ``d_logits`` (of the slice), ``d_hidden``, ``d_weight``, ``d_bias``."""
    out = {}
    kw = dict(impl=impl, process_group=group)

    def shard(*names):
        return [_leaf(d[n][..., sl]) if n.endswith("logits") else _leaf(d[n][sl]) for n in names]

    def grads(op, loss, **named):
        loss.backward()
        for name, t in named.items():
            out[f"{op}/d_{name}"] = t.grad

    labels, g1, g2 = d["labels"], d["g1"], d["g2"]
    (x,) = shard("logits")
    logp, ent = rf.logprobs(x, labels, temperature=TEMPERATURE, return_entropy=True, **kw)
    out["logprobs/logp"], out["logprobs/entropy"] = logp, ent
    grads("logprobs", (g1 * logp + g2 * ent).sum(), logits=x)

    (x,) = shard("logits")
    logp = rf.logprobs(x, labels, **kw)  # log-probs only: the kernels' specialisation without entropy
    out["logprobs_only/logp"] = logp
    grads("logprobs_only", (g1 * logp).sum(), logits=x)

    h, (w, b) = _leaf(d["hidden"]), shard("weight", "bias")
    logp, ent = rf.linear_logprobs(h, w, labels, bias=b, temperature=TEMPERATURE, return_entropy=True, **kw)
    out["linear_logprobs/logp"], out["linear_logprobs/entropy"] = logp, ent
    grads("linear_logprobs", (g1 * logp + g2 * ent).sum(), hidden=h, weight=w, bias=b)

    h, (w, b) = _leaf(d["hidden"]), shard("weight", "bias")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmul operands, float32 logits and statistics
        logp, ent = rf.linear_logprobs(h, w, labels, bias=b, return_entropy=True, **kw)
    out["linear_logprobs_bf16/logp"], out["linear_logprobs_bf16/entropy"] = logp, ent
    grads("linear_logprobs_bf16", (g1 * logp + g2 * ent).sum(), hidden=h, weight=w, bias=b)

    (x,), ref = shard("logits"), d["ref_logits"][..., sl]
    kl = rf.full_kl(x, ref, temperature=TEMPERATURE, **kw)
    out["full_kl/kl"] = kl
    grads("full_kl", (g1 * kl).sum(), logits=x)

    h, (w, b) = _leaf(d["hidden"]), shard("weight", "bias")
    kl = rf.linear_full_kl(h, w, d["ref_hidden"], d["ref_weight"][sl], bias=b, ref_bias=d["ref_bias"][sl], **kw)
    out["linear_full_kl/kl"] = kl
    grads("linear_full_kl", (g1 * kl).sum(), hidden=h, weight=w, bias=b)

    ppo = dict(ref_logp=d["ref_logp"], kl_coef=0.1, entropy_coef=0.01, temperature=TEMPERATURE, **kw)
    (x,) = shard("logits")
    loss, m = rf.ppo_loss_from_logits(x, labels, d["old_logp"], d["advantages"], d["mask"], **ppo)
    out.update({"ppo_loss_from_logits/loss": loss, **{f"ppo_loss_from_logits/{k}": m[k] for k in ("entropy", "kl")}})
    grads("ppo_loss_from_logits", loss, logits=x)

    h, (w, b) = _leaf(d["hidden"]), shard("weight", "bias")
    loss, m = rf.linear_ppo_loss(h, w, labels, d["old_logp"], d["advantages"], d["mask"], bias=b, **ppo)
    out.update({"linear_ppo_loss/loss": loss, **{f"linear_ppo_loss/{k}": m[k] for k in ("entropy", "kl")}})
    grads("linear_ppo_loss", loss, hidden=h, weight=w, bias=b)

    # skip_ignored under a group: every rank drops the same rows (the labels are the same on every rank)
    h, (w, b) = _leaf(d["hidden"]), shard("weight", "bias")
    loss, m = rf.linear_ppo_loss(h, w, labels, d["old_logp"], d["advantages"], d["mask"], bias=b, skip_ignored=True,
                                 **ppo)  # fmt: skip
    out.update({"linear_ppo_loss_skip/loss": loss, "linear_ppo_loss_skip/entropy": m["entropy"]})
    grads("linear_ppo_loss_skip", loss, hidden=h, weight=w, bias=b)

    (x,) = shard("logits")
    seq = rf.sequence_logprobs(x, labels, temperature=TEMPERATURE, **kw)
    out["sequence_logprobs/logp"] = seq
    grads("sequence_logprobs", (g1[:, 0] * seq).sum(), logits=x)

    h, (w, b) = _leaf(d["hidden"]), shard("weight", "bias")
    loss, m = rf.linear_dpo_loss(h, w, labels, d["ref_chosen"], d["ref_rejected"], bias=b, beta=0.5, **kw)
    out["linear_dpo_loss/loss"], out["linear_dpo_loss/chosen"] = loss, m["policy_chosen_logp"]
    grads("linear_dpo_loss", loss, hidden=h, weight=w, bias=b)
    return {k: v.detach() for k, v in out.items()}


def _rank_results(rank: int, world: int, impls: list[str]) -> dict:
    """What rank ``rank`` of ``world`` computes on its slice (run by conftest.spawn_gloo)."""
    d = _case(world)
    lo = sum(d["sizes"][:rank])
    sl = slice(lo, lo + d["sizes"][rank])
    results = {impl: _run_ops(d, impl, sl, dist.group.WORLD) for impl in impls}
    # A label past the global vocabulary is an error on every rank; one past this rank's slice is not.
    errors = []
    for bad in (sum(d["sizes"]), -1):
        try:
            rf.logprobs(d["logits"][..., sl], torch.full((B, T), bad), process_group=dist.group.WORLD)
            errors.append("")
        except ValueError as exc:
            errors.append(str(exc))
    saved = {"results": results, "errors": errors, "slice": (sl.start, sl.stop)}
    if world == 4:  # two TP groups of 2 (as beside data parallelism): each splits the 2-rank case
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        sub, d2 = rank % 2, _case(2)
        lo = sum(d2["sizes"][:sub])
        saved["subgroup"] = _run_ops(d2, "torch", slice(lo, lo + d2["sizes"][sub]), groups[rank // 2])
        saved["subgroup_slice"] = (lo, lo + d2["sizes"][sub])
    return saved


@pytest.fixture(scope="module", params=[2, 4], ids=["P2", "P4"])
def spawned(request, tmp_path_factory):
    world = request.param
    ranks = spawn_gloo(_rank_results, world, tmp_path_factory.mktemp(f"tp{world}"), list(IMPLS))
    d = _case(world)
    reference = {impl: _run_ops(d, impl, slice(None), None) for impl in IMPLS}
    return world, ranks, reference


def _expected(key: str, full: torch.Tensor, sl: slice) -> torch.Tensor:
    name = key.rsplit("/", 1)[1]
    if name == "d_logits":
        return full[..., sl]
    if name in ("d_weight", "d_bias"):
        return full[sl]
    return full  # outputs, and d_hidden: the whole of it on every rank


@pytest.mark.parametrize("impl", IMPLS)
def test_every_op_matches_the_whole_vocabulary(spawned, impl):
    world, ranks, reference = spawned
    ref = reference[impl]
    assert {k.split("/")[0] for k in ref} == {
        "logprobs", "logprobs_only", "linear_logprobs", "full_kl", "linear_full_kl", "ppo_loss_from_logits",
        "linear_ppo_loss", "sequence_logprobs", "linear_dpo_loss", "linear_logprobs_bf16", "linear_ppo_loss_skip",
    }  # fmt: skip
    for rank, saved in enumerate(ranks):
        got, sl = saved["results"][impl], slice(*saved["slice"])
        assert got.keys() == ref.keys()
        for key, full in ref.items():
            want = _expected(key, full, sl)
            # float32 rounding; under bf16 autocast the gradients carry bf16 rounding (d_hidden: P parts, each
            # rounded to bf16, summed in float32 and rounded again, where one process rounds once)
            bf16_grad = key.startswith("linear_logprobs_bf16/d_")
            atol = (2 + world) * 2**-8 * want.abs().max().item() if bf16_grad else 1e-5
            torch.testing.assert_close(got[key], want, rtol=0 if bf16_grad else 1e-5, atol=atol,
                                       msg=lambda m, key=key, rank=rank: f"{key} on rank {rank} of {world}: {m}")  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_outputs_are_identical_on_every_rank(spawned, impl):
    _, ranks, _ = spawned
    first = ranks[0]["results"][impl]
    for saved in ranks[1:]:
        for key, value in saved["results"][impl].items():
            if key.rsplit("/", 1)[1] not in ("d_logits", "d_weight", "d_bias"):
                assert torch.equal(value, first[key]), key


def test_tensor_parallel_subgroups(spawned):
    """World 4 as two TP groups of 2: each group's ranks get the 2-rank split's results (group-local ranks)."""
    world, ranks, _ = spawned
    if world != 4:
        pytest.skip("the subgroups run in the 4-process spawn")
    ref = _run_ops(_case(2), "torch", slice(None), None)
    for saved in ranks:
        got, sl = saved["subgroup"], slice(*saved["subgroup_slice"])
        for key, full in ref.items():
            if key.startswith("linear_logprobs_bf16/"):
                continue  # bf16 rounding: checked with its own bar in test_every_op_matches_the_whole_vocabulary
            torch.testing.assert_close(got[key], _expected(key, full, sl), rtol=1e-5, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")  # fmt: skip


def test_labels_outside_the_whole_vocabulary_raise(spawned):
    world, ranks, _ = spawned
    V = sum(SIZES[world])
    for saved in ranks:
        beyond, negative = saved["errors"]
        assert "labels" in beyond and f"[0, {V})" in beyond
        assert "labels" in negative


# ---------------------------------------------------------------------------------------- in one process


def _group_of_one():
    """A gloo group of size 1 in this process, without ``init_process_group``."""
    return dist.ProcessGroupGloo(dist.HashStore(), 0, 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_group_of_one_equals_no_group(impl):
    d = _case(1)
    got, ref = _run_ops(d, impl, slice(None), _group_of_one()), _run_ops(d, impl, slice(None), None)
    for key, value in ref.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_rows_at_minus_inf_bias_change_nothing(impl):
    """Megatron pads the vocabulary; padded lm_head rows whose bias is -inf leave the outputs and gradients of
    the real vocabulary as they are, and get gradient 0 themselves."""
    d, pad = _case(1), 3
    h, w, b = _leaf(d["hidden"]), _leaf(d["weight"]), _leaf(d["bias"])
    logp, ent = rf.linear_logprobs(h, w, d["labels"], bias=b, return_entropy=True, impl=impl)
    (d["g1"] * logp + d["g2"] * ent).sum().backward()
    hp = _leaf(d["hidden"])
    wp = _leaf(torch.cat([d["weight"], torch.randn(pad, H)]))
    bp = _leaf(torch.cat([d["bias"], torch.full((pad,), -float("inf"))]))
    logp_p, ent_p = rf.linear_logprobs(hp, wp, d["labels"], bias=bp, return_entropy=True, impl=impl,
                                       process_group=_group_of_one())  # fmt: skip
    (d["g1"] * logp_p + d["g2"] * ent_p).sum().backward()
    V = d["weight"].shape[0]
    for got, want in ((logp_p, logp), (ent_p, ent), (hp.grad, h.grad), (wp.grad[:V], w.grad), (bp.grad[:V], b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not wp.grad[V:].any() and not bp.grad[V:].any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["logprobs", "linear_logprobs"])
def test_slices_simulated_in_one_process_match(op, impl):
    """The GPU suite's tp item on CPU: three slices' statistics combined in this process (the all-reduces'
    arithmetic, without a group) give the one-process outputs and gradients."""
    from benchmarks import gpu_tp

    shape = dict((c[0], c[2]) for c in gpu_tp.CASES)[op]
    result = gpu_tp.run_case(op, shape, 3, torch.float32, torch.device("cpu"), repeats=1, impl=impl)
    assert result["status"] == "PASS", result["diffs"]
    assert len(set(result["slices"])) > 1  # unequal slices


@pytest.mark.parametrize("group", ["tp", 2, object()])
def test_a_bad_process_group_is_a_value_error(group):
    d = _case(1)
    calls = [
        lambda: rf.logprobs(d["logits"], d["labels"], process_group=group),
        lambda: rf.linear_logprobs(d["hidden"], d["weight"], d["labels"], process_group=group),
        lambda: rf.full_kl(d["logits"], d["ref_logits"], process_group=group),
        lambda: rf.linear_full_kl(d["hidden"], d["weight"], d["ref_hidden"], d["ref_weight"], process_group=group),
        lambda: rf.sequence_logprobs(d["logits"], d["labels"], process_group=group),
        lambda: rf.ppo_loss_from_logits(d["logits"], d["labels"], d["old_logp"], d["advantages"], process_group=group),
        lambda: rf.linear_ppo_loss(d["hidden"], d["weight"], d["labels"], d["old_logp"], d["advantages"],
                                   process_group=group),
        lambda: rf.linear_dpo_loss(d["hidden"], d["weight"], d["labels"], d["ref_chosen"], d["ref_rejected"],
                                   process_group=group),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="process_group"):
            call()

