"""What the processes of a run agree on before training, however many nodes they run on (issue 15).

Every rank here is the global one (`accelerator.process_index`, torch.distributed's rank), never the rank within
a node. Two start-up rules make one node and N nodes behave the same:

  - `together(accelerator)`: each process runs a start-up check on its own view of the files (config, prompt
    file, model, reward weights, resume checkpoint); if any process fails, every process raises the same one-line
    ConfigError, naming the process and host when it was not global rank 0. Without it a file missing on node 1
    ends node 1 silently while node 0 waits in the next collective until the backend's timeout.
  - `from_main(accelerator, value)`: global rank 0's value on every process. The run folder is decided by rank 0
    alone: on a shared save dir another node could otherwise see the folder rank 0 has just created (or the
    history a fork has just copied into it) and refuse to start, or pick another timestamp as the run name.
"""
from __future__ import annotations

import platform
from contextlib import contextmanager

from .config import ConfigError


def _all_gather(accelerator, value) -> list:
    import torch.distributed as dist

    out = [None] * accelerator.num_processes
    dist.all_gather_object(out, value)
    return out


@contextmanager
def together(accelerator):
    """Run the block's checks on every process; a ConfigError on any of them is raised on all of them (the first
    failing process's message, by global rank). Every process must enter the block."""
    failure = None
    try:
        yield
    except ConfigError as error:
        if accelerator.num_processes == 1:
            raise
        failure = str(error)
    if accelerator.num_processes == 1:
        return
    for rank, found in enumerate(_all_gather(accelerator, None if failure is None else (failure, platform.node()))):
        if found is not None:
            message, host = found
            raise ConfigError(message if rank == 0 else f"{message} (on process {rank}, host {host})")


def from_main(accelerator, value):
    """Global rank 0's `value` (any picklable object) on every process."""
    if accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
