"""Data parallelism through ``torch.distributed``: launch any trainer with ``torchrun --nproc-per-node N``.

``parallel="ddp"`` (the default): every rank holds the whole model (DDP: gradients averaged in the
backward pass). ``parallel="fsdp"``: FSDP2 (``fully_shard`` on every transformer block, then on the whole
model) shards parameters, gradients and optimizer state over the ranks, for models whose training state
does not fit on one device; checkpoints and saved models are gathered into full state dicts (rank 0 writes
them), so they load anywhere. Either way, every rank takes a contiguous
``1/world`` slice of each global batch, so a run on ``N`` processes sees the same global batches, in the same
order, as a run on one: losses agree within float tolerance (tests/test_train_distributed.py checks it with
2 gloo processes on CPU). Losses that are means over a variable number of tokens are normalised by the
*global* count (``global_sum``), so the average over ranks that DDP applies gives the single-process mean.
Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a no-op.

The trainers' hidden-state path (``models.lm_hidden_states``) runs a sharded model's own forward, not its
base model's: the root module's pre-forward hook is what gathers the embeddings, final norm and lm_head,
which stay gathered after the forward (FSDP2 does not reshard the root), so the lm_head weight handed to
``rf.linear_logprobs`` is the full one and its gradient is reduce-scattered at the end of the backward.
"""

import atexit
import os

import torch
import torch.distributed as dist
from torch import nn


def init() -> tuple[int, int]:
    """``(rank, world_size)``; initialises the process group (gloo on CPU, nccl on CUDA) under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        # The group this call made is torn down at exit, before the interpreter's own teardown: a gloo group left
        # alive then can abort a finished run ("terminate called without an active exception", seen in CI on a
        # 2-process test). A group the caller made stays the caller's.
        atexit.register(destroy)
    return dist.get_rank(), dist.get_world_size()


def device_for_rank(device: torch.device) -> torch.device:
    """``cuda`` becomes this process's ``cuda:LOCAL_RANK`` under torchrun."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard(items: list, batch_size: int) -> list:
    """This rank's contiguous slice of a global batch of ``batch_size`` items (divisible by the world size)."""
    world = world_size()
    if batch_size % world:
        raise ValueError(f"the global batch size ({batch_size}) must be divisible by the number of processes ({world})")
    per = len(items) // world
    return items[rank() * per : (rank() + 1) * per]


def local_rows(n: int) -> range:
    """This rank's contiguous share of ``n`` rows that need not split evenly: of ``range(m)``, ``m`` the
    multiple of the world size from ``n`` up, so that every rank has as many rows (and runs as many forward
    passes, which FSDP's collectives need). Rows ``i >= n`` repeat row ``i % n``: ``gather_objects`` of the
    results, cut to the first ``n``, is what one process computes."""
    per = -(-n // world_size())
    return range(rank() * per, (rank() + 1) * per)


PARALLEL = ("ddp", "fsdp")


def _check_parallel(parallel: str) -> None:
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")


def _fsdp():
    """``(FSDPModule, fully_shard)``: public from torch 2.6, under ``_composable`` in 2.4 and 2.5."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    return FSDPModule, fully_shard


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 module (``fully_shard`` applied to it)."""
    return dist.is_available() and isinstance(model, _fsdp()[0])


def shard_frozen(model: nn.Module, parallel: str) -> nn.Module:
    """A frozen model (reference policy, reward model) sharded with FSDP2 under ``parallel="fsdp"`` (its
    forward then takes every rank); as it is otherwise (DDP has nothing to synchronise in it)."""
    _check_parallel(parallel)
    return shard_model(model) if parallel == "fsdp" and world_size() > 1 else model


def clip_grad_norm(parameters, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` (``max_norm <= 0``: no clipping), the norm before clipping as a
    float (FSDP2's is a DTensor over the shards)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def wrap(model: nn.Module, device: torch.device, parallel: str = "ddp") -> nn.Module:
    """When running distributed: DDP around ``model`` (``parallel="ddp"``), or ``model`` itself sharded in
    place with FSDP2 (``"fsdp"``: build its optimizer *after* this, on the sharded parameters). ``model``
    itself otherwise."""
    _check_parallel(parallel)
    if world_size() == 1:
        return model
    if parallel == "fsdp":
        return model if is_sharded(model) else shard_model(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` on each transformer block (the classes ``transformers`` lists in
    ``_no_split_modules``), then on ``model`` (the embeddings, final norm and heads: one group)."""
    _, fully_shard = _fsdp()
    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    for module in model.modules():
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def full_state_dict(model: nn.Module) -> dict:
    """The whole state dict of an FSDP2 ``model`` on the CPU of rank 0 (``{}`` on the other ranks); a
    collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state_dict(model: nn.Module, optimizer) -> dict:
    """The whole state of ``optimizer`` (over FSDP2 ``model``'s parameters) on rank 0's CPU, keyed by
    parameter names; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict, *, strict: bool = True) -> None:
    """Load a whole (unsharded) state dict, present on every rank, into FSDP2 ``model``'s shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_full_optimizer_state_dict(model: nn.Module, optimizer, state: dict) -> None:
    """Load what ``full_optimizer_state_dict`` returned into ``optimizer`` over ``model``'s parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a copy; no gradient)."""
    x = x.detach().clone()
    if world_size() > 1:
        y = x.to(_collective_device())
        dist.all_reduce(y)
        x = y.to(x.device)
    return x


def global_mean(x: torch.Tensor) -> torch.Tensor:
    return global_sum(x) / world_size()


def global_max(n: int) -> int:
    """The largest of every rank's ``n``."""
    if world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def gather_rows(x: torch.Tensor, *, length: int | None = None, value=0) -> torch.Tensor:
    """Every rank's ``x [b, T, ...]`` (the same ``b`` on every rank), right-padded with ``value`` along
    dim 1 to ``length`` (rank-1 tensors are gathered as they are), stacked along dim 0 in rank order: the
    global batch whose contiguous ``1/world`` slices the ranks hold. ``x`` itself when not distributed
    (padded to ``length``)."""
    if length is not None and x.dim() > 1 and x.shape[1] < length:
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, length - x.shape[1]), value=value)
    if world_size() == 1:
        return x
    dev = _collective_device()
    parts = [torch.empty_like(x, device=dev) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous().to(dev))
    return torch.cat(parts).to(x.device)


def gather_objects(items: list, n: int | None = None) -> list:
    """Every rank's list of picklable ``items``, concatenated in rank order (any lengths), cut to the first
    ``n`` (the rows of ``local_rows(n)`` that are not repeats)."""
    if world_size() == 1:
        return list(items)[:n]
    parts = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part][:n]


def _collective_device() -> torch.device:
    """Where the process group's tensors live: this rank's GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
