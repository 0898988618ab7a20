"""The residual ∇-DB loss of one transition, the pruned baseline and the RSM redesign (spec §4.3-4.5).

For a transition (x_t, t, x_t') sampled by the current policy, with transition scores
s = -k_t (x_t' - μ(ε; x_t, t))/σ_t² (schedule.ddim_step) of the policy (LoRA on) and the reference (LoRA off):

    L = forward_loss_scale · mean (s_θ - s_ref - g)²  +  unet_reg_scale · mean_b mean_chw (ε_θ - ε_old)²

with the reward guidance g = β · γ_t · Ψ. In RSM's terms (paper §3) this is C1 ‖s_θ - (s_ref + γ Ψ̂)‖² + C2 ‖ε_θ
- ε_θ†‖² over the visited states: k_t sets the temporal weight C1 ∝ k_t², the mode sets γ, Ψ is the value-
gradient estimator and the ε-space distance to the sampling-time policy is the trust region C2.

    pruned baseline  k_t = 1,        γ = ᾱ_t'   ('squared'),  Ψ = ∇_x' r(D(x̂0_θ(x', t')))  (one-step lookahead)
    ours             k_t = a·σ'_t,   γ = b·σ'_t ('sigma'),    Ψ = ∇_z0 r(D(z0))             (terminal sample)

σ'_t is the helper-schedule σ of the transition (schedule.helper_schedule; stride 19 in parity mode). Since
s_θ - s_ref = -k (c1 - c2)(ε_θ - ε_ref)/σ² is independent of x_t', the minimiser is μ_θ - μ_ref = σ² β γ Ψ / k.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import torch

from .choices import REWARD_MODES, ModeError, parse_reward_mode, parse_scale, parse_strength  # noqa: F401
from .schedule import alpha_bar, ddim_step


def strength(mode: Union[float, str], sigma_scale: float, helper_sigma: torch.Tensor) -> Union[float, torch.Tensor]:
    """k_t of both transition scores: the constant, or a·σ'_t ([B, 1, 1, 1] from `helper_sigma`)."""
    return sigma_scale * helper_sigma if mode == "sigma" else mode


def guidance(psi: torch.Tensor, reward_scale: float, mode: str, alpha_bar_next: torch.Tensor,
             helper_sigma: torch.Tensor, sigma_scale: float) -> torch.Tensor:
    """g = β γ_t Ψ: 'squared' γ = ᾱ_t', 'sigma' γ = b σ'_t, 'sigma_times_oldgamma' γ = ᾱ_t' b σ'_t, 'constant' γ = 1.
    β multiplies Ψ first, in Ψ's dtype (bf16 for bf16 latents), as the reference does (spec §2.3)."""
    g0 = reward_scale * psi
    if mode == "squared":
        return g0 * alpha_bar_next
    if mode == "sigma":
        return g0 * (sigma_scale * helper_sigma)
    if mode == "sigma_times_oldgamma":
        return g0 * alpha_bar_next * (sigma_scale * helper_sigma)
    if mode == "constant":
        return g0
    raise ModeError(f"train.reward_adaptive_mode={mode!r} is not supported; allowed: {', '.join(REWARD_MODES)}")


class TransitionLoss(NamedTuple):
    loss: torch.Tensor  # 0-d, differentiable in ε_θ
    stats: dict  # 0-d detached diagnostics (spec §4.7), reduced over an accumulation window by key suffix


def trust_region(eps_theta: torch.Tensor, eps_old: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor,
                 stride: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """R_b = mean_chw (ε_θ - ε_old)² per row [B] (optionally / (1 - ᾱ_t), or 1 - ᾱ_t' where 1 - ᾱ_t ≤ 1e-20,
    clamped at 1e-20; spec §4.5), and the L2 norm ‖ε_θ - ε_old‖ per row [B]."""
    diff = (eps_theta - eps_old).pow(2)
    reg = diff.mean(dim=(1, 2, 3))
    if normalize:
        tiny = 1e-20
        table = alphas_cumprod.to(t.device)
        denom_t = 1 - table[t]
        denom_prev = 1 - table[(t - stride).clamp(min=0)]
        reg = reg / torch.clamp(torch.where(denom_t > tiny, denom_t, denom_prev), min=tiny)
    return reg, diff.sum(dim=(1, 2, 3)).sqrt()


def residual_nabla_db_loss(eps_theta: torch.Tensor, eps_ref: torch.Tensor, eps_old: torch.Tensor, x: torch.Tensor,
                           x_next: torch.Tensor, t: torch.Tensor, g: torch.Tensor, k, *, alphas_cumprod: torch.Tensor,
                           eta: float, num_train_timesteps: int, num_inference_steps: int, kl_weight: torch.Tensor,
                           forward_loss_scale: float, unet_reg_scale: float, normalize_reg: bool) -> TransitionLoss:
    """The per-transition loss of spec §5.4 step 3.10 with its diagnostics.

    ε_θ [B, C, h, w] carries the graph to the LoRA; ε_ref, ε_old, g are constants; `k` is a number or
    [B, 1, 1, 1]; `kl_weight` is the helper w'_t [B, 1, 1, 1] of `approx_kl` = ½ mean (w' (ε_θ - ε_ref))²."""
    step = dict(eta=eta, num_train_timesteps=num_train_timesteps, num_inference_steps=num_inference_steps,
                prev_sample=x_next, strength=k)
    with torch.no_grad():
        score_ref = ddim_step(alphas_cumprod, eps_ref, t, x, **step).score
    score_theta = ddim_step(alphas_cumprod, eps_theta, t, x, **step).score
    reg, unet_diff_norm = trust_region(eps_theta, eps_old, alphas_cumprod, t,
                                       num_train_timesteps // num_inference_steps, normalize_reg)
    losses_forward = (score_theta - score_ref.float() - g.float()).pow(2)  # [B, C, h, w] float32
    loss_forward = losses_forward.mean()
    loss = (forward_loss_scale * losses_forward).mean() + unet_reg_scale * reg.mean()
    with torch.no_grad():
        norm_ref = score_ref.pow(2).sum(dim=(1, 2, 3)).sqrt()
        norm_residual = (score_theta.detach() - score_ref).pow(2).sum(dim=(1, 2, 3)).sqrt()
        norm_r = g.pow(2).sum(dim=(1, 2, 3)).sqrt()
        approx_kl = 0.5 * torch.mean((kl_weight * (eps_theta.detach() - eps_ref)) ** 2, dim=(1, 2, 3))
        stats = {"loss": loss.detach(), "loss_forward": loss_forward.detach(), "approx_kl": approx_kl.mean(),
                 "unetreg": reg.detach().mean(), "losses_forward_max": losses_forward.detach().max()}
        for name, values in (("norm_score_ref", norm_ref), ("norm_score_residual", norm_residual),
                             ("norm_score_r", norm_r), ("norm_unet_diff", unet_diff_norm.detach())):
            stats[f"{name}_mean"], stats[f"{name}_min"], stats[f"{name}_max"] = values.mean(), values.min(), values.max()
    return TransitionLoss(loss, stats)


def alpha_bar_next(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor, stride: int) -> torch.Tensor:
    """ᾱ_t' with t' = max(t - stride, 0) (the scheduler stride T//N), broadcast like `like` (for 'squared')."""
    return alpha_bar(alphas_cumprod, (t - stride).clamp(min=0), like)
