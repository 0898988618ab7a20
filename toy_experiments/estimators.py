"""The value-gradient estimators Ψ̂_t of Figure 2 (spec §4, §7.1), one function each.

Zeroth order (black-box reward) estimators all share one formula, the score-function identity of the first
reverse step x' = μ(x_t) + σ_1 ξ_1: ∇_μ E[f(x')] = E[f(x')·ξ_1]/σ_1, turned into score units by ω = σ²/Ω
(ddpm.guidance_scale). They differ in what f is (the end point's reward, the reward of a lookahead x̂0, the
reward after an ODE continuation) and in how the samples are drawn (independent paths or a branching tree);
the samplers live in ddpm.py. First order estimators differentiate the reward through the denoiser.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import ddpm
from .ddpm import Denoiser, Schedule
from .problem import reward


def zeroth_order(rewards: torch.Tensor, xi_first: torch.Tensor, sigma: float, omega: float,
                 control_variate: bool) -> torch.Tensor:
    """Ψ̂ = ω · mean_n (r_n − b)·ξ_1^(n) / σ_1 over the last sample axis (spec §4.2).

    b = 0: "without control variate" (PPO-like); b = mean_n r_n: "with control variate" (GRPO-like group
    baseline). rewards: [..., N]; xi_first: [..., N, 2] → [..., 2]."""
    r = rewards - rewards.mean(-1, keepdim=True) if control_variate else rewards
    return omega * (r[..., None] * xi_first).mean(-2) / sigma


def first_order_current_state(eps: Denoiser, schedule: Schedule, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """DPS-style Ψ̂ = ∇_{x_t} r(x̂0(x_t)), back-propagating through the denoiser (spec §4.1).  [P, 2] → [P, 2]"""
    x = x_t.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        x0 = ddpm.predict_x0(x, eps(x, t), schedule.ab(t))
        (grad,) = torch.autograd.grad(reward(x0).sum(), x)
    return grad


def first_order_sqdf(eps: Denoiser, schedule: Schedule, x_t: torch.Tensor, t: int, t_mid: int) -> torch.Tensor:
    """SQDF two-step ODE lookahead (spec §7.1): x̂0 at t, DDIM jump x' = √ᾱ_mid x̂0 + √(1−ᾱ_mid) ε̂ to t_mid,
    x̂0' at t_mid, then Ψ̂ = ∇_{x_t} r(x̂0') through both denoiser calls.  [P, 2] → [P, 2]"""
    x = x_t.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        ab_t, ab_mid = schedule.ab(t), schedule.ab(t_mid)
        x_mid = ddpm.ddim_step(x, eps(x, t), ab_t, ab_mid, 0.0, None)
        x0 = ddpm.predict_x0(x_mid, eps(x_mid, t_mid), ab_mid)
        (grad,) = torch.autograd.grad(reward(x0).sum(), x)
    return grad


def first_order_lookahead(eps: Denoiser, schedule: Schedule, x_t: torch.Tensor, t: int, stop: int,
                          noise: torch.Tensor) -> torch.Tensor:
    """Per-sample first-order lookahead Ψ̂_n = ∇_{x_t} r(x̂0(x_stop^(n))), where x_stop^(n) comes from a
    stochastic DDPM rollout t → stop with noise[:, n] held fixed (reparameterised; spec §7.1, "first").

    Centring the reward by a batch mean (as the toy does) does not change this gradient. The estimator for a
    batch of N paths is the mean over n.  x_t: [2]; noise: [steps, N, 2] → [N, 2]"""
    n = noise.shape[1]
    x = x_t.detach().expand(n, -1).clone().requires_grad_(True)
    with torch.enable_grad():
        h = x
        for i, s in enumerate(ddpm.sampling_grid(t)):
            e = eps(h, s)
            if s == stop:
                x0 = ddpm.predict_x0(h, e, schedule.ab(s))
                break
            p = ddpm.prev_t(s)
            ab_t, ab_p = schedule.ab(s), schedule.ab(p)
            h = ddpm.ddim_step(h, e, ab_t, ab_p, ddpm.posterior_std(ab_t, ab_p), noise[i])
        else:
            raise ValueError(f"stop index {stop} is not on the sampling grid from {t}")
        (grad,) = torch.autograd.grad(reward(x0).sum(), x)
    return grad


# ---------------------------------------------------------------------------------------------------------
# Configuration helpers (spec §4.3, §7.1).

def lookahead_stop(t: int, ratio: float) -> int:
    """The first grid state at or below ⌊t·ρ⌋, where the toy stops a lookahead of ratio ρ = t_j/t_i."""
    target = math.floor(t * ratio)
    return next(s for s in ddpm.sampling_grid(t) if s <= target)


def branch_splits(t: int, n_split: int) -> list[int]:
    """Branch-GRPO split times t_s = t − ⌊t/#split⌋·i, i = 0..#split−1 (spec §4.3), moved to the first grid
    state at or below each."""
    grid = ddpm.sampling_grid(t)
    return [next(s for s in grid if s <= t - (t // n_split) * i) for i in range(n_split)]


def branch_nfe_factor_spec(n_split: int, n_branch: int) -> float:
    """The toy's NFE-per-end-point factor: Σ_i branch^i / #split / branch^#split (spec §4.3)."""
    return sum(n_branch**i for i in range(1, n_split + 1)) / n_split / n_branch**n_split


def gauss_hermite_2d(n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-product Gauss–Hermite rule for E[f(ξ)], ξ ~ N(0, I_2): nodes [n², 2], weights [n²] summing to 1."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / w.sum()
    zz = np.stack(np.meshgrid(z, z, indexing="ij"), -1).reshape(-1, 2)
    ww = np.outer(w, w).reshape(-1)
    return torch.tensor(zz, dtype=dtype), torch.tensor(ww, dtype=dtype)


def mixed_limit(eps: Denoiser, schedule: Schedule, x_t: torch.Tensor, t: int, order: int) -> torch.Tensor:
    """The N → ∞ value of the SDE&ODE-mixed estimator at x_t [2] (what it converges to, not Ψ): with only the
    first step stochastic, the end point is a deterministic function of ξ_1 ∈ R², so
    E[(r − E r)·ξ_1]·ω/σ_1 is a 2-D Gaussian integral, computed by Gauss–Hermite quadrature.  → [2]"""
    nodes, weights = gauss_hermite_2d(order, x_t.dtype)
    steps = len(ddpm.sampling_grid(t))
    noise = torch.zeros(steps, nodes.shape[0], 2, dtype=x_t.dtype)
    noise[0] = nodes
    paths = ddpm.rollout(eps, schedule, x_t.expand(nodes.shape[0], -1), t, noise, stochastic_after_first=False)
    r = reward(paths.x0)
    r = r - (weights * r).sum()
    sigma = ddpm.posterior_std(schedule.ab(t), schedule.ab(ddpm.prev_t(t)))
    omega = ddpm.guidance_scale(schedule.ab(t), schedule.ab(ddpm.prev_t(t)))
    return omega * (weights[:, None] * r[:, None] * nodes).sum(0) / sigma
