"""Processes, devices and the few collectives the trainer uses (spec §9.5), kept visible and minimal.

`python train_vggflow.py ...` runs one process; under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK set) it joins the
process group: NCCL on GPUs, gloo on CPUs. Nothing is wrapped in DistributedDataParallel: gradients are averaged by
one flat all-reduce before each optimizer step, which is what DDP with `no_sync` during accumulation does (one
all-reduce per update instead of upstream's one per backward, spec §10 I7), and works the same with adapters
switched off and on and with several forwards per backward.

One node or several is the same code: `rank` and `world_size` are torchrun's global RANK and WORLD_SIZE, and every
decision (the main process, seeds, prompt shares, metrics, the run folder, checkpoints) follows them; LOCAL_RANK only
picks this process's GPU on its node. Two helpers keep a multi-node job from waiting on a process that gave up:
`first_error` (every process reports its error or None; all of them stop with the first) and `from_main` (global
rank 0's decision, e.g. the run folder and the resume state, sent to every process).
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

TIMEOUT_S = 36000  # upstream's process-group timeout


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """`[n]` -> `[W, n]`, every process's tensor in rank order (a copy on one process)."""
        if not self.distributed:
            return tensor[None].clone()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def average_gradients(self, params) -> None:
        """One flat all-reduce of every parameter's gradient (missing ones count as zero), divided by W."""
        if not self.distributed or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype).clone()
            offset += g.numel()

    def first_error(self, message: Optional[str]) -> Optional[tuple]:
        """Collective: every process passes its error (None if it has none); all get `(rank, message)` of the first
        one in rank order (the message led by its rank and host when that is not rank 0), or None when no process
        failed. Called at the same point by every process, so an error on one node stops every node with that line
        instead of leaving the others blocked in the next collective."""
        if not self.distributed:
            return None if message is None else (0, message)
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, (message, socket.gethostname()))
        for rank, (error, host) in enumerate(everyone):
            if error is not None:
                return rank, error if rank == 0 else f"rank {rank} of {self.world_size} (host {host}): {error}"
        return None

    def from_main(self, value):
        """Global rank 0's `value` (any picklable object) on every process."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def hosts(self) -> list:
        """The host names of the processes, in rank order."""
        if not self.distributed:
            return [socket.gethostname()]
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, socket.gethostname())
        return everyone

    def broadcast_(self, tensors) -> None:
        """Rank 0's values everywhere (the LoRA initialisations, so replicas start equal)."""
        if self.distributed:
            for t in tensors:
                dist.broadcast(t.data, src=0)


def resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device=cuda but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    return torch.device(choice)


def from_environment(device_choice: str = "auto") -> Dist:
    """One process without torchrun's variables; otherwise join the group (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return Dist(rank, local_rank, world, device)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
