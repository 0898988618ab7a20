"""Rewards -> advantages (spec §6.2 item 7, §7.3), in float64.

Baseline (`train_grpo.py`): this process's rewards in consecutive blocks of G = num_generations_per_prompt (one
prompt each), A = (r − mean) / (std + 1e-8) with the population std; nothing pooled across processes.

RSM (`train_grpo_pr.py`), on the rows of every process (pooled, then each process takes its own slice):
  batch:   A = (r − mean) / (std + 1e-4) over all rows;
  prompt:  groups "<decoded prompt>|t=<timestep>" (one prompt at one branch timestep);
  seed:    groups "<seed id>|t=<timestep>" (the k branches of one root at one timestep);
  for prompt/seed a group whose population std is below 1e-12 gets A = 0 (those rows are then masked out of
  the loss), the others A = (r − mean) / (std + 1e-4).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

GROUP_STRATEGIES = ("prompt", "seed", "batch")
SEED_ID_MODULUS = 2**63 - 1


def block_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Baseline advantages [S] (float32) from rewards [S] in consecutive blocks of `group_size`."""
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    blocks = rewards.to(torch.float64).reshape(-1, group_size)  # [S / G, G]
    mean = blocks.mean(dim=1, keepdim=True)
    std = blocks.std(dim=1, unbiased=False, keepdim=True) + 1e-8
    return ((blocks - mean) / std).reshape(-1).to(torch.float32)


@dataclass
class GroupStats:
    group_size: float      # rows / groups
    group_count: int
    zero_std_ratio: float  # fraction of groups with std < 1e-12
    reward_std_mean: float  # mean population std of the groups


def group_advantages(labels: Sequence[str], rewards: np.ndarray) -> tuple[np.ndarray, GroupStats]:
    """RSM `prompt`/`seed` advantages (float64 [R]) of rows labelled `labels` with rewards [R]."""
    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if len(labels) != rewards.shape[0]:
        raise ValueError(f"{len(labels)} group labels for {rewards.shape[0]} rewards")
    unique, inverse = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    advantages = np.zeros_like(rewards)
    stds, zero = [], 0
    for group in range(unique.size):
        mask = inverse == group
        values = rewards[mask]
        std = float(np.std(values))
        stds.append(std)
        if std < 1e-12:
            zero += 1
        else:
            advantages[mask] = (values - float(np.mean(values))) / (std + 1e-4)
    count = int(unique.size)
    stats = GroupStats(len(labels) / count if count else 0.0, count, zero / count if count else 0.0,
                       float(np.mean(stds)) if stds else 0.0)
    return advantages, stats


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """RSM `batch` advantages: one group of every row, eps 1e-4 (no zero-std special case, as upstream)."""
    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-4)


def seed_ids(prompts: Sequence[str], base_seed: int, rank: int) -> list[int]:
    """Deterministic root ids: the first 8 bytes (big-endian) of SHA-256("<prompt>|<base_seed>|<rank>|<j>"),
    modulo 2^63 − 1, for position j (spec §7.2 item 3; base_seed = epoch · calls + call index)."""
    ids = []
    for position, prompt in enumerate(prompts):
        digest = hashlib.sha256(f"{prompt}|{base_seed}|{rank}|{position}".encode("utf-8")).digest()
        ids.append(int.from_bytes(digest[:8], "big", signed=False) % SEED_ID_MODULUS)
    return ids


def group_labels(strategy: str, prompt_labels: Sequence[str], row_seed_ids: Sequence[int],
                 timesteps: Sequence[int]) -> list[str]:
    """"<prompt>|t=<t>" (prompt) or "<seed id>|t=<t>" (seed) per row."""
    if strategy == "prompt":
        keys = prompt_labels
    elif strategy == "seed":
        keys = row_seed_ids
    else:
        raise ValueError(f"group_strategy={strategy!r} has no labels; allowed: prompt, seed")
    if len(keys) != len(timesteps):
        raise ValueError(f"{len(keys)} row keys for {len(timesteps)} timesteps")
    return [f"{key}|t={int(t)}" for key, t in zip(keys, timesteps)]


def rsm_advantages(strategy: str, rewards: np.ndarray, prompt_labels: Sequence[str], row_seed_ids: Sequence[int],
                   timesteps: Sequence[int]) -> tuple[np.ndarray, GroupStats | None]:
    """The RSM trainer's advantages of the pooled rows for `group_strategy` (float64 [R]) and, for prompt/seed,
    the group statistics it logs."""
    if strategy == "batch":
        return batch_advantages(rewards), None
    return group_advantages(group_labels(strategy, prompt_labels, row_seed_ids, timesteps), rewards)


def local_slice(values: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """This process's rows of a tensor gathered in process order (equal counts per process)."""
    if values.shape[0] % world_size:
        raise ValueError(f"{values.shape[0]} pooled rows do not split over {world_size} processes")
    return values.reshape(world_size, -1, *values.shape[1:])[rank]
