"""Samplers for SD3.5 as plain functions of a velocity callable, a starting noise and a sigma table.

Every sampler here takes `velocity(x [B, C, H, W], t [B], rows [B] int64) -> v [B, C, H, W]`, where `t` is the
transformer timestep 1000·σ of each row and `rows` says which prompt of the rollout each row belongs to (so one
call may mix prompts and timesteps, as the branch sampler's ODE completion does). `make_cfg_velocity` builds that
callable from diffusers' SD3Transformer2DModel, precomputed prompt embeddings and classifier-free guidance; tests
pass any function with the same signature. The step math lives in `sde.py`; nothing here re-derives it.

    sample_sde_trajectory  the `default` (Flow-GRPO) rollout: N SDE steps with log-probs   (spec §3.4)
    sample_ode             deterministic Euler sampling, used for evaluation (40 steps)     (spec §3.6)
    decode_latents         latents -> images in [0, 1] through the VAE                      (spec §3.1)

The `branch` sampler (TempFlow-GRPO-style trajectory branching) is in `sampling_branch.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .sde import ode_step, sde_step_with_logprob, timesteps_from_sigmas

__all__ = [
    "Velocity",
    "make_cfg_velocity",
    "initial_latents",
    "Trajectory",
    "sample_sde_trajectory",
    "sample_ode",
    "decode_latents",
]

# velocity(latents [B, C, H, W], timesteps [B], rows [B] int64 prompt index) -> guided velocity [B, C, H, W]
Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# SD3.5-Medium: 16 latent channels, VAE downsamples by 8 (vae/config.json; spec §3.1).
SD35_LATENT_CHANNELS = 16
SD35_VAE_FACTOR = 8


def make_cfg_velocity(transformer, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                      negative_prompt_embeds: torch.Tensor, negative_pooled_prompt_embeds: torch.Tensor,
                      guidance_scale: float) -> Velocity:
    """Guided velocity v = v_u + g·(v_c − v_u) of an SD3 transformer for the prompts of one rollout.

    prompt_embeds `[P, S, D]`, pooled `[P, Dp]`: one entry per prompt of the rollout; a call's `rows` index them.
    The negative (empty-prompt) embeddings may be `[1, S, D]`/`[1, Dp]` (stored once) or one per prompt.
    With g > 1 the transformer sees the batch [uncond rows ; cond rows] in one call (the upstream layout, so
    both halves see identical latents/timesteps); with g <= 1 guidance is off and only the cond rows run.
    The output is cast to the embedding dtype, as upstream stores v_old (fp16 with fp16 embeddings).
    Gradients flow through both halves: this same callable is used for the trainer's forward pass.
    """
    if prompt_embeds.shape[0] != pooled_prompt_embeds.shape[0]:
        raise ValueError(f"prompt_embeds has {prompt_embeds.shape[0]} prompts but pooled_prompt_embeds has "
                         f"{pooled_prompt_embeds.shape[0]}")
    use_cfg = guidance_scale > 1.0
    model_dtype = transformer.dtype

    def _per_prompt(embeds: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # A single stored negative embedding serves every row.
        if embeds.shape[0] == 1:
            return embeds.expand(rows.shape[0], *embeds.shape[1:])
        return embeds.index_select(0, rows)

    def velocity(latents: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(device=prompt_embeds.device, dtype=torch.long)  # [B]
        text = prompt_embeds.index_select(0, rows)  # [B, S, D]
        pooled = pooled_prompt_embeds.index_select(0, rows)  # [B, Dp]
        x = latents.to(model_dtype)  # [B, C, H, W]
        t = timesteps.to(device=latents.device).reshape(-1).expand(latents.shape[0])  # [B]
        if use_cfg:
            text = torch.cat([_per_prompt(negative_prompt_embeds, rows), text])  # [2B, S, D]
            pooled = torch.cat([_per_prompt(negative_pooled_prompt_embeds, rows), pooled])  # [2B, Dp]
            x = torch.cat([x, x])  # [2B, C, H, W]
            t = torch.cat([t, t])  # [2B]
        out = transformer(hidden_states=x, timestep=t, encoder_hidden_states=text.to(model_dtype),
                          pooled_projections=pooled.to(model_dtype), return_dict=False)[0]
        out = out.to(prompt_embeds.dtype)
        if not use_cfg:
            return out  # [B, C, H, W]
        v_uncond, v_cond = out.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)  # [B, C, H, W]

    return velocity


def initial_latents(batch: int, resolution: int, *, channels: int = SD35_LATENT_CHANNELS,
                    vae_factor: int = SD35_VAE_FACTOR, generator: Optional[torch.Generator] = None,
                    dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """x_0 ~ N(0, I) of shape `[batch, channels, resolution/f, resolution/f]` (512 px -> [B, 16, 64, 64])."""
    if resolution % vae_factor:
        raise ValueError(f"resolution {resolution} must be a multiple of the VAE factor {vae_factor}")
    side = resolution // vae_factor
    return torch.randn((batch, channels, side, side), generator=generator, dtype=dtype, device=device)


def _sigma_at_one(sigmas: torch.Tensor) -> float:
    # The σ̃ denominator at σ = 1 borrows σ_1 of the *current* schedule (spec §3.3 step 1).
    return float(sigmas[1])


@dataclass
class Trajectory:
    """One `default` rollout: B full SDE trajectories of N steps (spec §3.4). Step j maps x_j to x_{j+1}."""

    latents: torch.Tensor  # [B, N, C, H, W] x_0..x_{N-1}, the inputs of each step (in the latent dtype)
    next_latents: torch.Tensor  # [B, N, C, H, W] fp32 x_1..x_N, the SDE samples
    log_probs: torch.Tensor  # [B, N] fp32 log p(x_{j+1} | x_j), per-element mean (sde.py)
    timesteps: torch.Tensor  # [B, N] t_j = 1000·σ_j, the same row for every sample
    prev_sample_mean: Optional[torch.Tensor] = None  # [B, N, C, H, W] fp32 μ_j (matching, grpo_guard)
    noises: Optional[torch.Tensor] = None  # [B, N, C, H, W] fp32 ε_j with x_{j+1} = μ_j + σ_t ε_j (matching)
    noise_preds: Optional[torch.Tensor] = None  # [B, N, C, H, W] guided velocity v_j^old, embedding dtype (matching)

    @property
    def final_latents(self) -> torch.Tensor:
        """x_N `[B, C, H, W]`: what gets decoded and rewarded."""
        return self.next_latents[:, -1]


@torch.no_grad()
def sample_sde_trajectory(velocity: Velocity, latents: torch.Tensor, sigmas: torch.Tensor, *,
                          noise_level: float = 0.7, generator: Optional[torch.Generator] = None,
                          keep_prev_sample_mean: bool = False, keep_matching_aux: bool = False) -> Trajectory:
    """Flow-GRPO rollout: from x_0 take all N SDE steps (the last one to σ = 0), recording log-probs.

    latents: x_0 `[B, C, H, W]`; sigmas: `[N+1]` from `sde.flow_sigmas(N)`; row b uses prompt b.
    noise_level a = 0.7 (Flow-GRPO's SD3 config, `sample.noise_level`). The next step's input is x_{j+1} cast to
    x_0's dtype, while the stored next_latents keep the fp32 step output (upstream does the same, spec §3.4).
    """
    batch = latents.shape[0]
    rows = torch.arange(batch, device=latents.device)  # [B]
    timesteps = timesteps_from_sigmas(sigmas).to(latents.device)  # [N]
    sigma_max = _sigma_at_one(sigmas)
    x = latents
    inputs, outputs, log_probs, means, noises, preds = [], [], [], [], [], []
    for j in range(len(timesteps)):
        v = velocity(x, timesteps[j].expand(batch), rows)  # [B, C, H, W]
        step = sde_step_with_logprob(v, sigmas[j], sigmas[j + 1], x, noise_level=noise_level,
                                     generator=generator, sigma_max=sigma_max)
        inputs.append(x)
        outputs.append(step.prev_sample)
        log_probs.append(step.log_prob)
        if keep_prev_sample_mean or keep_matching_aux:
            means.append(step.prev_sample_mean)
        if keep_matching_aux:
            noises.append(step.noise)
            preds.append(v)
        x = step.prev_sample.to(latents.dtype)

    def stack(items):
        return torch.stack(items, dim=1) if items else None  # [B, N, ...]

    return Trajectory(latents=stack(inputs), next_latents=stack(outputs), log_probs=stack(log_probs),
                      timesteps=timesteps.unsqueeze(0).expand(batch, -1).clone(),
                      prev_sample_mean=stack(means), noises=stack(noises), noise_preds=stack(preds))


@torch.no_grad()
def sample_ode(velocity: Velocity, latents: torch.Tensor, sigmas: torch.Tensor,
               rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deterministic Euler sampling through all N steps of `sigmas` `[N+1]`: x_0 `[B, C, H, W]` -> x_N.

    Evaluation uses this with N = 40 (`sample.eval_num_steps`, spec §3.6); upstream's train_sd3.py reached the
    same update through the SDE pipeline with noise_level = 0, which only adds a non-finite log-prob.
    """
    batch = latents.shape[0]
    rows = torch.arange(batch, device=latents.device) if rows is None else rows  # [B]
    timesteps = timesteps_from_sigmas(sigmas).to(latents.device)  # [N]
    x = latents
    for j in range(len(timesteps)):
        v = velocity(x, timesteps[j].expand(batch), rows)
        x = ode_step(v, sigmas[j], sigmas[j + 1], x).to(latents.dtype)
    return x  # [B, C, H, W]


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Latents `[B, C, h, w]` -> images `[B, 3, f·h, f·w]` fp32 in [0, 1], `chunk_size` rows at a time.

    SD3 latents are normalised as (z − shift)·scale, so decoding undoes that first (scale 1.5305, shift 0.0609
    for SD3.5, read from the VAE config); the VAE outputs [-1, 1], mapped to [0, 1] and clamped like diffusers'
    image post-processing for output_type="pt".
    """
    scale = vae.config.scaling_factor
    shift = vae.config.shift_factor or 0.0
    step = latents.shape[0] if not chunk_size else chunk_size
    images = []
    for start in range(0, latents.shape[0], max(step, 1)):
        z = latents[start:start + step].to(vae.dtype) / scale + shift
        decoded = vae.decode(z, return_dict=False)[0].float()  # [b, 3, H, W] in [-1, 1]
        images.append((decoded / 2 + 0.5).clamp(0, 1))
    return torch.cat(images)
