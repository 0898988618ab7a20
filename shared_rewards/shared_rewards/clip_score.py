"""CLIP score: cosine similarity between a CLIP image embedding and its prompt's text embedding."""
from __future__ import annotations

from typing import Sequence

import torch

from .base import RewardOutput
from .clip_common import HFCLIPReward


class CLIPScoreReward(HFCLIPReward):
    """cos(image, prompt) with a transformers CLIPModel; the SD1.5 copies return this raw cosine.

    Options:
      weights: CLIPModel + processor hub id or local directory ("openai/clip-vit-base-patch16" as in
        the SD1.5 copies; later flow_grpo versions use "openai/clip-vit-large-patch14").
      w: None returns the raw cosine; a number returns w * max(cos, 0), the CLIPScore paper's
        convention (Hessel et al. 2021 use w = 2.5).
      path: "tensor" (differentiable, CLIPProcessor geometry in torch) or "pil" (CLIPProcessor).
    """

    name = "clipscore"
    weights_source = "hub: openai/clip-vit-base-patch16"

    def __init__(self, device="cpu", dtype=torch.float32, *,
                 weights: str = "openai/clip-vit-base-patch16", w: float | None = None, path: str = "tensor"):
        super().__init__(device, dtype)
        if w is not None and (not isinstance(w, (int, float)) or not w > 0):
            raise ValueError(f"clipscore: w must be None or a number > 0, got {w!r}")
        self.w = None if w is None else float(w)
        self._load(weights, weights, path, "crop", resize_modes=("crop",), processor_option="weights")

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, metadata) -> RewardOutput:
        cosine = self.cosine(images, prompts)  # [B]
        scores = cosine if self.w is None else self.w * cosine.clamp(min=0)
        return RewardOutput(scores, {"clip_cosine": cosine.detach()})
