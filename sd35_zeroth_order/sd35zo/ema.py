"""Exponential moving average of the trainable (LoRA) parameters, used for evaluation and checkpoints.

Spec sd35_zeroth_order.md §7.3. The decay warms up with the number of completed optimizer steps s,

    d(s) = min((1 + s) / (10 + s), max_decay)          max_decay = 0.9 in every SD3 config

and the average moves only on steps with (s + 1) % interval == 0 (interval = 8):

    ema <- ema + (1 - d(s)) * (param - ema)

The branch trainer calls `step` after every microbatch with the same s, so upstream applies the update
once per microbatch while s = 7 (mod 8). `once_per_step=True` applies it once per optimizer step instead;
the default (False) keeps upstream's cadence for metric parity.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch

__all__ = ["ParameterEMA", "ema_decay", "ema_updates_at"]

EMA_MAX_DECAY = 0.9  # upstream trainers: EMAModuleWrapper(decay=0.9, ...)
EMA_INTERVAL = 8  # upstream trainers: update_step_interval=8


def ema_decay(step: int, max_decay: float = EMA_MAX_DECAY) -> float:
    """Decay used at optimizer step `step` (warm-up (1+s)/(10+s), capped at `max_decay`)."""
    return min((1.0 + step) / (10.0 + step), max_decay)


def ema_updates_at(step: int, interval: int = EMA_INTERVAL) -> bool:
    """True on the steps where the average moves: (step + 1) is a multiple of `interval`."""
    return (step + 1) % interval == 0


class ParameterEMA:
    """fp32 shadow copies of a fixed, ordered list of parameters.

    The same parameter list (same order) must be passed to every method; lengths are checked.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], max_decay: float = EMA_MAX_DECAY,
                 interval: int = EMA_INTERVAL, device: Optional[torch.device] = None,
                 once_per_step: bool = False):
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"ema max_decay must be in [0, 1), got {max_decay}")
        if interval < 1:
            raise ValueError(f"ema interval must be a positive int, got {interval}")
        self.max_decay = float(max_decay)
        self.interval = int(interval)
        self.once_per_step = bool(once_per_step)
        # Shadows start at the parameters' current values (LoRA init or the loaded lora_path).
        self.shadow: List[torch.Tensor] = [
            p.detach().to(device=device if device is not None else p.device, dtype=torch.float32, copy=True)
            for p in parameters
        ]
        self._stash: Optional[List[torch.Tensor]] = None
        self._last_step: Optional[int] = None  # last step that moved the average (once_per_step)

    def _check(self, params: List[torch.nn.Parameter]) -> None:
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA holds {len(self.shadow)} parameters but got {len(params)}")

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter], global_step: int) -> bool:
        """Move the average towards `parameters` if `global_step` is an update step; returns whether it moved."""
        params = list(parameters)
        self._check(params)
        if not ema_updates_at(global_step, self.interval):
            return False
        if self.once_per_step and self._last_step == global_step:
            return False
        weight = 1.0 - ema_decay(global_step, self.max_decay)
        for shadow, live in zip(self.shadow, params):
            if not live.requires_grad:  # frozen parameters keep their initial value in the average
                continue
            # lerp_: shadow += weight * (live - shadow), computed in the shadow's fp32 on its device.
            shadow.lerp_(live.detach().to(device=shadow.device, dtype=shadow.dtype), weight)
        self._last_step = global_step
        return True

    @torch.no_grad()
    def copy_ema_to(self, parameters: Iterable[torch.nn.Parameter], store_temp: bool = True) -> None:
        """Load the averages into `parameters`; with `store_temp`, keep the live values (on CPU) for restore."""
        params = list(parameters)
        self._check(params)
        if store_temp:
            self._stash = [p.detach().to("cpu", copy=True) for p in params]
        for shadow, live in zip(self.shadow, params):
            live.copy_(shadow.to(device=live.device, dtype=live.dtype))

    @torch.no_grad()
    def copy_temp_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Put back the live values stashed by `copy_ema_to(store_temp=True)` (bit-exact)."""
        if self._stash is None:
            raise RuntimeError("copy_temp_to called without a prior copy_ema_to(..., store_temp=True)")
        params = list(parameters)
        self._check(params)
        for saved, live in zip(self._stash, params):
            live.copy_(saved.to(live.device))
        self._stash = None

    def state_dict(self) -> dict:
        """Everything needed to resume: decay settings, the step cadence memory and the shadow tensors."""
        return {
            "max_decay": self.max_decay,
            "interval": self.interval,
            "once_per_step": self.once_per_step,
            "last_step": self._last_step,
            "shadow": [s.detach().cpu().clone() for s in self.shadow],
        }

    def load_state_dict(self, state: dict) -> None:
        shadows = state["shadow"]
        if len(shadows) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(shadows)} tensors but this EMA tracks {len(self.shadow)}")
        for mine, saved in zip(self.shadow, shadows):
            if mine.shape != saved.shape:
                raise ValueError(f"EMA state tensor shape {tuple(saved.shape)} != tracked {tuple(mine.shape)}")
            mine.copy_(saved.to(device=mine.device, dtype=mine.dtype))
        self.max_decay = float(state["max_decay"])
        self.interval = int(state["interval"])
        self.once_per_step = bool(state["once_per_step"])
        self._last_step = state["last_step"]
