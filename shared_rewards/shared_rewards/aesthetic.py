"""LAION "improved aesthetic predictor": a linear-MSE head on L2-normalised CLIP ViT-L/14 image embeddings.

Weights: christophschuhmann/improved-aesthetic-predictor `sac+logos+ava1-l14-linearMSE.pth`, mirrored on
the hub as trl-lib/ddpo-aesthetic-predictor `aesthetic-model.pth`. Scores are on about a 1-10 scale.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import Reward, RewardOutput
from .clip_common import PATHS, check_choice, features, freeze, load_hf_image_processor, load_hf_model
from .preprocess import CLIP_MEAN, CLIP_STD, normalize, resize, to_pil
from .weights import RewardWeightsError, resolve_file

RESIZE_MODES = ("crop", "squash")


class AestheticHead(nn.Module):
    """D -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout and no non-linearity, as upstream trained it: in eval
    mode the whole head is one affine map. Layer indices match the upstream state dict
    (`layers.{0,2,4,6,7}.*`; 1, 3, 5 are the dropouts)."""

    def __init__(self, input_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, 1]
        return self.layers(embedding)


def load_head(reward: str, source: str) -> AestheticHead:
    path = resolve_file(reward, source, "aesthetic-model.pth", option="weights")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if "layers.0.weight" not in state:
        raise RewardWeightsError(f"{reward}: weights={str(source)!r} is not an aesthetic-head state dict "
                                 f"(no 'layers.0.weight'; keys: {sorted(state)[:6]})")
    head = AestheticHead(state["layers.0.weight"].shape[1])
    head.load_state_dict(state)
    return head


class AestheticReward(Reward):
    """Aesthetic score of each image; prompts are ignored.

    Options:
      clip: CLIP backbone, hub id or local directory ("openai/clip-vit-large-patch14"); its image
        processor is read from the same place for the PIL path.
      weights: the MLP head: a .pth file, a directory holding aesthetic-model.pth, or a hub repo.
      resize_mode: "crop" = shorter side to 224 then centre crop (CLIPProcessor geometry; flow_grpo/ddpo,
        SD3.5 zeroth order and SD1.5 first order); "squash" = straight to 224x224, bicubic, no antialias on
        the tensor path (nabla-GFN, VGG-Flow and SD3.5 first order).
      path: "tensor" (differentiable) or "pil" (uint8 -> PIL -> CLIPImageProcessor, no gradient; with
        "squash" the processor resizes to the square without cropping, antialiased as PIL always is).
    """

    name = "aesthetic"
    differentiable = True
    needs_prompts = False
    weights_source = "hub: openai/clip-vit-large-patch14 + trl-lib/ddpo-aesthetic-predictor"

    def __init__(self, device="cpu", dtype=torch.float32, *,
                 clip: str = "openai/clip-vit-large-patch14",
                 weights: str = "trl-lib/ddpo-aesthetic-predictor",
                 resize_mode: str = "crop", path: str = "tensor"):
        super().__init__(device, dtype)
        from transformers import CLIPModel

        check_choice(self.name, "resize_mode", resize_mode, RESIZE_MODES)
        check_choice(self.name, "path", path, PATHS)
        self.resize_mode, self.path = resize_mode, path
        self.differentiable = path == "tensor"
        self.head = freeze(load_head(self.name, weights), self.device, self.dtype)
        self.clip = freeze(load_hf_model(self.name, CLIPModel, clip, "clip"), self.device, self.dtype)
        self.image_size = self.clip.config.vision_config.image_size
        head_dim, embed_dim = self.head.layers[0].in_features, self.clip.config.projection_dim
        if head_dim != embed_dim:
            raise RewardWeightsError(f"{self.name}: the head in weights={weights!r} takes {head_dim}-d embeddings "
                                     f"but clip={clip!r} makes {embed_dim}-d ones")
        self.image_processor = load_hf_image_processor(self.name, clip, "clip") if path == "pil" else None

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> normalised [B,3,S,S] on the model's device and dtype."""
        size = self.image_size
        if self.path == "pil":
            squash = {"size": {"height": size, "width": size}, "do_center_crop": False}
            kwargs = squash if self.resize_mode == "squash" else {}
            pixels = self.image_processor(images=to_pil(images), return_tensors="pt", **kwargs)["pixel_values"]
            return pixels.to(self.device, self.dtype)
        antialias = self.resize_mode == "crop"  # the squash copies call F.interpolate without antialias
        images = resize(images.to(self.device, self.dtype), size, self.resize_mode, antialias=antialias)
        return normalize(images, CLIP_MEAN, CLIP_STD)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, metadata) -> RewardOutput:
        embedding = features(self.clip.get_image_features(pixel_values=self.pixel_values(images)))  # [B, D]
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        return RewardOutput(self.head(embedding).squeeze(-1), {})
