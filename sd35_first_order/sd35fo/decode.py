"""The latent -> image map (spec §4.1): `D(y) = clamp((dec(y / a + b) + 1) / 2, 0, 1)` with the decoder's scaling
`a` and shift `b` read from its config (TAESD3: 1.5305, 0.0; the SD3 VAE: 1.5305, 0.0609)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def to_decoder_input(vae, latents: torch.Tensor) -> torch.Tensor:
    """`y / scaling_factor + shift_factor` in float32 (shift 0 when the config has none)."""
    latents = latents.to(torch.float32)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return latents / vae.config.scaling_factor + shift


def decode(vae, latents: torch.Tensor, soft: bool = False) -> torch.Tensor:
    """Differentiable `D`: `[B, C, h, w]` latents -> `[B, 3, H, W]` float32 images in [0, 1]. The hard clamp has zero
    gradient where it saturates; `soft` is upstream's never-selected softplus clamp (beta 10)."""
    y = to_decoder_input(vae, latents).to(next(vae.parameters()).dtype)
    image = vae.decode(y, return_dict=False)[0].to(torch.float32)
    image = (image + 1) / 2
    if not soft:
        return image.clamp(0.0, 1.0)
    beta = 10.0
    return F.softplus(beta * image) / beta - F.softplus(beta * (image - 1.0)) / beta


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """`D` without a graph (sampling, evaluation), optionally in chunks of `chunk_size` latents."""
    if not chunk_size or latents.shape[0] <= chunk_size:
        return decode(vae, latents)
    return torch.cat([decode(vae, part) for part in latents.split(chunk_size)])
