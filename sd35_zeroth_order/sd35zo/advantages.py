"""Rewards → advantages: group labels, the group normaliser, and its cross-rank gather → normalise → slice.

GRPO turns the rewards of a group of samples that share a context into advantages
A = (r − mean_g) / (std_g + 1e-4) (population std). Which rows form a group is the experiment's choice
(spec sd35_zeroth_order.md §4.5):

    default trainer      label = prompt                   all images of one prompt
    branch, "seed"       label = "<seed_id>|t=<t>"        the k_i branches of one initial noise at step i
    branch, "prompt"     label = "<prompt>|t=<t>"         all branches of all noises of a prompt at step i
    branch, "batch"      one label for every row          plain z-score over the epoch

With "seed" grouping a branch's advantage measures only what its own SDE noise did at that step — the
single-step zeroth-order estimate RSM's matching loss is built on (paper spec §4.2-4.4: branching,
stochasticity localisation).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "GROUP_STRATEGIES",
    "seed_id",
    "rollout_seed_ids",
    "grouping_labels",
    "group_advantages",
    "zero_std_ratio",
    "mean_group_std",
    "mean_group_size",
    "GatheredAdvantages",
    "gather_group_advantages",
]

GROUP_STRATEGIES = ("seed", "prompt", "batch")  # sample.group_strategy (branch trainer)
STD_EPS = 1e-4  # flow_grpo/stat_tracking.py: std + 1e-4
ADV_CLIP = 5.0  # config train.adv_clip_max
ZERO_STD_TOL = 1e-12  # sd3_train_shared.calculate_zero_std_ratio: a group "has zero std" below this
_BATCH_LABEL = "batch"


# ----------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------

def seed_id(prompt: str, base_seed: int, rank: int, index: int) -> int:
    """Group id of one initial noise: SHA-256 of "<prompt>|<base_seed>|<rank>|<index>", first 8 bytes as an
    unsigned big-endian integer, modulo 2^63 − 1 (fits int64). A label, not an RNG seed (spec §3.5).

    `base_seed = epoch·num_batches_per_epoch + rollout_index`; `index` is the sample's row in the rollout.
    """
    key = f"{prompt}|{base_seed}|{rank}|{index}".encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big", signed=False) % (2**63 - 1)


def rollout_seed_ids(prompts: Sequence[str], base_seed: int, rank: int) -> torch.Tensor:
    """`seed_id` of every sample of one rollout on one rank: int64 `[B]`."""
    return torch.tensor([seed_id(p, base_seed, rank, i) for i, p in enumerate(prompts)], dtype=torch.int64)


def _timestep_strings(timesteps) -> list[str]:
    # Upstream formats the float32 timestep read back as a Python float ("960.1292724609375"); doing the
    # same keeps labels identical whether t comes as a float32 tensor or as a Python float.
    values = torch.as_tensor(timesteps).to(torch.float32).reshape(-1).tolist()
    return [str(float(t)) for t in values]


def grouping_labels(group_strategy: str, *, prompts: Optional[Sequence[str]] = None,
                    seed_ids: Optional[Sequence[int]] = None, timesteps=None) -> list[str]:
    """One group label per row.

    "seed": needs `seed_ids` and `timesteps` → "<seed_id>|t=<t>".
    "prompt": needs `prompts`; with `timesteps` → "<prompt>|t=<t>" (branch trainer), without → the prompt
    itself (default trainer, one group per prompt). Pass dataset indices as strings if you prefer them to
    decoded text (upstream decoded CLIP token ids, which lower-cases and truncates).
    "batch": the same label for every row, so `group_advantages` becomes a batch z-score.
    """
    if group_strategy not in GROUP_STRATEGIES:
        raise ValueError(f"sample.group_strategy must be one of {list(GROUP_STRATEGIES)}, got {group_strategy!r}")
    steps = None if timesteps is None else _timestep_strings(timesteps)

    def _check(name, values):
        if values is None:
            raise ValueError(f"group_strategy {group_strategy!r} needs {name}")
        if steps is not None and len(values) != len(steps):
            raise ValueError(f"{name} has {len(values)} rows but timesteps has {len(steps)}")
        return values

    if group_strategy == "seed":
        ids = _check("seed_ids", seed_ids)
        if steps is None:
            raise ValueError("group_strategy 'seed' needs timesteps (groups are one noise at one step)")
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        return [f"{int(s)}|t={t}" for s, t in zip(ids, steps)]
    if group_strategy == "prompt":
        texts = _check("prompts", prompts)
        if steps is None:
            return [str(p) for p in texts]
        return [f"{p}|t={t}" for p, t in zip(texts, steps)]
    # "batch": any per-row input fixes the row count.
    for rows in (prompts, seed_ids, steps):
        if rows is not None:
            return [_BATCH_LABEL] * len(rows)
    raise ValueError("group_strategy 'batch' needs prompts, seed_ids or timesteps to know the row count")


# ----------------------------------------------------------------------------------------------------------
# Normaliser
# ----------------------------------------------------------------------------------------------------------

def _group_index(labels: Sequence[str], rows: int) -> tuple[torch.Tensor, int]:
    if len(labels) != rows:
        raise ValueError(f"{len(labels)} group labels for {rows} reward rows")
    first_seen: dict[str, int] = {}
    index = [first_seen.setdefault(label, len(first_seen)) for label in labels]
    return torch.tensor(index, dtype=torch.int64), len(first_seen)


def _group_moments(rewards: torch.Tensor, index: torch.Tensor, groups: int):
    """Per-group mean, population std and 'all equal' flag, per column: `[G, T]` each (float64)."""
    cols = rewards.shape[1]
    counts = torch.zeros(groups, 1, dtype=torch.float64).index_add_(0, index, torch.ones(len(index), 1, dtype=torch.float64))
    means = torch.zeros(groups, cols, dtype=torch.float64).index_add_(0, index, rewards) / counts  # [G, T]
    centered = rewards - means[index]  # [R, T]
    var = torch.zeros(groups, cols, dtype=torch.float64).index_add_(0, index, centered**2) / counts
    rows = index[:, None].expand(-1, cols)  # [R, T]
    big = torch.full((groups, cols), -torch.inf, dtype=torch.float64).scatter_reduce_(0, rows, rewards, "amax")
    small = torch.full((groups, cols), torch.inf, dtype=torch.float64).scatter_reduce_(0, rows, rewards, "amin")
    return means, var.sqrt(), big == small


def group_advantages(rewards, group_labels: Sequence[str], adv_clip: Optional[float] = ADV_CLIP,
                     eps: float = STD_EPS, global_std: bool = False) -> torch.Tensor:
    """A = (r − mean_g) / (std_g + eps), clamped to ±adv_clip: `[R]` (or `[R, T]`) → same shape.

    Population std (ddof 0), computed in float64. With `global_std` the denominator is the std of all rewards
    passed in (Flow-GRPO's `sample.global_std`: per-group mean, batch-wide scale). A `[R, T]` input is
    normalised per column. A group whose rewards are all equal gets exactly 0 (floating-point means of
    equal numbers need not equal them; such groups carry no signal and must not become ±1e-12/1e-4 noise).
    `adv_clip=None` disables the clamp. Returns the rewards' floating dtype (float32 for integer input).
    """
    r = torch.as_tensor(rewards)
    out_dtype = r.dtype if r.is_floating_point() else torch.float32
    one_d = r.ndim == 1
    if r.ndim not in (1, 2):
        raise ValueError(f"rewards must be [R] or [R, T], got shape {tuple(r.shape)}")
    r64 = r.detach().to(torch.float64).cpu()
    r64 = r64[:, None] if one_d else r64  # [R, T]
    index, groups = _group_index(group_labels, r64.shape[0])
    means, stds, constant = _group_moments(r64, index, groups)  # [G, T]
    scale = r64.std(dim=0, unbiased=False, keepdim=True).expand(groups, -1) if global_std else stds  # [G, T]
    adv = (r64 - means[index]) / (scale[index] + eps)  # [R, T]
    adv = torch.where(constant[index], torch.zeros_like(adv), adv)
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)
    adv = adv[:, 0] if one_d else adv
    return adv.to(dtype=out_dtype, device=r.device)


# ----------------------------------------------------------------------------------------------------------
# Diagnostics (logged as group_size, zero_std_ratio, reward_std_mean)
# ----------------------------------------------------------------------------------------------------------

def _moments_for(rewards, labels):
    r = torch.as_tensor(rewards).detach().to(torch.float64).cpu()
    r = r[:, None] if r.ndim == 1 else r
    index, groups = _group_index(labels, r.shape[0])
    return _group_moments(r, index, groups)


def zero_std_ratio(rewards, group_labels: Sequence[str], tol: float = ZERO_STD_TOL) -> float:
    """Fraction of groups whose reward std is below `tol` in every column — groups that teach nothing."""
    if len(group_labels) == 0:
        return 0.0
    _, stds, _ = _moments_for(rewards, group_labels)
    return float((stds < tol).all(dim=1).to(torch.float64).mean())


def mean_group_std(rewards, group_labels: Sequence[str]) -> float:
    """Mean over groups of the (column-averaged) population reward std."""
    if len(group_labels) == 0:
        return 0.0
    _, stds, _ = _moments_for(rewards, group_labels)
    return float(stds.mean(dim=1).mean())


def mean_group_size(group_labels: Sequence[str]) -> float:
    """Rows per distinct label."""
    return len(group_labels) / len(set(group_labels)) if group_labels else 0.0


# ----------------------------------------------------------------------------------------------------------
# Across ranks
# ----------------------------------------------------------------------------------------------------------

@dataclass
class GatheredAdvantages:
    local: torch.Tensor  # [R_local] (or [R_local, T]) advantages of this rank's rows, on the input device
    all_advantages: torch.Tensor  # [R_total] every rank's rows, rank-major
    all_rewards: torch.Tensor  # [R_total] float64, rank-major (for logging)
    all_labels: list  # [R_total] group labels, rank-major


def gather_group_advantages(local_rewards, local_labels: Sequence[str], *, adv_clip: Optional[float] = ADV_CLIP,
                            eps: float = STD_EPS, global_std: bool = False,
                            group: Optional["dist.ProcessGroup"] = None) -> GatheredAdvantages:
    """Gather every rank's rewards and labels, normalise them together, keep this rank's contiguous slice.

    Groups span ranks (one prompt's images, or one seed's branches, may sit on several ranks), so the
    statistics must see all rows. Ranks may hold different row counts. Without an initialised process
    group this is `group_advantages` on the local rows. Every rank computes the same full result, so no
    broadcast is needed. Objects travel through `all_gather_object` (a few hundred floats and strings per
    epoch): with NCCL, set the CUDA device of each rank first, as torch.distributed requires.
    """
    rewards = torch.as_tensor(local_rewards)
    labels = [str(label) for label in local_labels]
    if len(labels) != rewards.shape[0]:
        raise ValueError(f"{len(labels)} group labels for {rewards.shape[0]} reward rows on this rank")
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        payload = (rewards.detach().to(torch.float64).cpu(), labels)
        parts: list = [None] * world
        dist.all_gather_object(parts, payload, group=group)
    else:
        rank, parts = 0, [(rewards.detach().to(torch.float64).cpu(), labels)]
    all_rewards = torch.cat([p[0] for p in parts])  # [R_total] rank-major
    all_labels = [label for p in parts for label in p[1]]
    adv = group_advantages(all_rewards, all_labels, adv_clip=adv_clip, eps=eps, global_std=global_std)
    start = sum(p[0].shape[0] for p in parts[:rank])
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    local = adv[start:start + rewards.shape[0]].to(dtype=out_dtype, device=rewards.device)
    return GatheredAdvantages(local=local, all_advantages=adv, all_rewards=all_rewards, all_labels=all_labels)
