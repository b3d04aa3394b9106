"""The process group of a torchrun launch: NCCL on GPUs, gloo on CPU; a plain single process otherwise.

torchrun (alone on one node, under `srun` across nodes) sets RANK, LOCAL_RANK and WORLD_SIZE; without them the
same loop runs in one process and nothing here communicates.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


class World(NamedTuple):
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_rank() -> int:
    """The rank torchrun gave this process (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init_world() -> World:
    """Join the torchrun process group if there is one; one CUDA device per local rank."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return World(launched_rank(), size, device)


def wrap(module: nn.Module, world: World) -> nn.Module:
    """DDP over `module`, or `module` alone in one process.

    On GPUs the batch norms of the ResNet towers are synchronised across ranks, so a step sees the statistics of
    the global batch; PyTorch's SyncBatchNorm has no CPU path, so gloo runs keep per-rank statistics (ViT towers
    have none, which is why the CPU world-size equality holds for them only).
    """
    if world.size == 1:
        return module
    if world.device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return DistributedDataParallel(module, device_ids=[world.device.index])
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        log.warning("CPU DDP: batch-norm statistics are per rank (SyncBatchNorm needs GPUs)")
    return DistributedDataParallel(module)


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank if `flag` is true on any (so all ranks stop at the same step). Under DDP this waits for the
    device (a copy in, an all-reduce, a read back): the loop calls it at check points only."""
    if world.size == 1:
        return flag
    value = torch.tensor([float(flag)], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a tensor over ranks (a rank's local loss → the global-batch loss), detached, on the device.

    No host sync: NCCL queues the all-reduce on the device's stream, and the caller reads the value when it has to
    (the loop: at its next check point)."""
    value = value.detach()
    if world.size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.size
    return value


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def close(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
