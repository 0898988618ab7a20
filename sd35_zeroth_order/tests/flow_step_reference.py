"""Hand-written references for the loss tests: the SD3.5 sigma table and SDE step of spec §3.2-3.3,
written out from the formulas (not imported from sd35zo.sde), a tiny velocity model and the Gaussian
log-density of torch.distributions. Float64 throughout so identities can be checked tightly."""
from __future__ import annotations

import torch
from torch import nn

DTYPE = torch.float64
NOISE_LEVEL = 0.7  # sample.noise_level of the SD3 configs (spec §3.3)


def sigma_table(n: int = 10, shift: float = 3.0) -> torch.Tensor:
    """σ_0..σ_n: diffusers' FlowMatchEulerDiscreteScheduler for SD3.5-M, shift applied twice (spec §3.2)."""
    lowest = shift * 0.001 / (1 + (shift - 1) * 0.001)
    u = torch.linspace(1.0, lowest, n, dtype=DTYPE)
    sig = shift * u / (1 + (shift - 1) * u)
    return torch.cat([sig, torch.zeros(1, dtype=DTYPE)])


def step_rows(steps: list[int], a: float = NOISE_LEVEL):
    """Per-row (σ, h, σ̃) for transitions at the given step indices of the 10-step table. Each [rows]."""
    table = sigma_table()
    sigma = table[steps]
    h = sigma - table[[i + 1 for i in steps]]
    # At σ = 1 the denominator uses σ_1 of the schedule (spec §3.3 step 1).
    denom_sigma = torch.where(sigma == 1.0, table[1].expand_as(sigma), sigma)
    sigma_tilde = a * torch.sqrt(sigma / (1 - denom_sigma))
    return sigma, h, sigma_tilde


def col(x: torch.Tensor) -> torch.Tensor:
    """[rows] -> [rows,1,1,1]."""
    return x.view(-1, 1, 1, 1)


def sde_mean(x, v, sigma, h, sigma_tilde):
    """μ = x·(1 - σ̃²h/(2σ)) - v·(1 + σ̃²(1-σ)/(2σ))·h (spec §3.3 step 2). [rows,C,H,W]"""
    s, dh, st = col(sigma), col(h), col(sigma_tilde)
    return x * (1 - st**2 * dh / (2 * s)) - v * (1 + st**2 * (1 - s) / (2 * s)) * dh


def gaussian_logp(x_next, mean, sigma_tilde, h):
    """Per-element mean of log N(x'; μ, σ_t²) with σ_t = σ̃√h, x' detached (spec §3.3 step 5). [rows]"""
    std = col(sigma_tilde * h.sqrt()).expand_as(mean)
    return torch.distributions.Normal(mean, std).log_prob(x_next.detach()).flatten(1).mean(1)


class TinyVelocity(nn.Module):
    """A linear 'transformer': v_θ(x) = W·vec(x) + b, reshaped back. Parameters θ = (W, b)."""

    def __init__(self, shape=(2, 3, 3), seed: int = 0):
        super().__init__()
        self.shape = shape
        dim = shape[0] * shape[1] * shape[2]
        torch.manual_seed(seed)
        self.proj = nn.Linear(dim, dim, dtype=DTYPE)

    def forward(self, x):
        return self.proj(x.flatten(1)).view(-1, *self.shape)


def rollout_rows(model, steps, seed: int = 1):
    """One stored SDE transition per row, sampled from `model` as the old policy.

    Returns dict with x, x_next, noise, v_old, mean_old, logp_old and the per-row σ, h, σ̃.
    """
    gen = torch.Generator().manual_seed(seed)
    sigma, h, sigma_tilde = step_rows(steps)
    x = torch.randn(len(steps), *model.shape, generator=gen, dtype=DTYPE)
    with torch.no_grad():
        v_old = model(x)
        mean_old = sde_mean(x, v_old, sigma, h, sigma_tilde)
        noise = torch.randn(x.shape, generator=gen, dtype=DTYPE)
        x_next = mean_old + col(sigma_tilde * h.sqrt()) * noise
        logp_old = gaussian_logp(x_next, mean_old, sigma_tilde, h)
    return dict(x=x, x_next=x_next, noise=noise, v_old=v_old, mean_old=mean_old, logp_old=logp_old,
                sigma=sigma, h=h, sigma_tilde=sigma_tilde)


def perturb(model, scale: float, seed: int = 2):
    """Move θ away from θ_old by seeded noise of the given size (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def grads(loss, model):
    """Flattened ∂loss/∂θ."""
    g = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    return torch.cat([t.flatten() for t in g])
