"""Data-parallel helpers: one process per device under ``torchrun`` (gloo on CPU, nccl on CUDA).

Outside ``torchrun`` (no ``WORLD_SIZE`` > 1 in the environment) everything degrades to one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Context", "setup", "teardown", "all_reduce_sum", "all_gather_objects"]


@dataclass(frozen=True)
class Context:
    """This process's place in the job and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device | str = "cpu") -> Context:
    """Join the ``torchrun`` process group if there is one. On an accelerator each process takes the
    device numbered ``LOCAL_RANK``; the backend is nccl on CUDA, gloo otherwise."""
    device = torch.device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context(0, 1, device)
    if device.type != "cpu":
        device = torch.device(device.type, int(os.environ.get("LOCAL_RANK", "0")))
        torch.accelerator.set_device_index(device.index)  # collectives (nccl) use the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), device)


def teardown(context: Context) -> None:
    """Leave the process group (if this job has one)."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: Tensor, context: Context) -> Tensor:
    """Sum ``tensor`` over all processes (exact for integer tensors); returns it on its own device."""
    if not context.distributed:
        return tensor
    work = tensor.to(context.device)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_gather_objects(obj: Any, context: Context) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects)."""
    if not context.distributed:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
