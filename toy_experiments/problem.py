"""The 2-D problem of Figure 2: a Gaussian mixture p, a linear reward r, the tilted target p* ∝ p·exp(r/β),
and the exact value gradient Ψ_t = ∇log p*_t − ∇log p_t at any noise level of the VP (DDPM) forward process.

Everything here is closed form. The one fact that makes the toy exact: tilting an isotropic Gaussian
N(m, s²I) by exp(g·x/β) gives N(m + s²g/β, s²I) times exp(g·m/β + s²|g|²/(2β²)), so the tilted mixture is again
a mixture with shifted means and reweighted components, and every noisy marginal of either mixture is known.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Spec §7.1 (toy scripts): equilateral triangle of unit Gaussians, r(x) = -x1/2 + 3, beta = 1.
MEANS = ((3.0, -math.sqrt(3.0)), (-3.0, -math.sqrt(3.0)), (0.0, 2.0 * math.sqrt(3.0)))
REWARD_GRAD = (-0.5, 0.0)
REWARD_OFFSET = 3.0
BETA = 1.0


@dataclass(frozen=True)
class GaussianMixture:
    """Mixture of isotropic Gaussians N(means[k], std² I) with weights summing to one."""

    means: torch.Tensor  # [K, D]
    weights: torch.Tensor  # [K]
    std: float = 1.0

    def noisy(self, alpha_bar: float) -> "GaussianMixture":
        """The marginal of x_t = √ᾱ x0 + √(1−ᾱ) ε for x0 from this mixture (ᾱ = 1 gives the mixture itself)."""
        var = alpha_bar * self.std**2 + (1.0 - alpha_bar)
        return GaussianMixture(math.sqrt(alpha_bar) * self.means, self.weights, math.sqrt(var))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # log w_k + log N(x; m_k, std² I), up to the shared normalising constant.  [B, K]
        m = self.means.to(x)
        sq = (x[:, None, :] - m[None]).pow(2).sum(-1)
        return self.weights.to(x).log()[None] - 0.5 * sq / self.std**2

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density.  x: [B, D] → [B]"""
        d = x.shape[-1]
        norm = -0.5 * d * math.log(2.0 * math.pi * self.std**2)
        return torch.logsumexp(self._logits(x), dim=-1) + norm

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """∇_x log p(x) in closed form: responsibilities times each component's score.  [B, D] → [B, D]"""
        # With one shared isotropic variance the |x|² term cancels in the softmax, leaving logits affine in x:
        # one matmul instead of a [B, K, D] difference (the rollouts call this ~10^3 times on 2^16 rows).
        m = self.means.to(x)
        bias = self.weights.to(x).log() - 0.5 * (m * m).sum(-1) / self.std**2  # [K]
        resp = torch.softmax(torch.addmm(bias, x, m.T, alpha=1.0 / self.std**2), dim=-1)  # [B, K]
        return (resp @ m - x) / self.std**2

    def posterior_mean(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """E[x0 | x_t = x] by Tweedie's formula on the noisy marginal at ᾱ.  [B, D] → [B, D]"""
        s = self.noisy(alpha_bar).score(x)
        return (x + (1.0 - alpha_bar) * s) / math.sqrt(alpha_bar)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n exact draws.  → [n, D]"""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.std * noise

    def tilt_linear(self, grad: torch.Tensor, beta: float) -> "GaussianMixture":
        """The mixture ∝ p(x)·exp(grad·x / β): means shift by std²·grad/β, weights scale by exp(grad·m_k/β)."""
        g = grad.to(self.means)
        means = self.means + self.std**2 * g / beta
        logw = self.weights.log() + (self.means @ g) / beta
        return GaussianMixture(means, torch.softmax(logw, dim=0), self.std)


def reference_mixture(dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """p: the three unit Gaussians of the toy; the analytic density uses 1/3 each (spec §7.1)."""
    means = torch.tensor(MEANS, dtype=dtype)
    return GaussianMixture(means, torch.full((3,), 1.0 / 3.0, dtype=dtype), 1.0)


def reward(x: torch.Tensor) -> torch.Tensor:
    """r(x) = −x1/2 + 3 (spec §7.1).  [..., 2] → [...]"""
    return x @ torch.tensor(REWARD_GRAD, dtype=x.dtype) + REWARD_OFFSET


def tilted_mixture(dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """p* ∝ p·exp(r/β): means shifted by (−0.5, 0), weights ∝ e^{−1.5} : e^{1.5} : 1 (spec §7.1)."""
    return reference_mixture(dtype).tilt_linear(torch.tensor(REWARD_GRAD, dtype=dtype), BETA)


def value_gradient(x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """The ground truth Ψ_t(x) = ∇log p*_t(x) − ∇log p_t(x) at noise level ᾱ_t.  [B, 2] → [B, 2]"""
    p, p_star = reference_mixture(x.dtype), tilted_mixture(x.dtype)
    return p_star.noisy(alpha_bar).score(x) - p.noisy(alpha_bar).score(x)


def expected_reward_gradient(mixture: GaussianMixture, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """∇_{x_t} E[r(x0) | x_t] for x0 from `mixture` (r linear, so = ∇ r(E[x0 | x_t]) = (√ᾱ/(1−ᾱ))·Cov[x0|x_t]·∇r).

    What the GRPO-style (reward, not exp(reward/β)) estimators converge to when the rollouts follow `mixture`
    exactly; it differs from Ψ = ∇ log E_p[exp(r/β) | x_t] whenever the posterior covariance depends on the tilt.
    [B, 2] → [B, 2]"""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(reward(mixture.posterior_mean(x, alpha_bar)).sum(), x)
    return grad


def exact_eps(mixture: GaussianMixture, alphas_bar: torch.Tensor):
    """The ideal ε-predictor of a diffusion model of `mixture`: ε*(x, t) = −√(1−ᾱ_t)·∇log p_t(x).

    Same call signature as a trained model's denoiser, so every estimator runs unchanged on either."""
    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        ab = float(alphas_bar[t])
        m = mixture.noisy(ab)
        m = GaussianMixture(m.means.to(x.dtype), m.weights.to(x.dtype), m.std)
        return -math.sqrt(1.0 - ab) * m.score(x)

    return eps
