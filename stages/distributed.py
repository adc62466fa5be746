"""Several processes on one stage, started by torchrun (`torchrun --standalone --nproc_per_node N -m flows STAGE`).

torchrun tells each process where it stands through WORLD_SIZE, RANK and LOCAL_RANK. With WORLD_SIZE > 1,
`world()` joins the process group (NCCL when the stage runs on CUDA, gloo on the CPU) and leaves it when its
process exits; each process uses its own GPU (`stages.common.device`: cuda:LOCAL_RANK). Without torchrun's
environment it is a world of one process and every helper does nothing, so a plain run is today's run.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.training import Parallel
from stages.common import StageError, device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise StageError(f"{name}={value!r} is not a whole number; start the stage with torchrun or unset {name}") \
            from None


def size() -> int:
    """How many processes run this stage (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return max(_env_int("WORLD_SIZE", 1), 1)


def rank() -> int:
    return _env_int("RANK", 0) if size() > 1 else 0


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """The process that writes the artifact, snapshots and progress lines (rank 0)."""
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.size > 1 else None

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """`t` averaged over the processes (every process gets the same value)."""
        if self.size == 1:
            return t
        total = t.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.size

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (tensors come back on the CPU)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def wrap(self, objective: nn.Module) -> nn.Module:
        """`objective` (a module whose forward returns the loss) wrapped so that its backward averages the
        gradients over the processes (DDP); `objective` itself when alone."""
        if self.size == 1:
            return objective
        ids = [self.device.index] if self.device.type == "cuda" else None
        # No buffers to keep in step (no batch norm); syncing them before every forward would only cost time.
        return DistributedDataParallel(objective, device_ids=ids, forward_sync_buffers=False)

    def parallel(self) -> Parallel:
        """The training loop's hooks (models.training.Parallel) for this world."""
        return Parallel(rank=self.rank, world=self.size, wrap=self.wrap, mean=self.mean, gather=self.gather)

    def describe(self, device_name: str) -> str:
        """The device as manifests record it: unchanged for one process."""
        return device_name if self.size == 1 else f"{device_name} x {self.size} processes ({self.backend})"


def world() -> World:
    """This process's place among the stage's processes. With more than one, the first call joins the process
    group, which the process leaves when it exits (also after an error). Stages run one after another in one
    process share the group: joining again after leaving would meet the first group's stale addresses in
    torchrun's store and hang."""
    n, r = size(), rank()
    dev = device()
    if n == 1:
        return World(0, 1, dev)
    if not 0 <= r < n:
        raise StageError(f"RANK={r} is outside WORLD_SIZE={n}; start the stage with torchrun")
    if dev.type == "cuda":
        local, gpus = _env_int("LOCAL_RANK", -1), torch.cuda.device_count()
        if not 0 <= local < gpus:
            raise StageError(f"process {r} has LOCAL_RANK={local} but this machine has {gpus} GPUs (one process per "
                             f"GPU); start torchrun with --nproc_per_node {gpus} or fewer, or set NEON_DEVICE=cpu")
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
        atexit.register(_leave)
    return World(r, n, dev)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_split(section: str, batch_size: int, noise_streams: int, processes: int) -> None:
    """Refuse, in one line, a global batch or a set of loss-noise streams that `processes` cannot share evenly."""
    if batch_size % processes:
        raise StageError(f"{section}.batch_size ({batch_size}) does not split evenly over the {processes} processes "
                         f"torchrun started; make it a multiple of {processes} or start a number of processes that "
                         "divides it")
    if noise_streams % processes:
        raise StageError(f"{section}.noise_streams ({noise_streams}) does not split evenly over the {processes} "
                         f"processes torchrun started; set {section}.noise_streams to a multiple of {processes} "
                         "(then one process computes the same result) or start a number of processes that divides it")
