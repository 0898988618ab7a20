"""The one reward contract: `reward(images, prompts, metadata) -> RewardOutput(scores, extras)`.

`images` are float `[B, 3, H, W]` in [0, 1] on any device; `scores` come back as float32 `[B]` on the
same device. A reward with `differentiable = True` keeps the autograd graph from `images` to `scores`
whenever gradients are enabled; every other reward runs under `torch.no_grad()`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch

# Decoders overshoot [0, 1] by a little in fp16/bf16; anything beyond this is a caller bug.
RANGE_TOLERANCE = 1e-3


class RewardInputError(ValueError):
    """The images, prompts or metadata given to a reward are not what the contract says."""


class RewardOutput(NamedTuple):
    scores: torch.Tensor  # [B] float32, on the images' device
    extras: dict[str, Any]  # named per-image values for logging (tensors [B] or lists of length B)


def validate_inputs(
    name: str,
    images: Any,
    prompts: Sequence[str] | None,
    metadata: Sequence[dict] | None,
    needs_prompts: bool,
) -> int:
    """Checks the call contract once, with an error that says exactly what is wrong. Returns B."""
    if not isinstance(images, torch.Tensor):
        raise RewardInputError(f"{name}: images must be a torch.Tensor [B,3,H,W] in [0,1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardInputError(f"{name}: images must have shape [B,3,H,W], got {list(images.shape)}")
    if not images.is_floating_point():
        raise RewardInputError(f"{name}: images must be a float tensor in [0,1], got dtype {images.dtype}")
    batch = images.shape[0]
    if batch == 0:
        raise RewardInputError(f"{name}: empty batch (images has 0 rows)")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise RewardInputError(f"{name}: images have an empty spatial size {list(images.shape[2:])}")
    with torch.no_grad():
        lo, hi = images.min().item(), images.max().item()
    if lo != lo or hi != hi:
        raise RewardInputError(f"{name}: images contain NaN")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise RewardInputError(f"{name}: images must be in [0,1], got values in [{lo:.4g}, {hi:.4g}]")
    if prompts is None:
        if needs_prompts:
            raise RewardInputError(f"{name}: this reward needs prompts, got None")
    else:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise RewardInputError(f"{name}: prompts must be a sequence of str, one per image")
        if len(prompts) != batch:
            raise RewardInputError(f"{name}: got {batch} images but {len(prompts)} prompts")
    if metadata is not None and len(metadata) != batch:
        raise RewardInputError(f"{name}: got {batch} images but {len(metadata)} metadata entries")
    return batch


class Reward:
    """Base class: subclasses set the class attributes and implement `score`.

    Options are the keyword arguments of the subclass `__init__`; `load_reward` checks them by name,
    and `python -m shared_rewards list` prints them with their defaults.
    """

    name: str = "reward"
    differentiable: bool = False
    needs_prompts: bool = True
    weights_source: str = "none"  # where the default weights come from, for the catalogue listing

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None,
              metadata: Sequence[dict] | None) -> RewardOutput:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None,
                 metadata: Sequence[dict] | None = None) -> RewardOutput:
        batch = validate_inputs(self.name, images, prompts, metadata, self.needs_prompts)
        if self.differentiable:
            out = self.score(images, prompts, metadata)
        else:
            with torch.no_grad():
                out = self.score(images.detach(), prompts, metadata)
        scores = out.scores.to(device=images.device, dtype=torch.float32)
        if scores.shape != (batch,):
            raise RuntimeError(f"{self.name}: scored {list(scores.shape)} for a batch of {batch}")
        return RewardOutput(scores, out.extras)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, differentiable={self.differentiable})"
