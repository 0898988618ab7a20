"""The reward-gradient operator (spec §4.2-4.3): `g = d r(D(y_in)) / d y_leaf` per sample, its pre-clip norm, the
mask `r >= 0`, and per-sample norm clipping at the threshold tau.

Clipping, faithful (spec §10 N3, `quirks.clip_shrink=True`): `clip_tau(g) = g / (|g| + 1e-8) * min(|g|, tau)`, which
shrinks g by |g|/(|g| + 1e-8) even below tau (and with tau = inf); reward gradients w.r.t. SD3 latents are tiny,
so this factor matters. Fixed: `g * min(1, tau / |g|)`, the identity below tau.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .decode import decode

CLIP_EPS = 1e-8


def per_sample_norm(g: torch.Tensor) -> torch.Tensor:
    """`[B, ...]` -> `[B]` L2 norms over everything but the batch."""
    return torch.linalg.norm(g.reshape(g.shape[0], -1), dim=1)


def clip_per_sample(g: torch.Tensor, tau: float, enabled: bool = True, shrink: bool = True) -> torch.Tensor:
    """clip_tau(g) for `g` `[B, ...]`; identity when `enabled` (training.quantile_clipping) is False."""
    if not enabled:
        return g
    norm = per_sample_norm(g).view(-1, *([1] * (g.dim() - 1)))
    if shrink:
        return g / (norm + CLIP_EPS) * norm.clamp(max=tau)
    if math.isinf(tau):
        return g
    return g * torch.where(norm > tau, tau / norm.clamp(min=torch.finfo(norm.dtype).tiny), torch.ones_like(norm))


class RewardGradient(NamedTuple):
    grad: torch.Tensor     # [B, C, h, w] float32, clipped, detached
    mask: torch.Tensor     # [B] float32, reward >= 0
    norm: torch.Tensor     # [B] float32, |g| before clipping
    rewards: torch.Tensor  # [B] float32, detached


class RewardGrad:
    """`(y_in, y_leaf, prompts, metadata, tau)` -> RewardGradient. `y_in` must be a differentiable function of the
    leaf `y_leaf`; only the leaf's gradient is taken (no parameter `.grad` is touched). Autocast is off inside:
    decode and reward run in float32 (upstream asked for an fp32 CUDA autocast, which amounts to the same)."""

    def __init__(self, reward_fn, vae, quantile_clipping: bool = True, clip_shrink: bool = True, soft_clamp=False):
        self.reward_fn, self.vae = reward_fn, vae
        self.quantile_clipping, self.clip_shrink, self.soft_clamp = quantile_clipping, clip_shrink, soft_clamp
        self.calls = 0  # reward forward+backward passes (the pruned baseline runs one per training timestep)

    def clip(self, g, tau):
        return clip_per_sample(g, tau, self.quantile_clipping, self.clip_shrink)

    def __call__(self, y_in, y_leaf, prompts, metadata, tau: float, retain_graph: bool = True) -> RewardGradient:
        device_type = y_in.device.type
        with torch.enable_grad(), torch.autocast(device_type=device_type, enabled=False):
            images = decode(self.vae, y_in.to(torch.float32), soft=self.soft_clamp)  # [B, 3, H, W]
            rewards, _ = self.reward_fn(images, list(prompts), list(metadata))  # [B]
            g = torch.autograd.grad(rewards.sum(), y_leaf, retain_graph=retain_graph)[0].detach().to(torch.float32)
        self.calls += 1
        rewards = rewards.detach().to(torch.float32)
        norm = per_sample_norm(g)
        return RewardGradient(self.clip(g, tau), (rewards >= 0).to(torch.float32), norm, rewards)
