"""What `train_grpo_pr.py` adds to the baseline's loss (spec §7.2 items 11-15, §7.4, §8.3, §9 items 4-6), on one
screen. The per-row surrogate is unchanged (losses.py); around it the RSM trainer

  - masks rows whose advantage is 0 (a zero-std group), unless every row is 0;
  - weights each row by κ = k̄ / k_row (k̄ = mean branch count over the active trained steps; κ = 1 for a
    constant schedule such as the preset's k = 4);
  - pads the epoch's rows to whole micro-batches of P_row rows with masked copies of row 0;
  - reduces a micro-batch as Σ κ·L·m / max(1, Σ m)  (+ β · KL_anchor);
  - keeps at most ⌊rows × anchor_row_max_ratio⌋ ODE anchor rows (≥ 1 when the ratio is > 0 and there are
    any), spread over the micro-batches in nearly equal parts;
  - the anchor term: KL_anchor = mean over the micro-batch's anchor rows of ½ mean_CHW(ω_a² (ε_θ − ε_ref)²) at
    deterministic root states of steps without branches, ω_a = const_weight (not divided by
    weight_scale_factor) or w(t).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .config import anchor_target  # noqa: F401  (pure arithmetic, shared with the budget check)


def mean_active_k(schedule: Sequence[int]) -> float:
    """k̄: the mean of the non-zero branch counts of the trained steps."""
    active = [int(k) for k in schedule if int(k) > 0]
    if not active:
        raise ValueError("the trained steps have no branches (every exploration_k is 0)")
    return sum(active) / len(active)


def exploration_weights(row_k: torch.Tensor, k_bar: float) -> torch.Tensor:
    """κ = k̄ / max(k_row, 1) per row [R] (float32)."""
    return (k_bar / torch.clamp(row_k.to(torch.float32), min=1.0)).to(torch.float32)


def row_mask(advantages: torch.Tensor) -> torch.Tensor:
    """Rows that train: A ≠ 0; all rows when every advantage is 0 (then the policy loss is ε|A| = 0 anyway)."""
    mask = advantages != 0
    return mask if bool(mask.any()) else torch.ones_like(mask)


def pad_to_microbatches(num_rows: int, rows_per_microbatch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index [P], not-padding mask [P]) with P the next multiple of `rows_per_microbatch`; padding repeats
    row 0 with mask False."""
    pad = -num_rows % rows_per_microbatch
    index = torch.cat([torch.arange(num_rows), torch.zeros(pad, dtype=torch.long)])
    mask = torch.cat([torch.ones(num_rows, dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
    return index, mask


def subsample_anchors(raw_anchor_rows: int, target: int, generator: torch.Generator) -> Optional[torch.Tensor]:
    """Indices of the kept anchor rows (a random subset of size `target`), or None to keep them all."""
    if target >= raw_anchor_rows:
        return None
    return torch.randperm(raw_anchor_rows, generator=generator)[:target]


def split_anchors(num_anchor_rows: int, num_microbatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random permutation of the anchor rows in `num_microbatches` nearly equal consecutive parts (the first
    `count mod M` parts one longer); empty parts when there are none."""
    if num_anchor_rows == 0:
        return [torch.zeros(0, dtype=torch.long) for _ in range(num_microbatches)]
    return list(torch.randperm(num_anchor_rows, generator=generator).tensor_split(num_microbatches))


def masked_policy_loss(row_loss: torch.Tensor, kappa: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ κ·L·m / max(1, Σ m) over a micro-batch."""
    m = mask.to(row_loss.dtype)
    return (row_loss * kappa.to(row_loss.dtype) * m).sum() / torch.clamp(m.sum(), min=1.0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(values.dtype)
    return (values * m).sum() / torch.clamp(m.sum(), min=1.0)
