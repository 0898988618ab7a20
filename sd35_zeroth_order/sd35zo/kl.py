"""KL to the frozen reference model (LoRA adapter disabled), spec §4.4 and paper.md §6.

Two SDE steps from the same x with means μ_θ, μ_ref and the same std σ_t = σ̃·√h differ by the Gaussian
KL ||μ_θ - μ_ref||²/(2σ_t²); per element (spec's mean_d convention) that is mean_d((μ_θ-μ_ref)²)/(2σ̃²h).
Flow-GRPO historically divides by σ̃² only (`train.heuristic_kldenom_trick`): the exact denominator
divided by h, so the heuristic KL is h·(exact KL) and weights each step by its size. The paper's GenEval
run uses the exact denominator (heuristic_kldenom_trick = False).

Total objective assembled by the trainer: policy + beta·(kl_sde + kl_anchor).
"""
from __future__ import annotations

from torch import Tensor

from .ppo_loss import mean_d


def kl_denominator(h: Tensor, sigma_tilde: Tensor, heuristic: bool = False) -> Tensor:
    """D in KL = mean_d(Δμ²)/(2D): σ̃²h (= σ_t², exact) or σ̃² (heuristic). [rows]"""
    return sigma_tilde**2 if heuristic else sigma_tilde**2 * h


def sde_kl_rows(
    mean: Tensor,       # [rows,C,H,W] μ_θ of the transition, with grad
    mean_ref: Tensor,   # [rows,C,H,W] μ_ref from the adapter-disabled model, no grad
    *,
    h: Tensor,          # [rows] σ - σ'
    sigma_tilde: Tensor,  # [rows] σ̃
    heuristic: bool = False,
) -> Tensor:
    """Per-row KL(p_θ(·|x) || p_ref(·|x)) of one SDE step, per element. [rows]

    The trainer multiplies by the same row weights (mask, k̄/k) as the policy rows.
    """
    return mean_d((mean - mean_ref) ** 2) / (2 * kl_denominator(h, sigma_tilde, heuristic))


def anchor_kl(
    mean: Tensor,       # [anchors,C,H,W] μ_θ at ODE-backbone states of steps with k = 0, with grad
    mean_ref: Tensor,   # [anchors,C,H,W] μ_ref at the same states, no grad
    *,
    h: Tensor,          # [anchors]
    sigma_tilde: Tensor,  # [anchors]
    k_bar: float,       # mean of the positive branch counts (7.5 for lowsnr2)
    heuristic: bool = False,
) -> Tensor:
    """ODE KL anchor of the branch trainer: k̄ · plain mean of the anchor rows' SDE-step KL. []

    Steps without branches produce no policy rows; the anchor keeps them near the reference. Weighted
    by k̄ (not divided by any k) so an anchor step counts like one active step of one trajectory.
    With no anchor rows in the microbatch the term is 0.
    """
    if mean.shape[0] == 0:
        return mean.sum() * 0.0  # keeps the graph and dtype; no anchors assigned to this microbatch
    return k_bar * sde_kl_rows(mean, mean_ref, h=h, sigma_tilde=sigma_tilde, heuristic=heuristic).mean()
