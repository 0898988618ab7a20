"""JPEG (in)compressibility, the DDPO classic: file size of the image saved as JPEG by PIL."""
from __future__ import annotations

import io
from typing import Sequence

import torch

from .base import Reward, RewardOutput
from .preprocess import to_pil


def jpeg_size_kb(images: torch.Tensor, quality: int) -> torch.Tensor:
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)  # kB as in DDPO: bytes / 1000
    return torch.tensor(sizes, dtype=torch.float32)


class _JpegReward(Reward):
    needs_prompts = False
    weights_source = "none (PIL JPEG encoder)"
    sign = 1.0

    def __init__(self, device="cpu", dtype=torch.float32, *, quality: int = 95, divisor: float = 1.0):
        """quality: JPEG quality (95 in DDPO). divisor: 1 (DDPO, SD1.5 copies) or 500 (flow_grpo, SD3.5 ZO)."""
        super().__init__(device, dtype)
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"{self.name}: quality must be in [1, 100], got {quality!r}")
        if not divisor or divisor <= 0:
            raise ValueError(f"{self.name}: divisor must be > 0, got {divisor!r}")
        self.quality = int(quality)
        self.divisor = float(divisor)

    def score(self, images, prompts: Sequence[str] | None, metadata) -> RewardOutput:
        kb = jpeg_size_kb(images, self.quality)
        return RewardOutput(self.sign * kb / self.divisor, {"jpeg_kb": kb})


class JpegCompressibilityReward(_JpegReward):
    """Minus the JPEG size: smaller files score higher."""
    name = "jpeg_compressibility"
    sign = -1.0


class JpegIncompressibilityReward(_JpegReward):
    """The JPEG size: larger (more detailed) files score higher."""
    name = "jpeg_incompressibility"
