"""The reward of a config (`reward_fn` + `reward_fn_kwargs`, upstream's names) on top of `shared_rewards`, and
the two reward gradients residual ∇-DB uses (spec §4.3-4.4, §5.4 REWARD_GUIDANCE, §6).

    hpsv2_score_diff       HPS v2.1 cosine, open_clip ViT-H-14, differentiable tensor path in fp32 (both configs)
    aesthetic_score_diff   LAION aesthetic MLP on CLIP ViT-L/14, shorter side to 224 + centre crop

Only differentiable rewards can train this method; upstream's other reward names (hps_v2, pickScore, clipScore,
jpeg_*) score without a gradient and are refused by the config check.

`terminal_gradient` is Ψ = ∇_z0 r(D(z0)) of "ours"; `lookahead_gradient` is the pruned baseline's
Ψ = ∇_x' r(D(x̂0_θ(x', t'))) through one policy UNet call. Both take only the input gradient (autograd.grad on a
leaf copy), so no parameter `.grad` changes.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .choices import REWARDS, reward_options  # noqa: F401
from .sampling import cfg_eps, decode
from .schedule import pred_orig_latent

def load(reward_fn: str, kwargs: dict, device) -> "RewardFn":
    from shared_rewards import load_reward

    name, options = reward_options(reward_fn, kwargs)
    return RewardFn(load_reward(name, device=device, dtype=torch.float32, **options))


def as_images(images) -> torch.Tensor:
    """Images for the reward: [B, C, H, W] or NHWC (last dim 1, 3 or 4), uint8 (/255) or float (/255 when its
    max exceeds 1), clamped to [0, 1] (zero gradient outside), 1 channel repeated to 3, extra channels dropped
    (the reference's preprocessing, spec §6.1). Float32."""
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"reward images must be 4-D [B, C, H, W] or [B, H, W, C], got shape {list(images.shape)}")
    if images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.permute(0, 3, 1, 2)
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    else:
        images = images.float()
        if images.detach().max() > 1:
            images = images / 255.0
    images = images.clamp(0, 1)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images[:, :3]


class RewardFn:
    """fn(images, prompts, metadata) -> (scores float32 [B], extras), differentiable in the images."""

    def __init__(self, reward):
        self.reward = reward

    def __call__(self, images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None):
        images = as_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward: got {images.shape[0]} images but {len(prompts)} prompts")
        out = self.reward(images.to(self.reward.device), list(prompts), None)
        return out.scores, out.extras


def terminal_gradient(reward: Callable, vae, z0: torch.Tensor, prompts, metadata=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ψ = ∇_z0 Σ_b r(D(z0_b)) [B, C, h, w] in z0's dtype, r [B]) on a leaf copy of z0."""
    z = z0.detach().clone().requires_grad_(True)
    scores = reward(decode(vae, z).float(), prompts, metadata)[0]
    (grad,) = torch.autograd.grad(scores.sum(), z)
    return grad.detach(), scores.detach()


def lookahead_gradient(reward: Callable, vae, unet: Callable, alphas_cumprod: torch.Tensor, x_next: torch.Tensor,
                       t_next: torch.Tensor, embeds: torch.Tensor, guidance_scale: float, prompts,
                       metadata=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ψ = ∇_x' Σ_b r(D(x̂0_θ(x', t'))) [B, C, h, w], r [B]): one CFG policy call at (x', t'), x̂0 by
    pred_orig_latent (x' itself where t' = 0), then the reward through the decoder (spec §4.3)."""
    y = x_next.detach().clone().requires_grad_(True)
    eps = cfg_eps(unet, y, t_next, embeds, guidance_scale)
    x0 = pred_orig_latent(alphas_cumprod, eps, y, t_next)
    scores = reward(decode(vae, x0).float(), prompts, metadata)[0]
    (grad,) = torch.autograd.grad(scores.sum(), y)
    return grad.detach(), scores.detach()
