"""The per-row surrogates of every `algorithm` (spec §8), side by side. A row is one stored transition
(x_t, t, x', ξ, ε_old, ℓ_old) with its advantage A, already clamped to ±train_adv_clip_max by the caller.

Ratio algorithms (`ddpo`, `logrho`), with log ρ = ℓ_θ − ℓ_old and clip range ε:
    ddpo:    max(−A ρ, −A clip(ρ, 1−ε, 1+ε))                  clip event |ρ − 1| > ε
    logrho:  max(−A (1+log ρ), −A clip(1+log ρ, 1−ε, 1+ε))    clip event |log ρ| > ε

Noise-matching algorithms (`vw`, `uw-sigma`, `uw-lambda`: PCPO's loss), with Δ = ε_θ − ε_old, per-row weight ω
(const_weight, or w(t) for `vw`) and s = weight_scale_factor:
    T0 = ½ mean(ξ²),  T1 = ½ mean((ωΔ/s)²),  T2 = mean(ωΔ ξ / s)
    m  = T2 (best) | T1 + T2 (bad, the preset: −log ρ with weight ω/s, spec §3.5) | (T0 + T1 + T2) − T0 (worst)
    L  = max(0, ε|A| + A m)  with train_do_clip (clip event ε|A| + A m < 0),  else ε|A| + A m

With log ρ̃ := −m, L = logrho-PPO(log ρ̃) + A + ε|A|: the same gradient as the clipped log-ratio objective, and a
clip event exactly where that gradient vanishes (tests/test_losses.py). The terms are computed in at least
float32 from inputs cast to it (upstream formed Δ and ωΔ in fp16 under autocast, spec §11 item 16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

RATIO_ALGORITHMS = ("ddpo", "logrho")
NOISE_MATCHING_ALGORITHMS = ("vw", "uw-sigma", "uw-lambda")
ALGORITHMS = RATIO_ALGORITHMS + NOISE_MATCHING_ALGORITHMS
PRECISIONS = ("best", "bad", "worst")


@dataclass
class RowLoss:
    loss: torch.Tensor                       # [R] per-row surrogate
    clipped: torch.Tensor                    # [R] bool clip events
    ratio: Optional[torch.Tensor] = None     # [R] ρ (ratio algorithms)
    log_approx_error: Optional[torch.Tensor] = None  # [R] (log ρ − (ρ − 1)) / (ρ − 1), 0 where ρ ≈ 1


def clamp_advantages(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    return torch.clamp(advantages, -adv_clip_max, adv_clip_max)


def ratio_row_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                   algorithm: str) -> RowLoss:
    """ddpo / logrho surrogate of each row (spec §8.1); inputs [R]."""
    log_rho = log_prob - old_log_prob
    rho = torch.exp(log_rho)
    if algorithm == "ddpo":
        unclipped = -advantages * rho
        clipped = -advantages * torch.clamp(rho, 1 - clip_range, 1 + clip_range)
        events = torch.abs(rho - 1) > clip_range
    elif algorithm == "logrho":
        unclipped = -advantages * (1 + log_rho)
        clipped = -advantages * torch.clamp(1 + log_rho, 1 - clip_range, 1 + clip_range)
        events = torch.abs(log_rho) > clip_range
    else:
        raise ValueError(f"algorithm={algorithm!r} is not a ratio algorithm; allowed: {', '.join(RATIO_ALGORITHMS)}")
    near_one = (rho - 1).abs() < 1e-10
    error = torch.where(near_one, torch.zeros_like(log_rho), (log_rho - (rho - 1)) / (rho - 1))
    return RowLoss(torch.maximum(unclipped, clipped), events, rho.detach(), error.detach())


def noise_matching_terms(noise_pred: torch.Tensor, old_noise_pred: torch.Tensor, noise: torch.Tensor, weight,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T0, T1, T2), each [R]: means over the latent of ½ξ², ½(ωΔ/s)², ωΔξ/s. `weight` ω: a number or [R]."""
    dtype = torch.promote_types(noise_pred.dtype, torch.float32)
    delta = noise_pred.to(dtype) - old_noise_pred.to(dtype)  # [R, C, H, W]
    xi = noise.to(dtype)
    omega = torch.as_tensor(weight, dtype=dtype, device=delta.device)
    omega = omega.reshape(omega.shape + (1,) * (delta.ndim - omega.ndim))
    dims = tuple(range(1, delta.ndim))
    t0 = 0.5 * xi.pow(2).mean(dim=dims)
    t1 = 0.5 * (omega * delta / scale).pow(2).mean(dim=dims)
    t2 = ((omega * delta) * xi / scale).mean(dim=dims)
    return t0, t1, t2


def noise_matching_row_loss(noise_pred: torch.Tensor, old_noise_pred: torch.Tensor, noise: torch.Tensor,
                            advantages: torch.Tensor, weight, scale: float, precision: str, clip_range: float,
                            do_clip: bool) -> RowLoss:
    """PCPO's surrogate of each row (spec §8.2)."""
    t0, t1, t2 = noise_matching_terms(noise_pred, old_noise_pred, noise, weight, scale)
    if precision == "best":
        matching = t2
    elif precision == "bad":
        matching = t1 + t2
    elif precision == "worst":
        matching = (t0 + t1 + t2) - t0
    else:
        raise ValueError(f"noise_matching_precision={precision!r}; allowed: {', '.join(PRECISIONS)}")
    adv = advantages.to(matching.dtype)
    inner = clip_range * torch.abs(adv) + adv * matching
    if do_clip:
        return RowLoss(torch.clamp(inner, min=0.0), inner < 0)
    return RowLoss(inner, torch.zeros_like(inner, dtype=torch.bool))


def gaussian_kl_rows(noise_pred: torch.Tensor, ref_noise_pred: torch.Tensor, weight) -> torch.Tensor:
    """½ mean_CHW(ω² (ε_θ − ε_ref)²) per row [R]: the KL between two Gaussian transitions that share σ, written in
    noise predictions (the logged approx_kl, the eval KL and the RSM ODE anchor, spec §6.2, §7.4)."""
    dtype = torch.promote_types(noise_pred.dtype, torch.float32)
    diff = noise_pred.to(dtype) - ref_noise_pred.to(dtype)
    omega = torch.as_tensor(weight, dtype=dtype, device=diff.device)
    omega = omega.reshape(omega.shape + (1,) * (diff.ndim - omega.ndim))
    return 0.5 * (omega.pow(2) * diff.pow(2)).mean(dim=tuple(range(1, diff.ndim)))
