"""A weighted sum of rewards that still reports each part (flow_grpo's `{name: weight}` presets)."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .base import Reward, RewardOutput
from .preprocess import shared_conversions


class WeightedReward(Reward):
    """scores = sum_k weight_k * reward_k. Every part is computed, weight 0 included, because the
    paper runs log zero-weight rewards (PickScore beside GenEval in Figure 4a)."""

    def __init__(self, parts: Mapping[str, Reward], weights: Mapping[str, float]):
        if not parts:
            raise ValueError("a weighted reward needs at least one part")
        for name, w in weights.items():
            if not isinstance(w, (int, float)) or w != w:
                raise ValueError(f"weight for {name!r} must be a number, got {w!r}")
        first = next(iter(parts.values()))
        super().__init__(device=first.device, dtype=first.dtype)
        self.parts = dict(parts)
        self.weights = {k: float(weights[k]) for k in self.parts}
        self.name = "+".join(f"{w:g}*{n}" for n, w in self.weights.items())
        self.needs_prompts = any(p.needs_prompts for p in self.parts.values())
        active = [p for n, p in self.parts.items() if self.weights[n] != 0]
        self.differentiable = bool(active) and all(p.differentiable for p in active)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None,
              metadata: Sequence[dict] | None) -> RewardOutput:
        total = torch.zeros(images.shape[0], device=images.device, dtype=torch.float32)
        extras: dict = {}
        with shared_conversions():  # the parts share one uint8 copy of the batch
            outputs = {name: part(images, prompts, metadata) for name, part in self.parts.items()}
        for name, out in outputs.items():
            weight = self.weights[name]
            scores = out.scores if weight != 0 else out.scores.detach()
            total = total + weight * scores
            extras[name] = out.scores.detach()
            extras.update({f"{name}/{k}": v for k, v in out.extras.items()})
        return RewardOutput(total, extras)
