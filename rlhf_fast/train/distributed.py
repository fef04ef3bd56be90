"""Data parallelism through ``torch.distributed``: launch any trainer with ``torchrun --nproc-per-node N``.

Every rank holds the whole model (DDP: gradients averaged in the backward pass) and takes a contiguous
``1/world`` slice of each global batch, so a run on ``N`` processes sees the same global batches, in the same
order, as a run on one: losses agree within float tolerance (tests/test_train_distributed.py checks it with
2 gloo processes on CPU). Losses that are means over a variable number of tokens are normalised by the
*global* count (``global_sum``), so the average over ranks that DDP applies gives the single-process mean.
Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a no-op.

Not here yet: FSDP2 sharding for models too large for one device (the trainers' hidden-state path calls the
base model directly, which bypasses the root module's unshard hook; it needs its own care).
"""

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
    """This rank's contiguous share of ``n`` rows that need not split evenly (the first ``n % world`` ranks
    take one more); ``gather_objects`` puts the shares back in order."""
    per, extra = divmod(n, world_size())
    r = rank()
    start = r * per + min(r, extra)
    return range(start, start + per + (r < extra))


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around ``model`` when running distributed; ``model`` itself otherwise."""
    if world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


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


def gather_objects(items: list) -> list:
    """Every rank's list of picklable ``items``, concatenated in rank order (any lengths)."""
    if world_size() == 1:
        return list(items)
    parts = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


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
