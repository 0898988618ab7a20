"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic human preferences."""
from __future__ import annotations

from typing import Sequence

import torch

from .base import RewardOutput
from .clip_common import HFCLIPReward


class PickScoreReward(HFCLIPReward):
    """exp(logit_scale) * cos(image, prompt) / divisor; raw values are about 18-23 for SD images.

    Options:
      weights: CLIPModel hub id or local directory ("yuvalkirstain/PickScore_v1").
      processor: tokenizer + image processor hub id or directory; upstream uses the CLIP-H one.
      divisor: 1.0 returns the raw score, as the SD1.5 copies and SD3.5 first order do; 26.0 is the
        SD3.5 zeroth-order preset (flow_grpo, "normalise to 0-1"), which maps scores to about 0.7-0.9.
      path: "tensor" (differentiable) or "pil" (CLIPProcessor on uint8 images, no gradient).
      resize_mode: tensor-path geometry; "crop" = CLIPProcessor's shorter side + centre crop,
        "pad" = open_clip's ResizeMaxSize, as the SD3.5 first-order copy did. Equal for square images.
    """

    name = "pickscore"
    weights_source = "hub: yuvalkirstain/PickScore_v1 + laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor"

    def __init__(self, device="cpu", dtype=torch.float32, *,
                 weights: str = "yuvalkirstain/PickScore_v1",
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 divisor: float = 1.0, path: str = "tensor", resize_mode: str = "crop"):
        super().__init__(device, dtype)
        if not isinstance(divisor, (int, float)) or not divisor > 0:
            raise ValueError(f"{self.name}: divisor must be a number > 0, got {divisor!r}")
        self.divisor = float(divisor)
        self._load(weights, processor, path, resize_mode, resize_modes=("crop", "pad"))

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, metadata) -> RewardOutput:
        cosine = self.cosine(images, prompts)  # [B]
        raw = self.model.logit_scale.exp() * cosine
        return RewardOutput(raw / self.divisor, {"pickscore_raw": raw.detach()})
