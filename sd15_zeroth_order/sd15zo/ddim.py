"""One DDIM step with its log-probability (spec §3.2; DDPO's `ddim_step_with_logprob` as PCPO extended it).

    x̂0 = (x_t − √(1 − a) ε̃) / √a
    μ  = √a' x̂0 + √(1 − a' − σ²) ε̃          (= x_t/√α_t − (c1 − c2) ε̃)
    x' = μ + σ ξ,   ξ ~ N(0, I)               (or the given `prev_sample`)
    ℓ  = mean_CHW[ −(sg(x') − μ)² / (2σ²) ]   (no −log σ − ½ log 2π; a mean over the latent, not a sum)

σ = η · σ_PCPO(t; const_weight) for `uw-sigma`, η · σ_DDPM(t) otherwise (schedule.step_sigma). For `uw-lambda` the
effective prediction is ε̃ = ε_ref + λ_t (ε̂ − ε_ref) with λ_t = const_weight · σ / (c1 − c2(σ)); every other
algorithm uses ε̃ = ε̂. The timestep may be a scalar or one per row.

Differences from upstream, on purpose: with η = 0 (σ = 0, the deterministic passes) no noise is drawn and no
log-probability is returned (upstream drew ξ anyway and returned 0/0 = NaN, spec §11 item 14); the unused
"text" predictions are not in the signature. `clip_sample_range` clamps x̂0 (the config key `clip_sample`,
never set by the presets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import schedule


@dataclass
class DDIMStep:
    prev_sample: torch.Tensor           # x' [B, C, H, W], in the dtype of x_t
    log_prob: Optional[torch.Tensor]    # ℓ [B]; None when σ = 0
    noise: Optional[torch.Tensor]       # ξ [B, C, H, W] used for x' (None with prev_sample or σ = 0)
    mean: torch.Tensor                  # μ [B, C, H, W]
    std: torch.Tensor                   # σ broadcast to [B, 1, 1, 1] (or a scalar tensor)


def _per_row(value: torch.Tensor, ndim: int) -> torch.Tensor:
    """A scalar or [B] tensor reshaped to broadcast against a [B, C, H, W] latent."""
    return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def ddim_step_with_logprob(alphas_cumprod: torch.Tensor, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                           *, num_inference_steps: int, eta: float, algorithm: str, const_weight=None,
                           model_output_ref: Optional[torch.Tensor] = None, rg_scale: float = 1.0,
                           noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                           prev_sample: Optional[torch.Tensor] = None, clip_sample_range: Optional[float] = None,
                           num_train_timesteps: int = schedule.NUM_TRAIN_TIMESTEPS) -> DDIMStep:
    """x_t -> x_{t_prev} (spec §3.2). `model_output` is the CFG-combined ε̂ [B, C, H, W] (`model_output_ref` the
    reference model's, needed for `uw-lambda`); `timestep` an int, a 0-d tensor or a [B] tensor; `noise` an
    externally supplied ξ; `prev_sample` a given x' (then ℓ is its log-probability and nothing is drawn)."""
    if prev_sample is not None and generator is not None:
        raise ValueError("pass either prev_sample or generator, not both")
    t = torch.as_tensor(timestep, dtype=torch.long, device=alphas_cumprod.device)
    dtype = torch.promote_types(model_output.dtype, alphas_cumprod.dtype)
    alphas = alphas_cumprod.to(dtype)
    a, a_prev = schedule.step_alphas(alphas, t, num_inference_steps, num_train_timesteps)
    sigma = schedule.step_sigma(alphas, t, num_inference_steps, eta, algorithm, const_weight)
    device, ndim = sample.device, sample.ndim
    a, a_prev, sigma = (_per_row(v, ndim).to(device) for v in (a, a_prev, sigma))

    eps = model_output.to(dtype)
    if "lambda" in algorithm:
        if model_output_ref is None:
            raise ValueError(f"algorithm={algorithm!r} needs the reference model's prediction")
        if const_weight is not None:
            lam = const_weight * sigma / (schedule.c1(a, a_prev) - schedule.c2(a_prev, sigma))
        else:
            lam = rg_scale * torch.ones_like(a)
        ref = model_output_ref.to(dtype)
        eps = ref + lam * (eps - ref)

    x = sample.to(dtype)
    x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    mean = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps

    stochastic = bool(eta != 0)
    if prev_sample is None:
        if stochastic:
            if noise is None:
                noise = torch.randn(sample.shape, generator=generator, device=device, dtype=dtype)
            prev = mean + sigma * noise.to(dtype)
        else:
            noise, prev = None, mean
    else:
        noise, prev = None, prev_sample
    log_prob = None
    if stochastic:
        log_prob = (-((prev.detach().to(dtype) - mean) ** 2) / (2 * sigma ** 2)).mean(dim=tuple(range(1, ndim)))
    return DDIMStep(prev.to(sample.dtype), log_prob, noise, mean, sigma)


def ddim_ode_step(alphas_cumprod: torch.Tensor, model_output: torch.Tensor, timestep, sample: torch.Tensor, *,
                  num_inference_steps: int, algorithm: str, const_weight=None,
                  model_output_ref: Optional[torch.Tensor] = None, clip_sample_range: Optional[float] = None
                  ) -> torch.Tensor:
    """The deterministic (η = 0) step of the root and continuation passes: x' = μ with σ = 0. For `uw-lambda`
    λ = 0 there, so ε̃ = ε_ref (upstream's behaviour: the deterministic passes follow the reference model)."""
    return ddim_step_with_logprob(alphas_cumprod, model_output, timestep, sample,
                                  num_inference_steps=num_inference_steps, eta=0.0, algorithm=algorithm,
                                  const_weight=const_weight, model_output_ref=model_output_ref,
                                  clip_sample_range=clip_sample_range).prev_sample
