"""Per-timestep reweights of the zeroth-order objectives (spec §4.1-4.3, paper.md §5.3).

Every training row is one SDE transition x -> x' at sigma `σ` (= t/1000) with step `h = σ - σ'` and
noise scale `σ̃` (the SDE step's std is `σ_t = σ̃·√h`). A reweight decides, per row:

* `w`           the weight on the velocity difference Δ = v_θ - v_old inside the matching terms
                m1 = ½·mean_d((wΔ)²), m2 = mean_d(wΔ·ε). With `w = w_base`, m1 + m2 = -log r exactly.
* `ppo_ratio`   the factor on the log-ratio in the PPO ratio exp(ppo_ratio·log r); None: PPO has no form.
* `ppo_post`    the factor on the PPO row loss after clipping.
* `match`       the factor on the matching term m1 + m2 (on m2 alone when `cancel_quadratic`).
* `match_post`  the factor on the matching row loss after the hinge.
  All reweights place their scales identically in both losses except tempflow: PPO clips the plain
  ratio and scales the loss by 2.25·σ_t afterwards, matching scales m by 2.25·σ_t inside the hinge.
* `cancel_quadratic`  GRPO-Guard: PPO adds b = mean_d((μ_θ-μ_old)²)/(2σ_t²) to log r, which is exactly
                m1, so only the linear term -m2 survives; the matching loss drops m1 for the same reason.

Velocity-space gradient weight on-policy (what actually pushes v_θ, per element) = match·match_post·w
(= ppo_ratio·ppo_post·w_base for PPO):
base w_base, tempflow 2.25·c·h, pcpo ζ·h, guard and fairclip2 c (uniform), fairclip w_base,
where c = 1 + σ̃²(1-σ)/(2σ) (= 1 + a²/2 away from σ = 1). The clip threshold on log r is
≈ ε_c/ppo_ratio for PPO and ε_c/match for matching: fairclip2 thresholds σ_t²·log r ("fair" across steps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

# PCPO's constant velocity weight per unit step (upstream flow_grpo/sd3_train_shared.py, ZETA).
ZETA = 4.3152134639895925
# TempFlow-GRPO's noise-aware weight 2.25·σ_t (upstream sd3_train_shared.py, tempflow_reweight).
TEMPFLOW_SCALE = 2.25


@dataclass(frozen=True)
class Scales:
    """One reweight evaluated at a batch of rows; every tensor is [rows]."""

    w: Tensor
    ppo_ratio: Optional[Tensor]
    ppo_post: Tensor
    match: Tensor
    match_post: Tensor
    cancel_quadratic: bool = False


def base_weight(sigma: Tensor, h: Tensor, sigma_tilde: Tensor) -> Tensor:
    """w_base = (√h/σ̃)·(1 + σ̃²(1-σ)/(2σ)) = c·h/σ_t: the log-ratio's weight on Δv (spec §4.1). [rows]"""
    return h.sqrt() / sigma_tilde * (1 + (1 - sigma) / (2 * sigma) * sigma_tilde**2)


def pcpo_weight(h: Tensor) -> Tensor:
    """w_pcpo = ζ·h: PCPO's velocity weight, proportional to the step size. [rows]"""
    return ZETA * h


def base(sigma: Tensor, h: Tensor, sigma_tilde: Tensor) -> Scales:
    """Flow-GRPO as is: plain log-ratio, plain matching term."""
    one = torch.ones_like(h)
    return Scales(w=base_weight(sigma, h, sigma_tilde), ppo_ratio=one, ppo_post=one, match=one, match_post=one)


def tempflow(sigma: Tensor, h: Tensor, sigma_tilde: Tensor) -> Scales:
    """TempFlow-GRPO: the row loss (PPO) or the matching term is multiplied by 2.25·σ_t."""
    one = torch.ones_like(h)
    noise_aware = TEMPFLOW_SCALE * sigma_tilde * h.sqrt()
    w = base_weight(sigma, h, sigma_tilde)
    # PPO clips the unscaled ratio and scales afterwards; matching scales m before the hinge.
    return Scales(w=w, ppo_ratio=one, ppo_post=noise_aware, match=noise_aware, match_post=one)


def pcpo(sigma: Tensor, h: Tensor, sigma_tilde: Tensor) -> Scales:
    """PCPO: the velocity weight w_base is replaced by ζ·h (in the ratio: log r · w_pcpo/w_base)."""
    one = torch.ones_like(h)
    w = pcpo_weight(h)
    return Scales(w=w, ppo_ratio=w / base_weight(sigma, h, sigma_tilde), ppo_post=one, match=one, match_post=one)


def guard(sigma: Tensor, h: Tensor, sigma_tilde: Tensor) -> Scales:
    """GRPO-Guard: mean-shift bias removed, log-ratio scaled by σ_t, loss by 1/h."""
    sigma_t = sigma_tilde * h.sqrt()
    return Scales(w=base_weight(sigma, h, sigma_tilde), ppo_ratio=sigma_t, ppo_post=1 / h,
                  match=sigma_t, match_post=1 / h, cancel_quadratic=True)


def fairclip(sigma: Tensor, h: Tensor, sigma_tilde: Tensor) -> Scales:
    """Clip on σ_t²·log r, then divide the loss by σ_t² again: base gradient, fair threshold."""
    sigma_t2 = sigma_tilde**2 * h
    return Scales(w=base_weight(sigma, h, sigma_tilde), ppo_ratio=sigma_t2, ppo_post=1 / sigma_t2,
                  match=sigma_t2, match_post=1 / sigma_t2)


def fairclip2(sigma: Tensor, h: Tensor, sigma_tilde: Tensor) -> Scales:
    """Ours (paper Fig. 4a): fairclip's threshold with GRPO-Guard's uniform gradient scale σ̃/√h.

    Matching only: upstream's PPO ratio has no fair_clip2 case, so `ppo_ratio` is None (see
    check_combination); `ppo_post` keeps upstream's post factor for completeness.
    """
    sigma_t2 = sigma_tilde**2 * h
    post = 1 / sigma_t2 * (sigma_tilde / h.sqrt())
    return Scales(w=base_weight(sigma, h, sigma_tilde), ppo_ratio=None, ppo_post=post,
                  match=sigma_t2, match_post=post)


# Keys are the values of `train.reweight_type` (spec §2.6; `--reweight` CLI names map onto them).
REWEIGHTS: dict[str, Callable[[Tensor, Tensor, Tensor], Scales]] = {
    "base": base,
    "tempflow_reweight": tempflow,
    "pcpo_reweight": pcpo,
    "grpo_guard": guard,
    "fair_clip": fairclip,
    "fair_clip2": fairclip2,
}
LOSS_TYPES = ("ppo", "matching")


def get_reweight(name: Optional[str]) -> Callable[[Tensor, Tensor, Tensor], Scales]:
    """The reweight `train.reweight_type = name` (None means "base", as upstream's trainers accept)."""
    key = "base" if name is None else name
    if key not in REWEIGHTS:
        raise ValueError(f"train.reweight_type must be one of {sorted(REWEIGHTS)}; got {name!r}")
    return REWEIGHTS[key]


def check_combination(loss_type: str, reweight_type: Optional[str]) -> None:
    """Reject at config load what upstream rejects only after a full sampling epoch (spec §2.7)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"train.loss_type must be one of {list(LOSS_TYPES)}; got {loss_type!r}")
    get_reweight(reweight_type)
    if loss_type == "ppo" and reweight_type == "fair_clip2":
        raise ValueError("train.reweight_type='fair_clip2' needs train.loss_type='matching' "
                         "(the PPO ratio has no fair_clip2 form); use 'fair_clip' for ppo")
