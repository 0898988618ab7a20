"""Image preprocessing shared by the CLIP-family rewards, in two paths.

Tensor path: resize + normalise in torch on a float [0,1] image; differentiable, runs on the GPU.
PIL path: float -> uint8 -> PIL -> the reference processor, as the reward models were trained and as
the zeroth-order upstream trainers scored. Tests measure how far the two drift apart.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# OpenAI CLIP normalisation, used by HPS, PickScore, ImageReward, the aesthetic head and CLIPScore.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("crop", "pad", "squash")


def normalize(images: torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def _resize(images: torch.Tensor, height: int, width: int, antialias: bool) -> torch.Tensor:
    if images.shape[-2:] == (height, width):
        return images
    # bicubic antialiasing is only defined for downsampling in torch; upsampling ignores it anyway
    down = height < images.shape[-2] or width < images.shape[-1]
    return F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False,
                         antialias=antialias and down)


def resize_shorter_center_crop(images: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """CLIPImageProcessor geometry: shorter side to `size` (bicubic), then a centre crop. [B,3,size,size]"""
    h, w = images.shape[-2:]
    # the longer side is floored, as in CLIPImageProcessor and torchvision's Resize(int)
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    images = _resize(images, nh, nw, antialias)
    top, left = (nh - size) // 2, (nw - size) // 2
    return images[..., top:top + size, left:left + size]


def resize_longer_pad(images: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """open_clip's ResizeMaxSize geometry: longer side to `size` (bicubic), zero-pad to a centred square."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    nh, nw = min(size, round(h * scale)), min(size, round(w * scale))
    images = _resize(images, nh, nw, antialias)
    pad_h, pad_w = size - nh, size - nw
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def squash(images: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """Straight to size x size, aspect ratio ignored (the VGG-Flow / nabla-GFN aesthetic path)."""
    return _resize(images, size, size, antialias)


def resize(images: torch.Tensor, size: int, mode: str, antialias: bool) -> torch.Tensor:
    if mode == "crop":
        return resize_shorter_center_crop(images, size, antialias)
    if mode == "pad":
        return resize_longer_pad(images, size, antialias)
    if mode == "squash":
        return squash(images, size, antialias)
    raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")


_shared = threading.local()


@contextmanager
def shared_conversions():
    """Within this block, `to_uint8` of the same unchanged tensor is computed once and reused: a weighted mix
    (GenEval's JPEGs, PickScore's PIL images) reads the batch off the device and rounds it once, not per
    part. Blocks nest; the cache lives in this thread only and is dropped when the outer block ends."""
    outer = getattr(_shared, "cache", None)
    if outer is None:
        _shared.cache = {}
    try:
        yield
    finally:
        if outer is None:
            _shared.cache = None


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] float in [0,1] -> [B,H,W,3] uint8, rounding to nearest like the upstream trainers. Callers get
    a read-only array when it may be shared (inside `shared_conversions`)."""
    cache = getattr(_shared, "cache", None)
    key = (images.data_ptr(), images._version, tuple(images.shape), tuple(images.stride()), images.dtype,
           str(images.device)) if cache is not None else None
    if key is not None and key in cache:
        return cache[key][1]
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    if key is not None:
        arr.flags.writeable = False
        cache[key] = (images, arr)  # holding the tensor keeps its memory (and so the key) from being reused
    return arr


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(images)]
