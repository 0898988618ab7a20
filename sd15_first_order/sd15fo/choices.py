"""Names a config may use and what they mean, torch-free so the config check runs in a blink: the temporal
modes of the loss (spec §4.4) and the rewards (spec §6). `loss.py` and `rewards.py` use them.
"""
from __future__ import annotations

import math
from typing import Union

REWARD_MODES = ("squared", "sigma", "sigma_times_oldgamma", "constant")
STRENGTH_MODES = ("sigma",)  # besides a number


class ModeError(ValueError):
    """A temporal mode or scale that the loss does not define; one line naming the key."""


def parse_strength(value) -> Union[float, str]:
    """`train.pretrained_strength`: a finite number c (k_t = c) or 'sigma' (k_t = a·σ'_t); bools and other strings
    are refused, '3sigma' with the spelling that replaces it."""
    if isinstance(value, bool):
        raise ModeError(f"train.pretrained_strength={value!r} must be a number or 'sigma', not a bool")
    if isinstance(value, str):
        mode = value.strip().lower()
        if mode == "3sigma":
            raise ModeError("train.pretrained_strength='3sigma' is not supported; use train.pretrained_strength="
                            "'sigma' with train.pretrained_strength_sigma_scale=3.0")
        if mode in STRENGTH_MODES:
            return mode
        raise ModeError(f"train.pretrained_strength={value!r} is not supported; use a number or 'sigma'")
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise ModeError(f"train.pretrained_strength={value!r} must be a finite number or 'sigma'")


def parse_reward_mode(value) -> str:
    """`train.reward_adaptive_mode`, lower-cased and stripped; '3sigma' and 'linear' (named in an upstream config
    comment, never implemented) are refused with what to use instead."""
    if not isinstance(value, str):
        raise ModeError(f"train.reward_adaptive_mode={value!r} must be one of: {', '.join(REWARD_MODES)}")
    mode = value.strip().lower()
    if mode == "3sigma":
        raise ModeError("train.reward_adaptive_mode='3sigma' is not supported; use train.reward_adaptive_mode="
                        "'sigma' with train.reward_adaptive_sigma_scale=3.0")
    if mode == "linear":
        raise ModeError("train.reward_adaptive_mode='linear' is not supported (an upstream config comment names it, "
                        f"no code implements it); allowed: {', '.join(REWARD_MODES)}")
    if mode not in REWARD_MODES:
        raise ModeError(f"train.reward_adaptive_mode={value!r} is not supported; allowed: {', '.join(REWARD_MODES)}")
    return mode


def parse_scale(key: str, value) -> float:
    """a or b of the sigma modes: a finite float > 0 (validated whether the mode uses it or not)."""
    if isinstance(value, bool):
        raise ModeError(f"{key}={value!r} must be a positive finite number, not a bool")
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ModeError(f"{key}={value!r} must be a positive finite number") from None
    if not math.isfinite(scale) or scale <= 0:
        raise ModeError(f"{key}={value!r} must be a positive finite number")
    return scale


# upstream reward_fn -> (shared_rewards name, fixed options, {reward_fn_kwargs key: shared_rewards option})
REWARDS = {
    "hpsv2_score_diff": ("hpsv2", {"path": "tensor"},
                         {"checkpoint_path": "weights", "hps_version": "version", "weights": "weights",
                          "version": "version", "antialias": "antialias"}),
    "aesthetic_score_diff": ("aesthetic", {"path": "tensor", "resize_mode": "crop"},
                             {"weights": "weights", "checkpoint_path": "weights", "clip": "clip"}),
}
# upstream names of rewards without a gradient (spec §6.2): recognised, so the refusal can say why
NON_DIFFERENTIABLE = ("hps_v2", "aesthetic_score", "clipScore", "pickScore", "jpeg_compressibility",
                      "jpeg_incompressibility", "qwen_bertscore")
IGNORED_KWARGS = ("distributed",)  # upstream factory argument with no effect here (rank 0 downloads first anyway)
HPS_VERSIONS = ("v2.0", "v2.1")


def reward_options(reward_fn: str, kwargs: dict) -> tuple[str, dict]:
    """(shared_rewards name, load_reward options) of a config's reward; ValueError naming the key otherwise."""
    if reward_fn not in REWARDS:
        if reward_fn in NON_DIFFERENTIABLE:
            raise ValueError(f"reward_fn={reward_fn!r} has no gradient; residual ∇-DB trains on ∇r, use one of: "
                             f"{', '.join(REWARDS)}")
        raise ValueError(f"reward_fn={reward_fn!r} is not supported; allowed: {', '.join(REWARDS)}")
    name, fixed, translate = REWARDS[reward_fn]
    options = dict(fixed)
    for key, value in (kwargs or {}).items():
        if key in IGNORED_KWARGS:
            continue
        if key not in translate:
            raise ValueError(f"reward_fn_kwargs.{key} is not an option of {reward_fn}; allowed: "
                             f"{', '.join(sorted(set(translate) | set(IGNORED_KWARGS)))}")
        if value is not None:
            options[translate[key]] = value
    if name == "hpsv2" and options.get("version", "v2.1") not in HPS_VERSIONS:
        raise ValueError(f"reward_fn_kwargs.hps_version={options['version']!r} is not supported; allowed: "
                         f"{', '.join(HPS_VERSIONS)}")
    return name, options


