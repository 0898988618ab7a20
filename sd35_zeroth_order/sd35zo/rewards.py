"""Reward glue for the trainers: one `shared_rewards` mix built from the config (spec §5.1, §7.1 step 9).

`config.reward_fn` is `{name: weight}` (e.g. {"geneval": 1.0, "pickscore": 0.0}) and `config.reward_options`
holds each reward's keyword options; `shared_rewards.load_reward` builds the WeightedReward. Scores come back
as a dict of float32 `[rows]` tensors: `avg` (the weighted sum the advantages use) plus every part and every
per-image extra, so zero-weight rewards are still logged.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import torch

__all__ = ["build_reward", "reward_pool", "score_images", "submit_scores"]


def build_reward(config, device="cpu", for_eval=False):
    """The configured reward mix on `device`; fails with the reward's own one-line error on bad options.

    `for_eval`: GenEval also reports the benchmark's own (non-strict) accuracies, as upstream's eval calls
    the scorer with only_strict=False (spec §7.6); training asks for the strict ones only."""
    from shared_rewards import load_reward

    weights = {name: float(weight) for name, weight in config.reward_fn.items()}
    if not weights:
        raise ValueError("reward_fn is empty: name at least one reward, e.g. --config.reward_fn.jpeg_compressibility=1.0")
    options = {name: dict(config.reward_options.get(name, {})) for name in weights if name in config.reward_options}
    if for_eval and "geneval" in weights:
        options.setdefault("geneval", {})["only_strict"] = False
    return load_reward(weights, device=device, **options)


def _as_row_tensor(name: str, value, rows: int) -> Optional[torch.Tensor]:
    """A per-image extra as float32 `[rows]`; non-numeric extras (strings, dicts) are skipped."""
    try:
        tensor = torch.as_tensor(value if not isinstance(value, torch.Tensor) else value.detach().cpu(),
                                 dtype=torch.float32)
    except (TypeError, ValueError):
        return None
    tensor = tensor.reshape(tensor.shape[0], -1)[:, 0] if tensor.dim() > 1 else tensor.reshape(-1)
    if tensor.numel() != rows:
        raise ValueError(f"reward extra {name!r} has {tensor.numel()} values for {rows} images")
    return tensor


def score_images(reward, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> dict:
    """images `[R, 3, H, W]` in [0, 1] -> {"avg": [R], <extra>: [R], ...} float32 on CPU."""
    scores, extras = reward(images, list(prompts), list(metadata))
    rows = images.shape[0]
    out = {"avg": scores.detach().to(torch.float32).cpu().reshape(-1)}
    for name, value in extras.items():
        tensor = _as_row_tensor(name, value, rows)
        if tensor is not None and name != "avg":
            out[name] = tensor
    return out


# Rollouts scored at once. More than one: a served reward (GenEval over HTTP, with server workers) or a slow
# image conversion for one rollout no longer queues the next rollout's scoring behind it (upstream: 8 threads).
REWARD_THREADS = 4


def reward_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=REWARD_THREADS, thread_name_prefix="reward")


def submit_scores(pool: Optional[ThreadPoolExecutor], reward, images, prompts, metadata) -> Future:
    """Score on `pool` so the next rollouts' sampling overlaps with this one's scoring; results keep their
    rollout's order whatever order the threads finish in. Without a pool the future is already resolved."""
    images = images.detach().clone()  # the sampler may reuse its buffers while the thread reads these
    if pool is None:
        future: Future = Future()
        future.set_result(score_images(reward, images, prompts, metadata))
        return future
    return pool.submit(score_images, reward, images, list(prompts), list(metadata))
