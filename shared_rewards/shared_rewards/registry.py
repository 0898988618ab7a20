"""Name -> reward class, imported lazily so that optional dependencies stay optional."""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Mapping

import torch

from .base import Reward

# name -> "module:Class" inside this package. Each module imports its heavy dependencies on first use.
CATALOGUE: dict[str, str] = {
    "hpsv2": "hps:HPSv2Reward",
    "pickscore": "pickscore:PickScoreReward",
    "imagereward": "imagereward:ImageRewardReward",
    "aesthetic": "aesthetic:AestheticReward",
    "clipscore": "clip_score:CLIPScoreReward",
    "jpeg_compressibility": "jpeg:JpegCompressibilityReward",
    "jpeg_incompressibility": "jpeg:JpegIncompressibilityReward",
    "ocr": "ocr:OCRReward",
    "geneval": "geneval.client:GenEvalReward",
    "deqa": "deqa:DeQAReward",
    "unifiedreward": "unifiedreward:UnifiedRewardReward",
    "qwenvl": "qwenvl:QwenVLReward",
}

_BASE_ARGS = ("self", "device", "dtype")


class UnknownRewardError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def reward_class(name: str) -> type[Reward]:
    if name not in CATALOGUE:
        raise UnknownRewardError(f"unknown reward {name!r}; available: {', '.join(sorted(CATALOGUE))}")
    module_name, cls_name = CATALOGUE[name].split(":")
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, cls_name)


def reward_options(cls: type[Reward]) -> dict[str, Any]:
    """The options a reward takes (its keyword arguments beyond device/dtype) with their defaults."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if k not in _BASE_ARGS and p.kind is p.KEYWORD_ONLY}


def _dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype: unknown torch dtype {value!r}")
    return dtype


def load_reward(name: str | Mapping[str, float], device: str | torch.device = "cpu",
                dtype: str | torch.dtype = torch.float32, **options: Any) -> Reward:
    """Builds a reward by name; a `{name: weight}` mapping builds a WeightedReward.

    For a mapping, `options` are per-reward: `load_reward({"geneval": 1, "pickscore": 0},
    pickscore={"divisor": 26.0})`.
    """
    if isinstance(name, Mapping):
        from .multi import WeightedReward

        unknown = set(options) - set(name)
        if unknown:
            raise ValueError(f"options given for rewards not in the mix: {sorted(unknown)}")
        parts = {n: load_reward(n, device=device, dtype=dtype, **options.get(n, {})) for n in name}
        return WeightedReward(parts, dict(name))
    cls = reward_class(name)
    allowed = reward_options(cls)
    for key in options:
        if key not in allowed:
            raise ValueError(f"{name}: unknown option {key!r}; allowed: {', '.join(sorted(allowed)) or 'none'}")
    return cls(device=device, dtype=_dtype(dtype), **options)
