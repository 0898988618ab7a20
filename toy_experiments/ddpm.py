"""DDPM of the toy (spec §7.1): schedule, ε-prediction MLP, training, and sampling steps as pure functions.

A denoiser is any callable eps(x [B, 2], t: int) -> [B, 2]: a trained EpsMLP wrapped by `denoiser`, or the
exact ε of a known mixture (problem.exact_eps). Samplers take the noise they use as arguments, so the
estimators can differentiate through them (reparameterisation) and know every step's ξ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]

# Spec §7.1: T = 500, betas linear 1e-4 -> 0.03, sampling stride 10 from the test index 389 (ᾱ ≈ 0.00985).
NUM_TIMESTEPS = 500
BETA_START, BETA_END = 1e-4, 0.03
STRIDE = 10
TEST_T = NUM_TIMESTEPS - 1 - 110


@dataclass(frozen=True)
class Schedule:
    betas: torch.Tensor  # [T] float64
    alphas_bar: torch.Tensor  # [T] float64

    def ab(self, t: int) -> float:
        """ᾱ_t, with ᾱ_{−1} = 1 (the clean data the last step lands on)."""
        return 1.0 if t < 0 else float(self.alphas_bar[t])


def linear_schedule(num_timesteps: int = NUM_TIMESTEPS, start: float = BETA_START, end: float = BETA_END) -> Schedule:
    betas = torch.linspace(start, end, num_timesteps, dtype=torch.float64)
    return Schedule(betas, torch.cumprod(1.0 - betas, dim=0))


def sampling_grid(t_start: int = TEST_T, stride: int = STRIDE) -> list[int]:
    """The states a rollout from t_start visits: t_start, t_start − stride, …; each steps to t − stride (or −1)."""
    return list(range(t_start, -1, -stride))


def prev_t(t: int, stride: int = STRIDE) -> int:
    return t - stride if t - stride >= 0 else -1


class EpsMLP(nn.Module):
    """The toy's ε-predictor (spec §7.1): h = GELU(Dropout(Linear(2→256) x)) + Embedding(500, 256)[t], then
    Linear(256→512) → GELU → Linear(512→512) → GELU → Linear(512→2), with dropout 0.2 before each GELU."""

    def __init__(self, num_timesteps: int = NUM_TIMESTEPS, width: int = 256, hidden: int = 512, dropout: float = 0.2):
        super().__init__()
        self.inp = nn.Linear(2, width)
        self.time = nn.Embedding(num_timesteps, width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 2)
        self.drop = nn.Dropout(dropout)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        # x: [B, 2]; t: [B] long, or one int for the whole batch (the embedding row broadcasts).
        t = torch.as_tensor(t, device=x.device)
        h = self.act(self.drop(self.inp(x))) + self.time(t)
        h = self.act(self.drop(self.fc1(h)))
        h = self.act(self.drop(self.fc2(h)))
        return self.out(h)


def denoiser(model: EpsMLP) -> Denoiser:
    """A trained model as a denoiser (eval mode: no dropout)."""
    model.eval()
    return lambda x, t: model(x, t)


def train_eps_model(model: EpsMLP, sample_data: Callable[[int], torch.Tensor], schedule: Schedule, *,
                    steps: int, batch_size: int, lr: float, generator: torch.Generator) -> list[float]:
    """Plain DDPM training: t uniform, x_t = √ᾱ x0 + √(1−ᾱ) ε, loss = MSE(ε̂, ε). Returns the loss per step.

    Adam with the learning rate decayed linearly to zero, so a short CPU budget still ends on a plateau."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / steps)
    ab = schedule.alphas_bar.float()
    losses = []
    for _ in range(steps):
        x0 = sample_data(batch_size).float()  # [B, 2]
        t = torch.randint(0, len(ab), (batch_size,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        a = ab[t][:, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = (model(xt, t) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------------------
# Pure step functions (spec §2.3 / §7.1).

def predict_x0(x: torch.Tensor, eps: torch.Tensor, ab_t: float) -> torch.Tensor:
    """Tweedie / ε-parameterisation: x̂0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t."""
    return (x - math.sqrt(1.0 - ab_t) * eps) / math.sqrt(ab_t)


def posterior_std(ab_t: float, ab_prev: float) -> float:
    """DDPM posterior std for a jump t → prev: √((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)); 0 when landing on data."""
    return math.sqrt(max((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev), 0.0))


def ddim_step(x: torch.Tensor, eps: torch.Tensor, ab_t: float, ab_prev: float, sigma: float,
              noise: torch.Tensor | None) -> torch.Tensor:
    """x_prev = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ²) ε̂ + σ ξ. σ = posterior_std is the DDPM ancestral step, σ = 0 the ODE step."""
    x0 = predict_x0(x, eps, ab_t)
    mean = math.sqrt(ab_prev) * x0 + math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0)) * eps
    return mean if noise is None or sigma == 0.0 else mean + sigma * noise


def guidance_scale(ab_t: float, ab_prev: float) -> float:
    """ω = σ²/Ω: turns the score-function estimate of a step's mean gradient into score units.

    The step's mean is affine in the score, μ = a·x + Ω·s(x) with Ω = (c1 − c2)·√(1−ᾱ_t),
    c1 = √(1−ᾱ_t)/√(ᾱ_t/ᾱ_prev), c2 = √(1−ᾱ_prev−σ²) (spec §2.3); the tilted kernel shifts the mean by
    σ²·∇log h, the score by Ψ, so Ψ ≈ (σ²/Ω)·∇_mean log h."""
    sigma = posterior_std(ab_t, ab_prev)
    c1 = math.sqrt(1.0 - ab_t) / math.sqrt(ab_t / ab_prev)
    c2 = math.sqrt(1.0 - ab_prev - sigma**2)
    return sigma**2 / ((c1 - c2) * math.sqrt(1.0 - ab_t))


OMEGA_CHOICES = ("jump", "single-step")


def credited_guidance_scale(schedule: Schedule, t: int, which: str = "jump") -> float:
    """ω of the zeroth-order estimators at state t, whose credited noise ξ_1 is that of the stride-10 step t → t−10.

    jump:        ω of that step itself (ᾱ_prev = ᾱ_{t−10}); 0.887 at t = 389. With it the estimator's mean is
                 Ψ on a Gaussian (to 0.3 %, tests/test_estimators.py).
    single-step: ω of the one-index step t → t−1, as the toy's scripts compute it (their `next_idx = timestep`,
                 i.e. ᾱ_prev = ᾱ_{t−1}); 0.988 at t = 389, 11 % larger, while σ_1 stays the jump's."""
    if which == "jump":
        return guidance_scale(schedule.ab(t), schedule.ab(prev_t(t)))
    if which == "single-step":
        return guidance_scale(schedule.ab(t), schedule.ab(t - 1))
    raise ValueError(f"omega={which!r}: choose one of {', '.join(OMEGA_CHOICES)}")


@dataclass
class Paths:
    """What a batch of rollouts from one state records."""

    x0: torch.Tensor  # [N, 2] end points
    xi_first: torch.Tensor  # [N, 2] unit noise of the first (credited) step
    x0_hat: dict[int, torch.Tensor]  # stop index -> [N, 2] model x̂0 at that state (lookahead)


def rollout(eps: Denoiser, schedule: Schedule, x: torch.Tensor, t: int, noise: torch.Tensor, *,
            stochastic_after_first: bool = True, record: tuple[int, ...] = (), stride: int = STRIDE) -> Paths:
    """Ancestral DDPM rollout of a batch x [N, 2] from index t to data along sampling_grid(t, stride).

    noise: [len(grid), N, 2] unit noise, one slice per step (its first slice is the credited ξ_1).
    stochastic_after_first=False keeps only the first step stochastic and continues with ODE (σ = 0) steps,
    the stochasticity localisation of TempFlow-GRPO (spec §4.4). record: indices (on the grid) at which to
    keep the model's x̂0 prediction, for lookahead estimators."""
    x0_hat = {}
    for i, s in enumerate(sampling_grid(t, stride)):
        p = prev_t(s, stride)
        ab_t, ab_p = schedule.ab(s), schedule.ab(p)
        e = eps(x, s)
        if s in record:
            x0_hat[s] = predict_x0(x, e, ab_t)
        sigma = posterior_std(ab_t, ab_p) if (i == 0 or stochastic_after_first) else 0.0
        x = ddim_step(x, e, ab_t, ab_p, sigma, noise[i])
    return Paths(x, noise[0], x0_hat)


def tree_rollout(eps: Denoiser, schedule: Schedule, x: torch.Tensor, t: int, split_at: list[int], branch: int,
                 generator: torch.Generator, stride: int = STRIDE) -> tuple[Paths, int]:
    """Branch-GRPO-style tree: before the step from each index in split_at (grid indices), every path splits
    into `branch` copies that continue with independent noise. x: [R, 2] roots → end points
    [R·branch^len(split_at), 2], each root's leaves contiguous. Returns the paths and the total number of
    denoiser evaluations (summed over batch rows), the compute the NFE axis counts."""
    xi_first = None
    nfe = 0
    for s in sampling_grid(t, stride):
        if s in split_at:
            x = x.repeat_interleave(branch, dim=0)
            if xi_first is not None:
                xi_first = xi_first.repeat_interleave(branch, dim=0)
        p = prev_t(s, stride)
        ab_t, ab_p = schedule.ab(s), schedule.ab(p)
        e = eps(x, s)
        nfe += x.shape[0]
        xi = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        if xi_first is None:
            xi_first = xi
        x = ddim_step(x, e, ab_t, ab_p, posterior_std(ab_t, ab_p), xi)
    return Paths(x, xi_first, {}), nfe


def iterate_blocks(n: int, block: int) -> Iterator[slice]:
    for start in range(0, n, block):
        yield slice(start, min(start + block, n))
