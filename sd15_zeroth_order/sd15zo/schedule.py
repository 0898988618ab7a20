"""The SD1.5 DDIM schedule and the per-step coefficients every algorithm is written in (spec §3.1, §3.3, §3.4).

Notation for one step at timestep t (spec §3.1): a = ᾱ_t, a' = ᾱ_{t_prev} with
t_prev = clamp(t − T // N, 0, T − 1) (T = 1000 training timesteps, N inference steps), α_t = a / a',
β̄ = 1 − a, β̄' = 1 − a', and

    c1(t)    = √(1 − a) / √α_t                   (c1² = (1 − a) / α_t)
    c2(t, σ) = √(1 − a' − σ²)
    σ_DDPM   = √( (β̄'/β̄) · (1 − α_t) )          the DDPM posterior std (DDIM with η = 1)
    σ_PCPO   = [ w·√(c1²) + √((1 + w²)·β̄' − c1²) ] / (1 + w²)     PCPO's σ for a constant weight w
    w(t)     = (c1 − c2(t, σ_DDPM)) / σ_DDPM        the natural per-step weight of a Gaussian policy

Because of the clamp, the last step (t = 1 for N = 50) uses a' = ᾱ_0, never 1 (`final_alpha_cumprod` is dead
code upstream). σ_PCPO is the "+" root of (1 + w²)σ² − 2 w c1 σ + (c1² − β̄') = 0 and is implemented literally:
for the preset w = 4.5 it lands on the branch (c1 + c2)/σ = w, not (c1 − c2)/σ = w (spec §3.4, §11 item 13);
the paper numbers rest on this root, so it is not "fixed". For small w the square root goes negative (NaN) at
the last steps; `config.validate_sigma` refuses such a const_weight before anything loads.

Every function takes the timesteps as a tensor (scalar or per row) and the step count N explicitly (upstream's
baseline inferred N from a tensor width, spec §11 item 12). Values are computed in the dtype of `alphas_cumprod`
(float32 from diffusers; pass `.double()` for float64).
"""
from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000  # SD1.5 scheduler config


def inference_timesteps(scheduler, num_steps: int) -> torch.Tensor:
    """The N timesteps of the DDIM scheduler, noisiest first ([981, 961, ..., 1] for SD1.5 and N = 50: "leading"
    spacing with steps_offset 1). Uses diffusers' own `set_timesteps` on a copy of the scheduler's config."""
    from diffusers import DDIMScheduler

    copy = DDIMScheduler.from_config(scheduler.config)
    copy.set_timesteps(num_steps)
    return copy.timesteps.clone().long()


def prev_timestep(timestep: torch.Tensor, num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """t_prev = clamp(t − T // N, 0, T − 1) (spec §3.2 step 1)."""
    return torch.clamp(timestep - num_train_timesteps // num_steps, 0, num_train_timesteps - 1)


def step_alphas(alphas_cumprod: torch.Tensor, timestep, num_steps: int,
                num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, a') = (ᾱ_t, ᾱ_{t_prev}) for a scalar or per-row timestep; shape of `timestep`."""
    t = torch.as_tensor(timestep, dtype=torch.long, device=alphas_cumprod.device)
    return alphas_cumprod[t], alphas_cumprod[prev_timestep(t, num_steps, num_train_timesteps)]


def c1(a: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """c1 = √(1 − a) / √(a / a')."""
    return torch.sqrt(1 - a) / torch.sqrt(a / a_prev)


def c2(a_prev: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """c2 = √(1 − a' − σ²) (NaN when σ² > 1 − a')."""
    return torch.sqrt(1 - a_prev - sigma ** 2)


def sigma_ddpm(a: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """The DDPM posterior std √((1 − a')/(1 − a) · (1 − a/a')) (diffusers DDIM `_get_variance`, η = 1)."""
    return torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))


def sigma_pcpo(a: torch.Tensor, a_prev: torch.Tensor, weight: float) -> torch.Tensor:
    """PCPO's σ for the constant weight w = `weight` (upstream `_get_std`, literally: the "+" root)."""
    c1_squared = (1 - a) / (a / a_prev)
    return (weight * c1_squared ** 0.5 + ((1 - a_prev) * (weight ** 2 + 1) - c1_squared) ** 0.5) / (weight ** 2 + 1)


def natural_weight(alphas_cumprod: torch.Tensor, timestep, num_steps: int) -> torch.Tensor:
    """w(t) = (c1 − c2(σ_DDPM)) / σ_DDPM at each timestep (upstream `compute_inference_weights`, with the step
    count N passed explicitly). Mean over the 50 SD1.5 timesteps: 0.51690, the value behind const_weight 4.5 /
    weight_scale_factor 8.70575 and uw-lambda's 0.5168997 (spec §3.4)."""
    a, a_prev = step_alphas(alphas_cumprod, timestep, num_steps)
    sigma_squared = (1 - a_prev) * (1 - a / a_prev) / (1 - a)  # upstream's order of operations (float32 parity)
    return (c1(a, a_prev) - torch.sqrt(1 - a_prev - sigma_squared)) / torch.sqrt(sigma_squared)


def step_sigma(alphas_cumprod: torch.Tensor, timestep, num_steps: int, eta: float, algorithm: str,
               const_weight=None) -> torch.Tensor:
    """σ_t of the sampler: η · σ_PCPO(t; const_weight) for `uw-sigma`, η · σ_DDPM(t) for every other algorithm;
    exactly 0 for η = 0 (upstream multiplied, which gives 0 · NaN = NaN where σ_PCPO has no real value: the
    deterministic passes of a schedule other than SD1.5's 50 steps, spec §3.4)."""
    a, a_prev = step_alphas(alphas_cumprod, timestep, num_steps)
    if eta == 0:
        return torch.zeros_like(a)
    if "sigma" in algorithm:
        return sigma_pcpo(a, a_prev, const_weight) * eta
    return eta * sigma_ddpm(a, a_prev)
