"""shared_rewards: every reward model used by the RSM components, behind one interface.

    from shared_rewards import load_reward
    reward = load_reward("hpsv2", device="cuda", version="v2.1")
    scores, extras = reward(images, prompts, metadata)   # images [B,3,H,W] in [0,1] -> scores [B]
"""
from .base import Reward, RewardInputError, RewardOutput
from .multi import WeightedReward
from .registry import CATALOGUE, UnknownRewardError, load_reward, reward_class, reward_options
from .weights import RewardWeightsError

__all__ = [
    "CATALOGUE", "Reward", "RewardInputError", "RewardOutput", "RewardWeightsError", "UnknownRewardError",
    "WeightedReward", "load_reward", "reward_class", "reward_options",
]
