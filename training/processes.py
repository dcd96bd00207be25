"""This process's place under torchrun (rank 0 of 1 without it) and its device, and the one way the ranks
agree: rank 0 tries what only it may do (read the run folder, download the data), then every rank gets
its answer or its error. Under torchrun only rank 0 prints and writes.
"""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

# Imported before any process group starts, never after: its collectives take `group=group.WORLD` as a default,
# bound when the module is first imported, which is None now; imported after init_process_group (DDP imports
# torch._dynamo, which imports it), the default would be the group itself and keep it, and gloo's threads, alive
# until the interpreter exits (see end_processes). tests/test_cuda_paths.py checks that the group is freed.
import torch.distributed.nn.functional

from core.errors import ProjectError, RunFailed, UsageError
from training.devices import pick_device, set_up_backends

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


def start_processes(device_name: str, deterministic: bool, timeout_minutes: float = 60.0) -> Processes:
    """Join torchrun's process group (when under it), pick this rank's device and set the backends. A collective
    that waits longer than timeout_minutes fails the run: long enough for rank 0 alone to download the dataset
    and to test the final and best weights while the others wait (NCCL's default, 10 minutes, is not)."""
    rank, world_size, local_rank = 0, 1, 0
    ddp = under_torchrun()
    if ddp:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name, local_rank)
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # device_id binds the NCCL communicator to this rank's GPU at once (no guessing, no hang on a
        # first collective that picks the wrong device).
        options = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes), **options)
    set_up_backends(device, deterministic)
    return Processes(ddp, rank, world_size, local_rank, device)


def end_processes() -> None:
    """Leave the process group so that its threads end here, not at interpreter exit: gloo's worker threads
    still running while Python finalizes can abort the process ("terminate called without an active
    exception", pytorch/pytorch#179291), and destroy_process_group joins them only once nothing holds the
    group any more (torch.distributed.nn.functional's defaults do not: imported above, before the group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # whatever reference cycles still hold (a DDP reducer on an error path) goes while the group is up
    dist.destroy_process_group()


def rank0_then_share(procs: Processes, attempt: Callable[[], Result]) -> Result | None:
    """Rank 0 runs attempt(); under torchrun every rank then raises the UsageError it raised (as one line),
    so all ranks refuse together. Returns attempt()'s result on rank 0, None elsewhere."""
    result, error = None, [None]
    if procs.master:
        try:
            result = attempt()
        except ProjectError as err:
            error[0] = (str(err), err.exit_code)
    if procs.ddp:
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        failure = UsageError(error[0][0])
        failure.exit_code = error[0][1]  # a folder in use keeps its own code (--auto-resume) on every rank
        raise failure
    return result


def share_from_rank0(procs: Processes, value):
    """Rank 0's value (any picklable object) on every rank."""
    if not procs.ddp:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def stop_together(procs: Processes, error: ProjectError | None) -> None:
    """Raise rank 0's error (a failed save, say) on every rank, so that all stop at the same point instead of
    the others waiting in their next collective until torchrun kills them."""
    if procs.ddp:
        failed = torch.tensor([1.0 if error is not None else 0.0], device=procs.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and error is None:
            raise RunFailed("rank 0 could not save the run")  # rank 0 says what and where
    if error is not None:
        raise error


def broadcast_buffers(net: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank: each rank's last training step
    updated its own, and validation and the saved network must be the same on all."""
    for buffer in net.buffers():
        dist.broadcast(buffer, src=0)


def all_reduce_sum(tensor: torch.Tensor, ddp: bool) -> torch.Tensor:
    if ddp:
        dist.all_reduce(tensor)
    return tensor
