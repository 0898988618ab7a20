"""The sampling phase (spec §3): prompts -> SD3 text embeddings -> 20-step Euler ODE with CFG under the current
policy -> TAESD3 decode -> reward; for ours also the terminal reward gradient. No autograd except that gradient.

A rollout batch is a dict with the fields of spec §3's sample record:

    prompts [B], prompt_metadata [B], prompt_embeds [B, L, D], pooled_prompt_embeds [B, P],
    negative_prompt_embeds [B, L, D], negative_pooled_prompt_embeds [B, P], timesteps [B, N] (1000 sigma, fp32),
    latents [B, N+1, C, h, w] (z_0..z_N, weight dtype), rewards [B] fp32, step_index [B, N] int64,
    rgrad_x1 [B, C, h, w] fp32 (ours), unet_outputs [B, N, C, h, w] (with model.unet_reg_scale > 0)
"""
from __future__ import annotations

import torch

from .decode import decode_images
from .guidance import transformer_velocity
from .schedule import euler_step


@torch.no_grad()
def encode_prompts(pipe, prompts, device, max_sequence_length: int = 256):
    """(text [2B, L, D], pooled [2B, P]) stacked [negative; positive] with the empty negative prompt, and the four
    pieces: SD3's standard encoding (CLIP-L + CLIP-G padded to the T5 width, then T5), CFG on, one image a prompt."""
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=True, negative_prompt=None, max_sequence_length=max_sequence_length)
    return positive, negative, pooled, negative_pooled


def initial_noise(batch: int, transformer, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """z_0 ~ N(0, I) `[B, C, h, w]` at the transformer's default latent size (128 for SD3.5-M: 1024 px)."""
    size = transformer.config.sample_size
    shape = (batch, transformer.config.in_channels, size, size)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device, dtype)


@torch.no_grad()
def sample_ode(transformer, z0, text, pooled, sigmas, timesteps, guidance_scale, keep_velocities=False,
               joint_attention_kwargs=None, progress=None):
    """The deterministic Euler ODE with CFG: `z_{i+1} = z_i + (sigma_{i+1} - sigma_i) v_i`, `v_i = u + w (k - u)`.
    Returns (latents [B, N+1, ...], velocities [B, N, ...] or None)."""
    latents, velocities = [z0], []
    z = z0
    steps = range(len(timesteps)) if progress is None else progress(range(len(timesteps)))
    for i in steps:
        s = timesteps[i].expand(z.shape[0]).to(z.device)
        v = transformer_velocity(transformer, z, s, text, pooled, guidance_scale, False, joint_attention_kwargs)
        z = euler_step(z, v, sigmas[i], sigmas[i + 1])
        latents.append(z)
        if keep_velocities:
            velocities.append(v)
    return torch.stack(latents, dim=1), (torch.stack(velocities, dim=1) if keep_velocities else None)


class NonFiniteRollout(RuntimeError):
    """The policy produced non-finite latents (a diverged run); the trainer turns it into its one-line error."""


def rollout_batch(*, pipe, transformer, vae, reward_fn, reward_grad, prompts, metadata, sigmas, timesteps,
                  guidance_scale, generator, device, weight_dtype, keep_velocities=False, terminal_gradient=False,
                  leaf_dtype=None, timer=None, progress=None):
    """One rollout batch of `len(prompts)` trajectories (spec §3 steps 1-10). `timer(name)` is a context manager
    that attributes time to a phase ("reward_grad" for ours' terminal gradient)."""
    import contextlib

    timer = timer or (lambda name: contextlib.nullcontext())
    positive, negative, pooled, negative_pooled = encode_prompts(pipe, prompts, device)
    text, pooled_both = torch.cat([negative, positive]), torch.cat([negative_pooled, pooled])
    z0 = initial_noise(len(prompts), transformer, generator, device, weight_dtype)
    latents, velocities = sample_ode(transformer, z0, text, pooled_both, sigmas, timesteps, guidance_scale,
                                     keep_velocities, progress=progress)
    if not bool(torch.isfinite(latents[:, -1]).all()):
        raise NonFiniteRollout("the rollout's final latents are non-finite")
    images = decode_images(vae, latents[:, -1])  # [B, 3, H, W] in [0, 1]
    with torch.no_grad():
        rewards, _ = reward_fn(images, list(prompts), list(metadata))
    batch = len(prompts)
    record = {
        "prompts": list(prompts), "prompt_metadata": list(metadata),
        "prompt_embeds": positive, "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": negative_pooled,
        "timesteps": timesteps.to(device, torch.float32).repeat(batch, 1),
        "latents": latents, "rewards": rewards.detach().to(torch.float32),
        "step_index": torch.arange(len(timesteps), device=device, dtype=torch.int64).view(1, -1).expand(batch, -1).clone(),
    }
    if terminal_gradient:
        # spec §3 step 9: g* = RewardGrad(z_N, z_N, tau = inf), the leaf in the stored dtype (bf16, spec §10 N4)
        leaf = latents[:, -1].detach().to(leaf_dtype or latents.dtype).requires_grad_(True)
        with timer("reward_grad"):
            record["rgrad_x1"] = reward_grad(leaf, leaf, prompts, metadata, float("inf"), retain_graph=False).grad
    if keep_velocities:
        record["unet_outputs"] = velocities
    return record, images


def concatenate(batches: list) -> dict:
    """Rollout batches -> one sample record (lists joined, tensors concatenated along dim 0)."""
    out = {}
    for key in batches[0]:
        if isinstance(batches[0][key], list):
            out[key] = [item for b in batches for item in b[key]]
        else:
            out[key] = torch.cat([b[key] for b in batches])
    return out
