"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preference pairs.

The score is the cosine between the L2-normalised image and prompt embeddings, with no logit scale:
typical SD images score 0.20-0.35 (the HPS tables print 100x this).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch

from .base import Reward, RewardOutput
from .clip_common import PATHS, check_choice, freeze
from .preprocess import CLIP_MEAN, CLIP_STD, normalize, resize_longer_pad, to_pil
from .weights import RewardWeightsError, resolve_file

# hpsv2's hps_version_map: which file of the xswu/HPSv2 hub repo holds which version
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
AMP_DTYPES = (None, "float16")


def load_state_dict(reward: str, path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise RewardWeightsError(f"{reward}: {str(path)!r} is not an HPS checkpoint (no state_dict)")
    # checkpoints saved from a DistributedDataParallel model carry a "module." prefix
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "logit_scale" not in state:
        raise RewardWeightsError(f"{reward}: {str(path)!r} is not an HPS checkpoint (no logit_scale)")
    return state


class HPSv2Reward(Reward):
    """HPSv2.x score of each (image, prompt) pair.

    Options:
      weights: hub repo ("xswu/HPSv2"), a local directory holding the version's file, or the .pt file.
      version: "v2.1" (HPS_v2.1_compressed.pt, every RSM component) or "v2.0" (HPS_v2_compressed.pt).
      arch: open_clip architecture ("ViT-H-14"). If the weights' directory holds an open_clip_config.json
        (the hub convention: {"model_cfg": ..., "preprocess_cfg": ...}), that config is used instead.
      path: "tensor" (differentiable: ResizeMaxSize + CLIP normalisation in torch) or "pil" (uint8 -> PIL ->
        open_clip's eval transform with longest-side resize and zero padding, no gradient).
      amp_dtype: None (fp32, as the first-order copies and the nabla-GFN README require) or "float16"
        (CUDA autocast, as the SD1.5 zeroth-order upstream scored); ignored on CPU.
      antialias: antialias the bicubic downsampling on the tensor path (PIL always does).
    """

    name = "hpsv2"
    differentiable = True
    needs_prompts = True
    weights_source = "hub: xswu/HPSv2 (open_clip ViT-H-14 architecture)"

    def __init__(self, device="cpu", dtype=torch.float32, *, weights: str = "xswu/HPSv2", version: str = "v2.1",
                 arch: str = "ViT-H-14", path: str = "tensor", amp_dtype: str | None = None,
                 antialias: bool = True):
        super().__init__(device, dtype)
        import open_clip

        check_choice(self.name, "version", version, tuple(CHECKPOINTS))
        check_choice(self.name, "path", path, PATHS)
        check_choice(self.name, "amp_dtype", amp_dtype, AMP_DTYPES)
        self.version, self.path, self.amp_dtype, self.antialias = version, path, amp_dtype, bool(antialias)
        self.differentiable = path == "tensor"

        checkpoint = resolve_file(self.name, weights, CHECKPOINTS[version], option="weights")
        has_config = (checkpoint.parent / "open_clip_config.json").is_file()
        model_name = f"local-dir:{checkpoint.parent}" if has_config else arch
        # architecture only (open_clip then warns "initialized randomly"): the HPS state dict replaces it all
        model = open_clip.create_model(model_name, pretrained=None, load_weights=False)
        try:
            model.load_state_dict(load_state_dict(self.name, checkpoint))
        except RuntimeError as exc:  # strict key/shape mismatch: wrong arch for these weights
            first_line = str(exc).strip().splitlines()[0]
            raise RewardWeightsError(f"{self.name}: {str(checkpoint)!r} does not fit the {model_name} "
                                     f"architecture ({first_line})") from exc
        self.model = freeze(model, self.device, self.dtype)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = self.model.visual.image_size  # an int or an (H, W) pair, square for every CLIP we know
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.transform = None
        if path == "pil":
            self.transform = open_clip.image_transform(self.image_size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD,
                                                       resize_mode="longest", fill_color=0)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> normalised [B,3,S,S] on the model's device and dtype."""
        if self.path == "pil":
            pixels = torch.stack([self.transform(image) for image in to_pil(images)])
            return pixels.to(self.device, self.dtype)
        images = resize_longer_pad(images.to(self.device, self.dtype), self.image_size, antialias=self.antialias)
        return normalize(images, CLIP_MEAN, CLIP_STD)

    def _autocast(self):
        if self.amp_dtype == "float16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, metadata) -> RewardOutput:
        tokens = self.tokenizer(list(prompts)).to(self.device)  # [B, 77]
        pixels = self.pixel_values(images)  # [B, 3, S, S]
        with self._autocast():
            image_emb = self.model.encode_image(pixels, normalize=True)  # [B, D]
            text_emb = self.model.encode_text(tokens, normalize=True)  # [B, D]
        return RewardOutput((image_emb.float() * text_emb.float()).sum(dim=-1), {})
