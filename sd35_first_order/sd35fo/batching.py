"""Preparing an epoch's samples for training (spec §5.1): shuffle, optional timestep subsampling, micro-batches.

A sample record is a dict of per-trajectory fields: lists (`prompts`, `prompt_metadata`) and tensors whose dim 0
is the trajectory (`latents` [B, N+1, ...], `timesteps` [B, N], `step_index` [B, N], `rewards` [B], `rgrad_x1`,
`unet_outputs` [B, N, ...], the prompt embeddings). Every draw takes an explicit generator.
"""
from __future__ import annotations

import torch

LIST_FIELDS = ("prompts", "prompt_metadata")
STEP_FIELDS = ("timesteps", "latents", "step_index", "unet_outputs")  # reordered by the subsampling


def shuffle(samples: dict, generator: torch.Generator) -> dict:
    """Every field reordered by one random permutation of the B trajectories (pairing kept)."""
    total = len(samples["prompts"])
    perm = torch.randperm(total, generator=generator, device=generator.device)
    out = {}
    for key, value in samples.items():
        if key in LIST_FIELDS:
            out[key] = [value[i] for i in perm.tolist()]
        else:
            out[key] = value[perm.to(value.device)]
    return out


def train_step_columns(num_steps: int, fraction: float, total: int, generator: torch.Generator,
                       low_variance: bool = True, clamp_step_zero: bool = True) -> torch.Tensor:
    """`[B, >=K]` step indices per trajectory for timestep_fraction < 1 (spec §5.1 step 3): column 0 is the last
    step N-1; then, low-variance, one uniform draw per trunk from late (low sigma) to early, or, random, a
    permutation of 0..N-2. Upstream then clamps every index to >= 1 (step 0 never trained, step 1 twice; spec §10
    N9, `clamp_step_zero`)."""
    if low_variance:
        trunks = int(num_steps * fraction)
        size = num_steps // trunks
        order = list(reversed(range(trunks))) * size
        rows = []
        for _ in range(total):
            picks = [trunk * size + int(torch.randint(0, size, (1,), generator=generator, device=generator.device))
                     for trunk in order]
            rows.append([num_steps - 1] + picks)
        columns = torch.tensor(rows, dtype=torch.int64)
    else:
        perms = torch.stack([torch.randperm(num_steps - 1, generator=generator, device=generator.device)
                             for _ in range(total)]).cpu()
        columns = torch.cat([torch.full((total, 1), num_steps - 1, dtype=torch.int64), perms], dim=1)
    return columns.clamp(min=1) if clamp_step_zero else columns


def subsample(samples: dict, columns: torch.Tensor) -> dict:
    """Reorder each trajectory's per-step fields by its index list `columns` [B, M]."""
    out = dict(samples)
    rows = torch.arange(columns.shape[0])[:, None]
    for key in STEP_FIELDS:
        if key in samples:
            value = samples[key]
            out[key] = value[rows.to(value.device), columns.to(value.device)]
    return out


def micro_batches(samples: dict, batch_size: int) -> list:
    """Consecutive micro-batches of `batch_size` trajectories: a list of dicts (tensors [B_t, ...])."""
    total = len(samples["prompts"])
    if total % batch_size:
        raise ValueError(f"{total} trajectories do not split into micro-batches of {batch_size}")
    batches = []
    for start in range(0, total, batch_size):
        batches.append({key: value[start:start + batch_size] for key, value in samples.items()})
    return batches
