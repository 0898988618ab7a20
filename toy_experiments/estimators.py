"""The value-gradient estimators Ψ̂_t of Figure 2 (spec §4, §7.1), one function each.

Zeroth order (black-box reward) estimators all share one formula, the score-function identity of the first
reverse step x' = μ(x_t) + σ_1 ξ_1: ∇_μ E[f(x')] = E[f(x')·ξ_1]/σ_1, turned into score units by ω = σ²/Ω
(ddpm.guidance_scale). They differ in what f is (the end point's reward, the reward of a lookahead x̂0, the
reward after an ODE continuation) and in how the samples are drawn (independent paths or a branching tree);
the samplers live in ddpm.py. First order estimators differentiate the reward through the denoiser.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


# ---------------------------------------------------------------------------------------------------------
# Why a branching tree does not beat independent paths here (README, "branching"): what a shared prefix costs.

@dataclass
class PrefixShare:
    """Reward covariance of two end points whose paths from x_t coincide up to a state x_s and continue
    independently from there, for every grid state s after t (one test point)."""

    states: list[int]  # s = t − 10, t − 20, …, the states a split can sit at (a split at t shares nothing)
    cov: torch.Tensor  # [K] Cov(r_a, r_b) = Var(E[r | x_s]) (the two continuations are independent given x_s)
    var: torch.Tensor  # [K] Var(r) (geometric mean of the two sides' sample variances)
    cov_se: torch.Tensor  # [K] standard error of cov

    @property
    def fraction(self) -> torch.Tensor:
        """f(s) = Var(E[r | x_s]) / Var(r): the part of the end reward's variance fixed by the prefix up to x_s."""
        return self.cov / self.var


def shared_prefix_fraction(eps: Denoiser, schedule: Schedule, x_t: torch.Tensor, t: int, n: int,
                           generator: torch.Generator) -> PrefixShare:
    """f(s) for paths from x_t [2], measured with pairs: n stochastic paths run from t to data, and at every grid
    state s after t each path also starts one extra continuation from its own x_s with fresh noise; the pair
    (path, extra) shares exactly the prefix up to x_s, so Cov(r_path, r_extra) = Var(E[r | x_s]). No x̂0 of the
    model enters, so it measures the sampler's own f for any denoiser. All rows run as one batch that grows by n
    per state (Σ of the remaining steps ≈ 20× the cost of n plain paths)."""
    grid = ddpm.sampling_grid(t)
    x = x_t.expand(n, -1).clone()  # [n, 2], growing to [n·len(grid), 2]
    for j, s in enumerate(grid):
        if j > 0:
            x = torch.cat([x, x[:n]])  # the extras from the paths' own x_s (the first n rows are the paths)
        ab_t, ab_p = schedule.ab(s), schedule.ab(ddpm.prev_t(s))
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = ddpm.ddim_step(x, eps(x, s), ab_t, ab_p, ddpm.posterior_std(ab_t, ab_p), noise)
    r = reward(x).view(len(grid), n)  # row 0: the paths; row j: the extras started at grid[j]
    r = r - r.mean(-1, keepdim=True)
    prod = r[0] * r[1:]  # [K, n]
    var = (r[0].pow(2).mean() * r[1:].pow(2).mean(-1)).sqrt()
    return PrefixShare(grid[1:], prod.mean(-1), var, prod.std(-1) / math.sqrt(n))


def tree_cost(t: int, splits: list[int], branch: int) -> float:
    """Denoiser calls per end point of a tree_rollout from t (splits before the steps from `splits`), relative to
    one unbranched path: (2,2) from 389 = (2·20 + 4·19)/(4·39) = 0.744."""
    grid = ddpm.sampling_grid(t)
    width, calls = 1, 0
    for s in grid:
        width *= branch if s in splits else 1
        calls += width
    return calls / width / len(grid)


def tree_variance_factor(t: int, splits: list[int], branch: int, fraction: dict[int, float]) -> float:
    """B·Var(mean of r over one tree's B end points) / Var(r) = 1 + Σ_j (b − 1)·b^(m−1−j)·f(s_j).

    A leaf has (b − 1)·b^(m−1−j) cousins that part from it at the j-th of the m splits; they share its path up to
    x_{s_j}, hence covariance f(s_j)·Var(r). A split at t shares only x_t (f = 0). The zeroth-order estimator
    averages (r − b)·ξ_1 rather than r; ξ_1 belongs to every shared prefix after t and is nearly independent of r
    at this SNR, so the same factor applies (run.py checks it against the measured variance of the estimates).
    With N end points per estimate, the estimate's variance is factor/N times the unbranched one; at equal
    compute N scales as 1/tree_cost, so the RMSE ratio to independent paths is √(factor · cost)."""
    m = len(splits)
    return 1.0 + sum((branch - 1) * branch ** (m - 1 - j) * (0.0 if s == t else fraction[s])
                     for j, s in enumerate(splits))


def gauss_hermite_2d(n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-product Gauss–Hermite rule for E[f(ξ)], ξ ~ N(0, I_2): nodes [n², 2], weights [n²] summing to 1."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / w.sum()
    zz = np.stack(np.meshgrid(z, z, indexing="ij"), -1).reshape(-1, 2)
    ww = np.outer(w, w).reshape(-1)
    return torch.tensor(zz, dtype=dtype), torch.tensor(ww, dtype=dtype)


def mixed_limit(eps: Denoiser, schedule: Schedule, x_t: torch.Tensor, t: int, order: int,
                omega: float) -> torch.Tensor:
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
    return omega * (weights[:, None] * r[:, None] * nodes).sum(0) / sigma
