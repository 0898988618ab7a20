"""The baseline objective: GRPO's clipped importance-ratio surrogate per row (Flow-GRPO; spec §4.2).

Each row is one stored SDE transition x -> x' with its advantage A. With Δℓ = log p_θ(x') - log p_old(x')
(per-element-mean log densities from the SDE step, spec §3.3) and a reweight's scales (weighting.py):

    r      = exp(ppo_ratio · (Δℓ + b))        b = mean_d((μ_θ-μ_old)²)/(2σ_t²) for grpo_guard, else 0
    ℓ_row  = ppo_post · max(-A·r, -A·clip(r, 1-ε_c, 1+ε_c))

Once r leaves [1-ε_c, 1+ε_c] in the direction A favours, the clipped branch is the max and is constant
in θ, so the row stops pushing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .weighting import get_reweight

# Flow-GRPO / RSM configs: train.clip_range (spec §4.1).
DEFAULT_CLIP_RANGE = 1e-4


@dataclass(frozen=True)
class RowDiagnostics:
    """What the trainer logs about a batch of rows; every tensor is [rows] and detached.

    `log_ratio` is the (scaled) log-ratio the trust region tests: PPO's log r, matching's -m.
    `clipped` marks rows the trust region has switched off; `clipped_gt` / `clipped_lt` split them by
    the side they left on (ratio above 1+ε_c / below 1-ε_c; for matching: A > 0 / A < 0).
    """

    log_ratio: Tensor
    approx_kl: Tensor
    clipped: Tensor
    clipped_gt: Tensor
    clipped_lt: Tensor

    @property
    def ratio(self) -> Tensor:
        return self.log_ratio.exp()

    def summary(self, mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Masked means over rows (padding and A = 0 rows excluded), as the trainers log them."""
        keep = torch.ones_like(self.approx_kl) if mask is None else mask.to(self.approx_kl.dtype)
        count = keep.sum().clamp(min=1.0)

        def mean(x: Tensor) -> Tensor:
            return (x.to(keep.dtype) * keep).sum() / count

        return {"approx_kl": mean(self.approx_kl), "clipfrac": mean(self.clipped),
                "clipfrac_gt_one": mean(self.clipped_gt), "clipfrac_lt_one": mean(self.clipped_lt)}


def mean_d(x: Tensor) -> Tensor:
    """The spec's mean_d: mean over every non-row dimension, accumulated in at least fp32. [rows,...] -> [rows]"""
    return x.flatten(1).mean(dim=1, dtype=torch.promote_types(x.dtype, torch.float32))


def ppo_row_loss(
    log_prob: Tensor,            # [rows] log p_θ(x'), with grad
    old_log_prob: Tensor,        # [rows] log p_old(x') stored at sampling
    advantages: Tensor,          # [rows] already clamped to ±train.adv_clip_max
    *,
    sigma: Tensor,               # [rows] σ = t/1000 of the transition
    h: Tensor,                   # [rows] σ - σ'
    sigma_tilde: Tensor,         # [rows] SDE noise scale σ̃ (σ_t = σ̃√h)
    reweight: Optional[str] = "base",
    clip_range: float = DEFAULT_CLIP_RANGE,
    mean: Optional[Tensor] = None,      # [rows,C,H,W] μ_θ, grpo_guard only
    old_mean: Optional[Tensor] = None,  # [rows,C,H,W] μ_old stored at sampling, grpo_guard only
) -> tuple[Tensor, RowDiagnostics]:
    """Per-row GRPO surrogate under `reweight` (a `train.reweight_type`); returns ([rows], diagnostics)."""
    scales = get_reweight(reweight)(sigma, h, sigma_tilde)
    if scales.ppo_ratio is None:
        raise ValueError(f"train.reweight_type={reweight!r} has no PPO ratio; use train.loss_type='matching'")
    delta = log_prob - old_log_prob
    if scales.cancel_quadratic:
        if mean is None or old_mean is None:
            raise ValueError(f"train.reweight_type={reweight!r} needs mean and old_mean (μ_θ, μ_old)")
        # b equals the quadratic part of -Δℓ, so Δℓ + b keeps only the term linear in μ_θ - μ_old.
        delta = delta + mean_d((mean - old_mean) ** 2) / (2 * (sigma_tilde**2 * h))
    log_ratio = scales.ppo_ratio * delta
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped) * scales.ppo_post

    r = ratio.detach()
    diagnostics = RowDiagnostics(
        log_ratio=log_ratio.detach(),
        approx_kl=0.5 * (log_prob - old_log_prob).detach() ** 2,  # unscaled Δℓ, as upstream logs it
        clipped=(r - 1).abs() > clip_range,
        clipped_gt=r - 1 > clip_range,
        clipped_lt=1 - r > clip_range,
    )
    return loss, diagnostics
