"""Flow-matching sampling steps for SD3.5 as pure functions of tensors and a sigma schedule.

Rectified flow: x_σ = (1 − σ)·x_data + σ·ε, the transformer predicts the velocity v = ε − x_data, and the
deterministic sampler is the Euler step x' = x − h·v with h = σ − σ' > 0. Flow-GRPO (Liu et al. 2025,
arXiv 2505.05470) replaces it by an Euler–Maruyama step of the reverse SDE whose marginals match
the ODE, which gives every transition a Gaussian density N(x'; μ, σ_t² I) — the policy whose log-probability
GRPO and RSM train. Conventions (spec sd35_zeroth_order.md §3.2-3.3):

    σ̃   = a·sqrt(σ / (1 − s)),  s = σ_1 of the schedule if σ == 1 else σ     (noise scale, a = noise_level)
    μ    = x − h·(v − ½ σ̃² s_σ),  s_σ = −(x + (1 − σ)v)/σ                    (score of x_σ given v)
         = x·(1 − σ̃² h/(2σ)) − v·(1 + σ̃² (1 − σ)/(2σ))·h                   (the form computed here)
    σ_t  = σ̃·sqrt(h)
    log p = mean over C,H,W of log N(x'; μ, σ_t²)                           (a per-element MEAN, not a sum)

Everything is computed in the input dtype promoted to at least float32 (upstream always used float32,
even for float64 inputs; we keep float64 when given so tests can check identities tightly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "flow_sigmas",
    "timesteps_from_sigmas",
    "index_for_timestep",
    "step_sigmas",
    "noise_scale",
    "sde_mean",
    "SDEStep",
    "gaussian_logprob_mean",
    "sde_step_with_logprob",
    "ode_step",
]

# SD3.5-Medium scheduler_config.json: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).
NUM_TRAIN_TIMESTEPS = 1000
SD35_SHIFT = 3.0

ScalarOrTensor = Union[float, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------

def _shift(u, shift: float):
    """SD3 timestep shift σ = s·u / (1 + (s − 1)·u) (Esser et al. 2024, resolution-dependent shifting)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_sigmas(num_steps: int, shift: float = SD35_SHIFT,
                num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Sigma table σ_0 = 1 > σ_1 > … > σ_{N−1} > σ_N = 0 of diffusers' FlowMatchEulerDiscreteScheduler.

    Returns float32 `[N+1]`, bit-identical to `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(N)`
    (no dynamic shifting). The quirk reproduced on purpose: diffusers takes the smallest *already shifted*
    training sigma as the end point of the linspace and then shifts the whole linspace again.
    """
    if not isinstance(num_steps, Integral) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    # The scheduler's constructor shifts its training grid t/1000, t = 1..1000, in float32; its last entry
    # is sigma_min (≈ 0.0029940 for shift 3), rounded to float32 before the second shift below.
    grid_min = torch.tensor(1.0 / num_train_timesteps, dtype=torch.float32)
    sigma_min = float(_shift(grid_min, shift))
    # set_timesteps: linspace over t = 1000σ in float64, divided back, shifted again, then cast to float32.
    u = torch.linspace(1.0 * num_train_timesteps, sigma_min * num_train_timesteps, num_steps,
                       dtype=torch.float64) / num_train_timesteps
    sigmas = _shift(u, shift).to(torch.float32)  # [N]
    return torch.cat([sigmas, sigmas.new_zeros(1)])  # [N+1]


def timesteps_from_sigmas(sigmas: torch.Tensor,
                          num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Transformer timesteps t_i = 1000·σ_i for i < N (the terminal σ_N = 0 has no step): `[N+1]` → `[N]`.

    Computed in the sigma dtype (float32 for `flow_sigmas`), exactly as the scheduler does, so the stored
    values round-trip through `index_for_timestep` by exact equality.
    """
    return sigmas[:-1] * num_train_timesteps


def index_for_timestep(timesteps: torch.Tensor, t: ScalarOrTensor) -> Union[int, torch.Tensor]:
    """Index i with timesteps[i] == t, by exact equality (stored timesteps are copies of the table).

    `t` a Python number or 0-d tensor → int; a 1-d tensor `[B]` → int64 tensor `[B]`. A value that is not
    in the table raises, rather than silently snapping to a neighbour.
    """
    table = timesteps.reshape(-1)  # [N]
    query = torch.as_tensor(t, dtype=table.dtype, device=table.device)
    hits = query.reshape(-1, 1) == table.reshape(1, -1)  # [B, N]
    found = hits.any(dim=1)
    if not bool(found.all()):
        missing = query.reshape(-1)[~found][:4].tolist()
        raise ValueError(f"timestep(s) {missing} not in the schedule {table.tolist()}")
    index = hits.to(torch.int64).argmax(dim=1)  # first match; entries of a valid table are distinct
    return int(index.item()) if query.ndim == 0 else index


def step_sigmas(sigmas: torch.Tensor, t: ScalarOrTensor,
                num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ, σ') of the transitions that start at stored timestep(s) `t`: shapes `[B]` each (`[1]` for a scalar).

    This is how the trainers turn a buffer's `timesteps` column back into the step's sigmas.
    """
    table = timesteps_from_sigmas(sigmas, num_train_timesteps)
    index = torch.as_tensor(index_for_timestep(table, t), device=sigmas.device).reshape(-1)  # [B]
    return sigmas[index], sigmas[index + 1]


# ----------------------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------------------

def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _per_row(value: ScalarOrTensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or a `[B]` vector of per-row values as `[B, 1, …, 1]` (broadcastable against `like`)."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1)
    rows = like.shape[0]
    if value.numel() == 1:
        value = value.expand(rows)
    elif value.numel() != rows:
        raise ValueError(f"per-row value has {value.numel()} entries but the batch has {rows} rows")
    return value.reshape(rows, *([1] * (like.ndim - 1)))


def noise_scale(sigma: torch.Tensor, noise_level: float, sigma_max: Optional[float] = None) -> torch.Tensor:
    """σ̃ = a·sqrt(σ / (1 − s)) with s = σ except at σ == 1, where s = σ_1 (the schedule's second sigma).

    Flow-GRPO's σ̃ = a·sqrt(σ/(1−σ)) diverges at σ = 1; upstream borrows the next sigma for the denominator
    there (spec §3.3 step 1). `sigma_max` is that σ_1; it is required only when some σ equals 1.
    """
    at_one = sigma == 1
    if bool(at_one.any()):
        if sigma_max is None:
            raise ValueError("sigma_max (σ_1 of the current schedule) is required for a step that starts at σ = 1")
        denominator = 1 - torch.where(at_one, torch.as_tensor(sigma_max, dtype=sigma.dtype, device=sigma.device), sigma)
    else:
        denominator = 1 - sigma
    return noise_level * torch.sqrt(sigma / denominator)


def sde_mean(velocity: torch.Tensor, sample: torch.Tensor, sigma: ScalarOrTensor, sigma_next: ScalarOrTensor,
             noise_level: float = 0.7, sigma_max: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean μ `[B, …]` and noise scale σ̃ `[B, 1, …]` of the SDE transition, from a velocity alone.

    This is the single place μ is computed: `sde_step_with_logprob` calls it, and the trainers call it to
    recompute μ_θ from a fresh velocity, so both paths agree bit for bit (spec §3.3, last paragraph).
    """
    dtype = _compute_dtype(velocity, sample)
    v = velocity.to(dtype)  # [B, C, H, W]
    x = sample.to(dtype)  # [B, C, H, W]
    s = _per_row(sigma, x)  # [B, 1, 1, 1]
    h = s - _per_row(sigma_next, x)  # [B, 1, 1, 1], > 0
    tilde = noise_scale(s, noise_level, sigma_max)  # [B, 1, 1, 1]
    # x − h(v − ½σ̃² s_σ) with s_σ = −(x + (1−σ)v)/σ, expanded into one coefficient per input.
    mean = x * (1 - tilde**2 * h / (2 * s)) - v * (1 + tilde**2 * (1 - s) / (2 * s)) * h
    return mean, tilde


@dataclass
class SDEStep:
    """Output of `sde_step_with_logprob` (B rows, latent shape `[C, H, W]`)."""

    prev_sample: torch.Tensor  # [B, C, H, W] x', the next (less noisy) latent
    log_prob: torch.Tensor  # [B] per-element mean of log N(x'; μ, σ_t² I)
    prev_sample_mean: torch.Tensor  # [B, C, H, W] μ
    std_dev_t: torch.Tensor  # [B, 1, 1, 1] σ_t = σ̃·sqrt(h)
    noise: Optional[torch.Tensor]  # [B, C, H, W] ε drawn here (x' = μ + σ_t ε); None when x' was given
    sqrt_h: torch.Tensor  # [B, 1, 1, 1] sqrt(σ − σ')
    tilde_sigma: torch.Tensor  # [B, 1, 1, 1] σ̃


def _draw_noise(shape, generator, dtype, device) -> torch.Tensor:
    # A list of generators gives one generator per row (diffusers' randn_tensor convention), so a row's
    # noise does not depend on which other rows share its batch.
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for {shape[0]} rows")
        rows = [torch.randn((1, *shape[1:]), generator=g, dtype=dtype, device=device) for g in generator]
        return torch.cat(rows)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def gaussian_logprob_mean(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-row mean over non-batch elements of log N(x; mean, std²): `[B, …]` → `[B]`."""
    elementwise = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return elementwise.mean(dim=tuple(range(1, elementwise.ndim)))


def sde_step_with_logprob(velocity: torch.Tensor, sigma: ScalarOrTensor, sigma_next: ScalarOrTensor,
                          sample: torch.Tensor, noise_level: float = 0.7,
                          prev_sample: Optional[torch.Tensor] = None,
                          generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
                          sigma_max: Optional[float] = None) -> SDEStep:
    """One Flow-GRPO SDE step from σ to σ' (per row), with the log-probability of its result.

    velocity, sample: `[B, C, H, W]`; sigma, sigma_next: scalars or `[B]`; sigma_max: σ_1 of the current
    schedule (needed when σ = 1). If `prev_sample` x' is given, it is scored instead of sampled (the
    trainer's re-evaluation); it is treated as a constant, so gradients reach log p only through μ.
    `noise_level = 0` gives μ = x − h·v and σ_t = 0 (log p is then not finite; use `ode_step` instead).
    """
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} and sample {tuple(sample.shape)} must have the same shape")
    if prev_sample is not None and generator is not None:
        raise ValueError("pass either prev_sample (to score a given x') or generator (to draw x'), not both")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample {tuple(prev_sample.shape)} must have the sample's shape {tuple(sample.shape)}")

    mean, tilde = sde_mean(velocity, sample, sigma, sigma_next, noise_level, sigma_max)  # [B,C,H,W], [B,1,1,1]
    dtype = mean.dtype
    sqrt_h = torch.sqrt(_per_row(sigma, mean) - _per_row(sigma_next, mean))  # [B, 1, 1, 1]
    std = tilde * sqrt_h  # [B, 1, 1, 1]

    noise = None
    if prev_sample is None:
        noise = _draw_noise(mean.shape, generator, dtype, mean.device)  # [B, C, H, W]
        prev_sample = mean + std * noise
    else:
        prev_sample = prev_sample.to(dtype)

    log_prob = gaussian_logprob_mean(prev_sample.detach(), mean, std)  # [B]
    return SDEStep(prev_sample=prev_sample, log_prob=log_prob, prev_sample_mean=mean, std_dev_t=std,
                   noise=noise, sqrt_h=sqrt_h, tilde_sigma=tilde)


def ode_step(velocity: torch.Tensor, sigma: ScalarOrTensor, sigma_next: ScalarOrTensor,
             sample: torch.Tensor) -> torch.Tensor:
    """Deterministic Euler step x' = x − (σ − σ')·v of the probability-flow ODE: `[B, C, H, W]`.

    Used for the branch sampler's backbone and ODE completion, and for evaluation (spec §3.5, §3.6).
    """
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} and sample {tuple(sample.shape)} must have the same shape")
    dtype = _compute_dtype(velocity, sample)
    x = sample.to(dtype)
    h = _per_row(sigma, x) - _per_row(sigma_next, x)  # [B, 1, 1, 1]
    return x - h * velocity.to(dtype)
