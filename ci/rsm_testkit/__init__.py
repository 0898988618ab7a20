"""Tiny random-weight checkpoints of the real architectures, written in the on-disk layout the real
loaders read. Product code receives the path where it would receive a hub id and never knows."""
from .factory import TINY_MODELS, build_all, cache_root, cached_artifact, get_tiny_model, tiny_reward_options

__all__ = ["TINY_MODELS", "build_all", "cache_root", "cached_artifact", "get_tiny_model", "tiny_reward_options"]
