"""The differentiable rewards of the presets (spec §8), from `shared_rewards`: upstream's factory names mapped to
the shared reward and the options the upstream factory used (config/default_config.py REWARD_OPTIONS, copied into
`experiment.reward_options` by the presets). All run in float32 with frozen weights; `(images [B,3,H,W] in [0,1],
prompts, metadata) -> (scores [B], extras)`, differentiable w.r.t. the images."""
from __future__ import annotations

SHARED_NAME = {"hpscore": "hpsv2", "pickscore": "pickscore", "imagereward": "imagereward", "aesthetic_score": "aesthetic"}
SHORT_NAME = {"aesthetic_score": "aes", "imagereward": "imgr", "hpscore": "hps", "pickscore": "pick"}


class RewardLoadError(ValueError):
    """A reward that cannot be built (unknown option, missing weights); one line."""


def build_reward(reward_fn: str, options: dict, device):
    import torch
    from shared_rewards import load_reward
    from shared_rewards.weights import RewardWeightsError

    try:
        reward = load_reward(SHARED_NAME[reward_fn], device=device, dtype=torch.float32, **dict(options))
    except (ValueError, OSError, RewardWeightsError) as error:  # bad options, unreadable or missing weights
        reason = " ".join(str(error).split())[:400]
        raise RewardLoadError(f"experiment.reward_fn={reward_fn!r} with experiment.reward_options={dict(options)!r}: "
                              f"{reason}") from None
    if not reward.differentiable:
        raise RewardLoadError(f"experiment.reward_fn={reward_fn!r}: {reward.name} is not differentiable here "
                              f"(experiment.reward_options.path must be 'tensor')")
    return reward
