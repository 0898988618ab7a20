"""Pieces shared by the CLIP-family rewards (HPSv2, PickScore, aesthetic, CLIPScore).

Every one of them has two preprocessing paths, chosen by the option `path`:
- "tensor": resize + normalise in torch (preprocess.py); differentiable, stays on the device.
- "pil": float -> uint8 -> PIL -> the reference processor the reward model was trained with; no gradient.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .base import Reward
from .preprocess import CLIP_MEAN, CLIP_STD, normalize, resize, to_pil
from .weights import load_pretrained

PATHS = ("tensor", "pil")


def check_choice(reward: str, option: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{reward}: {option} must be one of {tuple(allowed)}, got {value!r}")


def freeze(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Moves a scorer once to its device and dtype, in eval mode, with no trainable weights."""
    module.to(device=device, dtype=dtype).eval()
    module.requires_grad_(False)
    return module


def features(output: Any) -> torch.Tensor:
    """transformers 5 `get_*_features` return a model output whose pooler_output is the projection;
    older versions return the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_hf_model(reward: str, model_cls: type, source: str, option: str) -> nn.Module:
    return load_pretrained(reward, model_cls.from_pretrained, source, option=option)


def load_hf_tokenizer(reward: str, source: str, option: str):
    from transformers import AutoTokenizer

    return load_pretrained(reward, AutoTokenizer.from_pretrained, source, option=option)


def load_hf_image_processor(reward: str, source: str, option: str):
    """The PIL backend of the image processor: transformers 4's CLIPImageProcessor, which the reward
    models were trained and scored with (transformers 5 otherwise defaults to a torchvision backend)."""
    from transformers import AutoImageProcessor

    return load_pretrained(reward, lambda src: AutoImageProcessor.from_pretrained(src, backend="pil"),
                           source, option=option)


class HFCLIPReward(Reward):
    """A transformers CLIPModel scoring image-prompt pairs by the cosine of their embeddings."""

    differentiable = True
    needs_prompts = True

    def _load(self, weights: str, processor: str, path: str, resize_mode: str,
              resize_modes: Sequence[str] = ("crop", "pad"), processor_option: str = "processor") -> None:
        from transformers import CLIPModel

        check_choice(self.name, "path", path, PATHS)
        check_choice(self.name, "resize_mode", resize_mode, resize_modes)
        self.path, self.resize_mode = path, resize_mode
        self.differentiable = path == "tensor"
        self.model = freeze(load_hf_model(self.name, CLIPModel, weights, "weights"), self.device, self.dtype)
        self.tokenizer = load_hf_tokenizer(self.name, processor, processor_option)
        self.image_processor = (load_hf_image_processor(self.name, processor, processor_option)
                                if path == "pil" else None)
        self.image_size = self.model.config.vision_config.image_size
        self.max_length = self.model.config.text_config.max_position_embeddings  # 77 for every CLIP

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> normalised [B,3,S,S] on the model's device and dtype."""
        if self.path == "pil":
            pixels = self.image_processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
            return pixels.to(self.device, self.dtype)
        images = resize(images.to(self.device, self.dtype), self.image_size, self.resize_mode, antialias=True)
        return normalize(images, CLIP_MEAN, CLIP_STD)

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine between the L2-normalised image and text embeddings, one per pair. [B]"""
        text = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)
        image_emb = features(self.model.get_image_features(pixel_values=self.pixel_values(images)))  # [B, D]
        text_emb = features(self.model.get_text_features(input_ids=text["input_ids"],
                                                         attention_mask=text["attention_mask"]))  # [B, D]
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        return (image_emb * text_emb).sum(dim=-1)
