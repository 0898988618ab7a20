"""RSM's `matching` objective per row: the visible change against PPO (paper §2.1, §4.2, §6; spec §4.3).

RSM fits the score to a reward-guided target, C1(t)·||s_θ - (s_ref + γΨ̂)||² + C2(t)·||s_θ - s_θ†||².
Zeroth-order Ψ̂: a row is one SDE step x' = μ_old + σ_t·ε scored by advantage A; the score-function
identity gives the value gradient w.r.t. the step's mean as Ψ̂ ∝ A·(x' - μ_old)/σ_t² = A·ε/σ_t.
The step's mean is μ = a(x) - c·h·v, so with w = c·h/σ_t (weighting.base_weight) the loss below is,
up to a θ-free constant,   A·(m1 + m2) = (A/2)·mean_d((wΔ + ε)²),   Δ = v_θ - v_old:
an A-weighted regression of v_θ onto v_old - ε/w, the velocity whose mean lands on x', i.e. the old
velocity moved along Ψ̂ (toward x' for A > 0, away for A < 0).
θ† = θ_old plays s_ref's role here (the KL to the frozen model is kl.py); C2 is the hinge
max(ε_c|A| + A·m, 0), which switches a row off once -m (= log r for `base`) has moved by ε_c in the
direction A favours. On-policy (Δ = 0) ∇m1 = 0 and ∇(A·m2) = -A·∇log p_θ(x'): the PPO gradient.
The reweight (weighting.py) sets w, the scale on m inside the hinge and the scale after it.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .ppo_loss import DEFAULT_CLIP_RANGE, RowDiagnostics, mean_d
from .weighting import get_reweight


def matching_row_loss(
    v: Tensor,               # [rows,C,H,W] v_θ (guided velocity of the current policy), with grad
    v_old: Tensor,           # [rows,C,H,W] v_old stored at sampling
    noise: Tensor,           # [rows,C,H,W] ε of the stored step, x' = μ_old + σ_t·ε
    advantages: Tensor,      # [rows] already clamped to ±train.adv_clip_max
    *,
    sigma: Tensor, h: Tensor, sigma_tilde: Tensor,   # [rows] σ = t/1000, σ - σ', σ̃
    reweight: Optional[str] = "base",
    clip_range: float = DEFAULT_CLIP_RANGE,
) -> tuple[Tensor, RowDiagnostics]:
    """Per-row RSM surrogate under `reweight` (a `train.reweight_type`); returns ([rows], diagnostics)."""
    scales = get_reweight(reweight)(sigma, h, sigma_tilde)
    w = scales.w.to(v.dtype).view(-1, *([1] * (v.dim() - 1)))   # [rows,1,1,1]
    weighted = w * (v - v_old)                                   # [rows,C,H,W]
    m1 = 0.5 * mean_d(weighted**2)                               # [rows]
    m2 = mean_d(weighted * noise)                                # [rows]
    m = scales.match * (m2 if scales.cancel_quadratic else m1 + m2)
    margin = clip_range * advantages.abs() + advantages * m
    loss = margin.clamp(min=0) * scales.match_post

    off = margin.detach() < 0
    diagnostics = RowDiagnostics(log_ratio=-m.detach(), approx_kl=0.5 * m.detach() ** 2, clipped=off,
                                 clipped_gt=off & (advantages > 0), clipped_lt=off & (advantages < 0))
    return loss, diagnostics
