"""Sampling SD1.5 trajectories with DDIM log-probabilities (spec §3.4-3.5), beside diffusers' own pipeline.

`sample_trajectories` runs the N DDIM steps of a batch from seeded noise with classifier-free guidance and
returns every latent, the CFG-combined ε of every step (the trust region's ε_old), the log-probabilities and
the decoded images. The UNet is any callable `unet(x, t, encoder_hidden_states=...)` (diffusers'
UNet2DConditionModel with or without its LoRA adapter); nothing here mutates a scheduler: the timesteps and
the ᾱ table are passed in (spec §9 item 15).

Random draws, in order, from the one generator: the initial latent [B, 4, h, w] in the embeddings' dtype, then
one [B, 4, h, w] draw per step in ε's dtype (the reference's order, spec §5.7).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .schedule import ddim_step


def sampling_timesteps(num_train_timesteps: int, num_steps: int, steps_offset: int = 1) -> torch.Tensor:
    """The "leading" DDIM timesteps [N] (int64): 981, 961, ..., 1 for T = 1000, N = 50, offset 1 (SD1.5)."""
    ratio = num_train_timesteps // num_steps
    return (torch.arange(0, num_steps) * ratio).flip(0).long() + steps_offset


def encode_prompts(tokenizer, text_encoder, prompts: list, device) -> torch.Tensor:
    """CLIP text embeddings [B, 77, D]: padded / truncated to the tokenizer's max length."""
    ids = tokenizer(prompts, return_tensors="pt", padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length).input_ids.to(device)
    return text_encoder(ids)[0]


def cfg_eps(unet: Callable, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, guidance_scale: float,
            with_text: bool = False):
    """The CFG-combined ε_u + w (ε_c - ε_u) of one UNet call on [x; x] with `embeds` = [negatives; prompts]
    [2B, 77, D]; `t` a 0-d tensor or [B]. Guidance ≤ 1 runs the text branch alone (`embeds` = prompts [B])."""
    if guidance_scale <= 1.0:
        eps = unet(x, t, encoder_hidden_states=embeds).sample
        return (eps, eps) if with_text else eps
    t2 = torch.cat([t] * 2) if t.ndim else t
    eps_u, eps_c = unet(torch.cat([x] * 2), t2, encoder_hidden_states=embeds).sample.chunk(2)
    eps = eps_u + guidance_scale * (eps_c - eps_u)
    return (eps, eps_c) if with_text else eps


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """D(z) = clamp(VAE.decode(z / scaling) / 2 + 0.5, 0, 1): images [B, 3, H, W] in the VAE's dtype."""
    image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)


@dataclass
class Trajectories:
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    latents: torch.Tensor  # [B, N+1, C, h, w]: x before each step, then z0
    noise_preds: torch.Tensor  # [B, N, C, h, w] CFG-combined ε of each step (ε_old)
    log_probs: torch.Tensor  # [B, N] float32
    timesteps: torch.Tensor  # [B, N] int64


@torch.no_grad()
def sample_trajectories(unet: Callable, vae, alphas_cumprod: torch.Tensor, prompt_embeds: torch.Tensor,
                        negative_embeds: torch.Tensor, *, timesteps: torch.Tensor, guidance_scale: float, eta: float,
                        generator: Optional[torch.Generator], latent_shape: tuple, num_train_timesteps: int = 1000,
                        decode_images: bool = True) -> Trajectories:
    """N DDIM steps (η, CFG `guidance_scale`) from seeded noise for B prompts (spec §3.5).

    `prompt_embeds` [B, 77, D]; `negative_embeds` [1 or B, 77, D] (the "" prompt, repeated to B);
    `latent_shape` (C, h, w); `timesteps` [N] (sampling_timesteps)."""
    batch, device = prompt_embeds.shape[0], prompt_embeds.device
    if guidance_scale > 1.0:
        embeds = torch.cat([negative_embeds.to(prompt_embeds.dtype).expand(batch, -1, -1), prompt_embeds])
    else:
        embeds = prompt_embeds
    x = torch.randn((batch, *latent_shape), generator=generator, device=device, dtype=prompt_embeds.dtype)
    steps = len(timesteps)
    latents, eps_all, log_probs = [x], [], []
    for t in timesteps.to(device):
        eps = cfg_eps(unet, x, t, embeds, guidance_scale)
        x, log_prob, _, _, *_ = ddim_step(alphas_cumprod, eps, t, x, eta=eta, num_train_timesteps=num_train_timesteps,
                                          num_inference_steps=steps, generator=generator)
        latents.append(x)
        eps_all.append(eps)
        log_probs.append(log_prob)
    images = decode(vae, x) if decode_images else None
    return Trajectories(images, torch.stack(latents, dim=1), torch.stack(eps_all, dim=1), torch.stack(log_probs, dim=1),
                        timesteps.to(device).repeat(batch, 1))
