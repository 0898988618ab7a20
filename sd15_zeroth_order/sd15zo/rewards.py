"""Rewards through `shared_rewards` (spec §5.1): upstream's reward names mapped to the shared implementations with
the options that reproduce upstream's scoring (REWARD_FNS in config.py; `hps_v2` = HPSv2.1 through the PIL
transform under fp16 autocast), scored on a worker thread while the next rollout samples.

Two named differences from upstream (spec §11 items 15, 21): the final HPS dot product is float32 (upstream's ran
under autocast and came back float16, quantising scores to ~2.4e-4 near 0.3, which can make whole RSM groups
tie); `reward_score_dtype: float16` rounds the scores as upstream did. Images are scored `reward_batch_size` at a
time rather than a whole rollout (160 images) in one ViT-H batch.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import torch

from .config import REWARD_FNS, ConfigError


def build_reward(config, device):
    """The shared_rewards reward of `reward_fn` (a name, or {name: weight}) with `reward_options`; one
    ConfigError line when its weights or options are wrong."""
    from shared_rewards import load_reward
    from shared_rewards.weights import RewardWeightsError

    spec = config.reward_fn
    try:
        if isinstance(spec, str):
            name, options = REWARD_FNS[spec]
            return load_reward(name, device=device, **{**options, **config.reward_options.get(spec, {})})
        weights, options = {}, {}
        for upstream_name, weight in spec.items():
            name, preset = REWARD_FNS[upstream_name]
            weights[name] = float(weight)
            options[name] = {**preset, **config.reward_options.get(upstream_name, {})}
        return load_reward(weights, device=device, **options)
    except (ValueError, OSError, RewardWeightsError) as error:  # weights, unknown options, hub errors
        reason = " ".join(str(error).split())[:400]
        raise ConfigError(f"reward_fn={spec!r}: cannot build the reward: {reason} (weights and options: "
                          f"reward_options, e.g. --set reward_options.{next(iter(spec)) if isinstance(spec, dict) else spec}"
                          ".weights=/path)") from None


class Scorer:
    """images [n, 3, H, W] in [0, 1] + prompts -> float32 scores [n] on the CPU."""

    def __init__(self, reward, batch_size: Optional[int], score_dtype: str = "float32"):
        self.reward, self.batch_size, self.score_dtype = reward, batch_size, score_dtype

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts")
        step = self.batch_size or images.shape[0]
        scores = []
        with torch.no_grad():
            for start in range(0, images.shape[0], step):
                out = self.reward(images[start:start + step], list(prompts[start:start + step]), None)
                scores.append(out.scores.detach().float().cpu())
        result = torch.cat(scores)
        if self.score_dtype == "float16":
            result = result.half().float()
        return result


def reward_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=2)  # upstream: 2 reward workers


def submit(pool: Optional[ThreadPoolExecutor], scorer: Scorer, images: torch.Tensor, prompts: Sequence[str]) -> Future:
    """Score on the pool (or now, without one); the images are detached copies, safe to reuse."""
    images = images.detach()
    if pool is None:
        done: Future = Future()
        done.set_result(scorer(images, prompts))
        return done
    return pool.submit(scorer, images, list(prompts))
