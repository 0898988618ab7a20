"""Checkpoints that resume exactly and can be trusted (TRAINER_CONTRACT.md §4, spec §5.6, §9 items 9-10).

    <run>/checkpoints/checkpoint-<n>/          after n trained epochs (upstream's checkpoint_epoch<n-1>)
        lora/pytorch_lora_weights.safetensors  diffusers LoRA (`unet.…lora.down/up.weight`, adapter metadata):
                                               StableDiffusionPipeline.load_lora_weights(<this folder>/lora)
        training_state.pt                      LoRA, AdamW, GradScaler, RNG, counters, config; weights only
        unet_lora_weights.safetensors          parity only: the same LoRA under upstream's file name
        conv_out_weights_epoch<n-1>.pt         parity only: upstream's frozen conv_out copy

Written into a hidden temporary folder and renamed into place when complete, so a crash never leaves a
`checkpoint-<n>` that fails to load; read with `torch.load(weights_only=True)` (tensors and plain data only, a
crafted file cannot run code). `num_checkpoint_limit` keeps the newest folders. Resuming continues with epoch
n (0-based), i.e. after the saved one: upstream restarted the saved epoch and restored only the LoRA.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Callable, Optional

import numpy as np
import torch

from .config import ConfigError, flat
from .run_folder import CHECKPOINTS_DIR, STATE_FILE, list_checkpoints

STATE_FORMAT = "sd15fo-training-state/1"
# Keys a resumed run may change without changing what it trains: its length, how often it saves and
# evaluates, the evaluation budget, where it logs, the resume switches, memory/speed-only settings.
RESUME_FREE_KEYS = ("run_name", "model.resume_from_checkpoint", "train.max_epochs", "save_freq", "eval.", "logging_dir",
                    "report_to", "wandb.", "num_checkpoint_limit", "resume_ignore_config_changes", "nan_policy",
                    "data_dir", "allow_tf32", "device", "model.use_xformers", "train.gradient_checkpointing",
                    "train.cache_z0_reward_grad")


def math_key_diff(saved: dict, config: dict) -> dict:
    """{key: (saved, now)} of the keys that differ and change the training math (all but RESUME_FREE_KEYS)."""
    old, new = flat(saved), flat(json.loads(json.dumps(config)))
    missing = "<absent>"
    changed = {}
    for key in sorted(set(old) | set(new)):
        if any(key == free or (free.endswith(".") and key.startswith(free)) for free in RESUME_FREE_KEYS):
            continue
        if old.get(key, missing) != new.get(key, missing):
            changed[key] = (old.get(key, missing), new.get(key, missing))
    return changed


def load_state(checkpoint_dir: str) -> dict:
    """A checkpoint's training state, read without unpickling code; one-line ConfigError when it is missing,
    truncated, crafted or written by something else."""
    path = os.path.join(checkpoint_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"model.resume_from_checkpoint={checkpoint_dir!r}: no {STATE_FILE} there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - zip errors, unpickling refusals, EOF: all mean "not a state"
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ConfigError(f"{path}: not a readable training state (truncated, or not written by this trainer: "
                          f"{reason})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{path}: not a training state of this trainer (format {found!r}, expected {STATE_FORMAT!r})")
    return state


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def all_finite(tensors) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def save(run_dir: str, trained_epochs: int, write_files: Callable[[str], None], state: dict,
         limit: Optional[int]) -> str:
    """Write `checkpoint-<n>` atomically (temporary folder renamed last) and keep the newest `limit`."""
    folder = os.path.join(run_dir, CHECKPOINTS_DIR)
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"checkpoint-{trained_epochs}")
    partial = os.path.join(folder, f".checkpoint-{trained_epochs}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        write_files(partial)
        torch.save({**state, "format": STATE_FORMAT}, os.path.join(partial, STATE_FILE))
        if os.path.exists(final):  # only after a crash between this rename and the epoch's metrics line
            stale = f"{final}.replaced-{os.getpid()}"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if limit:
        for _, old in list_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final
