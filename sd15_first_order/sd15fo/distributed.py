"""Processes: one plain process, or torchrun's RANK/WORLD_SIZE/LOCAL_RANK (NCCL on GPUs, gloo on CPUs).

Kept small and visible (nanoGPT style): the policy UNet is wrapped in DistributedDataParallel only when more
than one process runs, its gradients are averaged once per optimizer step (`no_sync` on every backward but the
last of an accumulation window, spec §9 item 12), and the few collectives the trainer needs are methods here.

On several nodes nothing changes: RANK and WORLD_SIZE are global (everything the trainer decides follows them),
LOCAL_RANK only picks this process's GPU. `agree` turns a start-up error met on one node only (a path that node
lacks) into the same one-line error on every node, instead of a hang or a lost peer on the others.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .config import ConfigError

# Joining the group: every process gets here seconds after torchrun's rendezvous, so a process that never comes
# (it crashed on its node before joining) ends the others after this long, not after the run timeout.
JOIN_TIMEOUT = datetime.timedelta(minutes=10)
# Any later collective: the others may wait this long on rank 0 (a hub download, a checkpoint, an evaluation).
RUN_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The concatenation over ranks (rank order) of an equally shaped tensor from each."""
        if not self.initialized or self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """min / max / mean over ranks (a new tensor)."""
        out = tensor.clone()
        if self.initialized and self.world_size > 1:
            dist.all_reduce(out, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX,
                                     "mean": dist.ReduceOp.SUM}[op])
            if op == "mean":
                out /= self.world_size
        return out

    def agree(self, error: Optional[str]) -> None:
        """Raise ConfigError on every process when any process met a user error at this point (None = none met):
        rank 0's or every process's message as it is, another process's prefixed with where it ran."""
        if not self.initialized or self.world_size == 1:
            if error is not None:
                raise ConfigError(error)
            return
        where = f"rank {self.rank} (node {os.environ.get('GROUP_RANK', '?')}, host {platform.node()})"
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, (where, error))
        failed = [(rank, origin, message) for rank, (origin, message) in enumerate(everyone) if message is not None]
        if failed:
            rank, origin, message = failed[0]
            raise ConfigError(message if rank == 0 else f"{origin}: {message}")

    def broadcast_object(self, value):
        """Rank 0's `value` on every rank (plain picklable data)."""
        if not self.initialized or self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.initialized:
            dist.destroy_process_group()
            self.initialized = False


def select_device(preference: str, local_rank: int) -> torch.device:
    """'auto' = this process's GPU when CUDA is visible, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def start(device_preference: str = "auto") -> Processes:
    """Join torchrun's process group when its variables are set; otherwise a single process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Processes(device=select_device(device_preference, 0))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = select_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=JOIN_TIMEOUT)
    dist.set_timeout(RUN_TIMEOUT)
    return Processes(rank, world, local_rank, device, True)


def wrap(module: torch.nn.Module, processes: Processes):
    """DDP around the policy when several processes train (it broadcasts rank 0's weights at wrap time)."""
    if processes.world_size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [processes.device.index] if processes.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def maybe_no_sync(model, sync: bool):
    """DDP's `no_sync()` unless this backward is the one that averages the window's gradients."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def unwrap(model):
    return model.module if hasattr(model, "module") else model
