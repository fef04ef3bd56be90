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
        dist.all_reduce(x)
    return x


def global_mean(x: torch.Tensor) -> torch.Tensor:
    return global_sum(x) / world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
