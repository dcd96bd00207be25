"""This process's place under torchrun (rank 0 of 1 without it) and its device, and the one way the ranks
agree: rank 0 tries what only it may do (read the run folder, download the data), then every rank gets
its answer or its error. Under torchrun only rank 0 prints and writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from devices import pick_device, set_up_backends
from errors import ProjectError, UsageError

Result = TypeVar("Result")


@dataclass(frozen=True)
class Processes:
    ddp: bool
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return int(os.environ.get("RANK", -1)) != -1


def is_master() -> bool:
    """Rank 0, or the only process; known before the process group starts (from torchrun's variables)."""
    return int(os.environ.get("RANK", 0)) == 0


def start_processes(device_name: str, deterministic: bool) -> Processes:
    """Join torchrun's process group (when under it), pick this rank's device and set the backends."""
    rank, world_size, local_rank = 0, 1, 0
    ddp = under_torchrun()
    if ddp:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name, local_rank)
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    set_up_backends(device, deterministic)
    return Processes(ddp, rank, world_size, local_rank, device)


def end_processes() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank0_then_share(procs: Processes, attempt: Callable[[], Result]) -> Result | None:
    """Rank 0 runs attempt(); under torchrun every rank then raises the UsageError it raised (as one line),
    so all ranks refuse together. Returns attempt()'s result on rank 0, None elsewhere."""
    result, error = None, [None]
    if procs.master:
        try:
            result = attempt()
        except ProjectError as err:
            error[0] = str(err)
    if procs.ddp:
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise UsageError(error[0])
    return result


def share_from_rank0(procs: Processes, value):
    """Rank 0's value (any picklable object) on every rank."""
    if not procs.ddp:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def all_reduce_sum(tensor: torch.Tensor, ddp: bool) -> torch.Tensor:
    if ddp:
        dist.all_reduce(tensor)
    return tensor
