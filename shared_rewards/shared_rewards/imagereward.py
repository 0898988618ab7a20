"""ImageReward v1.0 (Xu et al., NeurIPS 2023; THUDM/ImageReward) on transformers' BLIP modules.

Score = MLP(text_encoder(prompt, cross-attending to ViT(image))[CLS]), standardised with the constants
upstream ships. The `image-reward` package pins timm 0.6 and breaks with transformers 5, so the original
checkpoint is renamed into `BlipVisionModel` + `BlipTextModel` by `blip_convert.py`, strictly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from .base import Reward, RewardOutput
from .preprocess import normalize, resize, to_pil
from .weights import load_pretrained, resolve_file


# Reward standardisation, ImageReward/ImageReward.py (`self.mean`, `self.std`).
RAW_MEAN = 0.16717362830052426
RAW_STD = 1.0333394966054072
PATHS = ("tensor", "pil")


def load_imagereward_modules(weights: str, device: torch.device, dtype: torch.dtype):
    """(vision, text, head) from a directory / file / hub id holding ImageReward.pt + med_config.json.

    An optional `vision_config.json` beside the checkpoint overrides BlipVisionConfig fields the shapes
    cannot tell (e.g. `num_attention_heads` for a BLIP tower whose heads are not 64 wide).
    """
    from transformers import BlipTextModel, BlipVisionModel

    from .blip_convert import RewardHead, load_strict, split_checkpoint, text_config, vision_config

    local = Path(weights).expanduser().exists()
    checkpoint = resolve_file("imagereward", weights, "ImageReward.pt")
    med_path = resolve_file("imagereward", checkpoint.parent if local else weights, "med_config.json")
    overrides_path = checkpoint.parent / "vision_config.json"
    overrides = json.loads(overrides_path.read_text()) if overrides_path.is_file() else None

    source = f"weights={str(weights)!r}"
    parts = split_checkpoint(torch.load(checkpoint, map_location="cpu", weights_only=True), source)
    vision_cfg = vision_config(parts["vision"], overrides, source)
    vision = BlipVisionModel(vision_cfg)
    load_strict(vision, parts["vision"], "vision", source)
    text = BlipTextModel(text_config(json.loads(med_path.read_text()), vision_cfg.hidden_size),
                         add_pooling_layer=False)
    load_strict(text, parts["text"], "text", source)
    head = RewardHead(parts["head"], source)
    load_strict(head, parts["head"], "head", source)
    for module, module_dtype in ((vision, dtype), (text, dtype), (head, torch.float32)):
        module.to(device=device, dtype=module_dtype).eval().requires_grad_(False)
    return vision, text, head


def load_blip_tokenizer(tokenizer: str):
    """bert-base-uncased plus BLIP's two added special tokens (BLIP `init_tokenizer`): `[DEC]` as bos and
    `[ENC]`; they only change the ids of prompts that literally contain them. ImageReward keeps `[CLS]` as
    the first id (it does not swap in `[ENC]`)."""
    from transformers import AutoTokenizer

    tok = load_pretrained("imagereward", AutoTokenizer.from_pretrained, tokenizer, option="tokenizer")
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardReward(Reward):
    """ImageReward v1.0; typical scores lie in about [-2, 2]."""

    name = "imagereward"
    differentiable = True
    needs_prompts = True
    weights_source = "hub THUDM/ImageReward (ImageReward.pt + med_config.json) + bert-base-uncased tokenizer"

    def __init__(self, device="cpu", dtype=torch.float32, *, weights: str = "THUDM/ImageReward",
                 tokenizer: str = "bert-base-uncased", max_length: int = 35, path: str = "tensor"):
        """weights: directory / file / hub id with ImageReward.pt and med_config.json.
        tokenizer: BERT tokenizer directory or hub id.
        max_length: prompt tokens, padded and truncated: 35 as ImageReward's own `score`/`inference_rank`
          (and its training); 512 reproduces the first-order upstream copies' differentiable path
          (tokenizer.model_max_length), which scores prompts longer than 35 tokens differently.
        path: "tensor" (differentiable torch resize) or "pil" (uint8 -> PIL bicubic, as ImageReward's
          preprocessing; not differentiable).
        """
        super().__init__(device, dtype)
        if path not in PATHS:
            raise ValueError(f"{self.name}: path must be one of {PATHS}, got {path!r}")
        self.path = path
        self.differentiable = path == "tensor"
        self.vision, self.text, self.head = load_imagereward_modules(weights, self.device, dtype)
        self.tokenizer = load_blip_tokenizer(tokenizer)
        limit = self.text.config.max_position_embeddings
        if not 1 <= int(max_length) <= limit:
            raise ValueError(f"{self.name}: max_length must be in [1, {limit}], got {max_length!r}")
        if len(self.tokenizer) > self.text.config.vocab_size:
            raise ValueError(f"{self.name}: tokenizer has {len(self.tokenizer)} tokens but the text encoder only "
                             f"{self.text.config.vocab_size}; tokenizer={tokenizer!r} does not match "
                             f"weights={weights!r}")
        self.max_length = int(max_length)
        self.image_size = self.vision.config.image_size  # 224 for v1.0

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> normalised [B,3,S,S]: shorter side to S (bicubic), centre crop, CLIP stats.
        Preprocessing runs in float32 on the images' device; the result is cast to the model dtype."""
        if self.path == "tensor":
            pixels = resize(images.float(), self.image_size, "crop", antialias=True)
        else:
            from torchvision.transforms import InterpolationMode
            from torchvision.transforms import functional as TF

            crops = [TF.to_tensor(TF.center_crop(TF.resize(im, self.image_size, InterpolationMode.BICUBIC),
                                                 self.image_size)) for im in to_pil(images)]
            pixels = torch.stack(crops)
        return normalize(pixels.to(self.device)).to(self.dtype)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, metadata) -> RewardOutput:
        image_embeds = self.vision(pixel_values=self.pixels(images)).last_hidden_state  # [B, 1+N, Dv]
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device)  # all patches
        hidden = self.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           encoder_hidden_states=image_embeds,
                           encoder_attention_mask=image_mask).last_hidden_state  # [B, T, Dt]
        raw = self.head(hidden[:, 0].float()).squeeze(-1)  # [B]; first token is [CLS]
        return RewardOutput((raw - RAW_MEAN) / RAW_STD, {"imagereward_raw": raw.detach()})
