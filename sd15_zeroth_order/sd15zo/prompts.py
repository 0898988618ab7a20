"""Prompts (spec §5.2): the prompt file, each epoch's prompts per process, and the fixed evaluation set.

  - The file: UTF-8, one prompt a line, lines stripped, empty lines dropped (the DanceGRPO / HPDv2 list that
    `python scripts/fetch_data.py --only dancegrpo` writes to data/dancegrpo/prompts.txt).
  - Epoch e on process r of W: torch's `DistributedSampler` (shuffle, seed = config seed) set to epoch e; the
    epoch's prompts are the first `num_prompts_per_epoch` indices of this process's shard, wrapping around a
    shorter shard (upstream's RSM trainer; its baseline crashed there), each repeated G times consecutively.
    Stateless given the epoch, so a resumed run draws the same prompts.
  - Evaluation: per process a NumPy `default_rng(eval_prompt_seed + rank)`; each of the `eval_num_batches`
    batches draws `eval_batch_size` distinct prompts (the pool cyclically when it is smaller); batch b's noise
    comes from a generator seeded with eval_noise_seed + rank·100000 + b. Fixed for the whole run.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def read_prompts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def epoch_prompts(num_prompts: int, per_epoch: int, world_size: int, rank: int, seed: int, epoch: int) -> list[int]:
    """Indices of this process's `per_epoch` prompts of epoch `epoch`."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(range(num_prompts), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    shard = list(iter(sampler))
    return [shard[i % len(shard)] for i in range(per_epoch)]


def expand(prompts: Sequence[str], generations: int) -> list[str]:
    """Each prompt repeated `generations` times consecutively."""
    return [p for p in prompts for _ in range(generations)]


def eval_prompts(pool: Sequence[str], num_batches: int, batch_size: int, prompt_seed: int, rank: int) -> list[list[str]]:
    rng = np.random.default_rng(prompt_seed + rank)
    batches = []
    for _ in range(num_batches):
        if len(pool) < batch_size:
            batches.append([pool[j % len(pool)] for j in range(batch_size)])
        else:
            batches.append([pool[int(i)] for i in rng.choice(len(pool), size=batch_size, replace=False)])
    return batches


def eval_batch_seeds(noise_seed: int, rank: int, num_batches: int) -> list[int]:
    return [noise_seed + rank * 100000 + b for b in range(num_batches)]


def eval_seeds(config) -> tuple[int, int]:
    """(eval_prompt_seed, eval_noise_seed) with upstream's fallbacks: eval_seed, else seed."""
    base = config.eval_seed if config.eval_seed is not None else config.seed
    prompt = config.eval_prompt_seed if config.eval_prompt_seed is not None else base
    noise = config.eval_noise_seed if config.eval_noise_seed is not None else base
    return prompt, noise
