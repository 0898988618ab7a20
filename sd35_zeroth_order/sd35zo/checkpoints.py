"""Checkpoints that resume exactly and can be trusted (TRAINER_CONTRACT.md §4).

    <run>/checkpoints/checkpoint-<n>/
        lora/pytorch_lora_weights.safetensors   the LoRA as diffusers writes it (EMA weights when train.ema),
                                                 with its adapter metadata so `load_lora_weights` applies alpha/r
        training_state.pt                        live LoRA, optimizer, EMA, sampler, RNG, counters, config

A checkpoint is written into a hidden temporary folder and renamed into place when complete, so a crash never
leaves a `checkpoint-<n>` that fails to load. The state holds only tensors and plain Python data and is read
with `torch.load(weights_only=True)`: a crafted file cannot run code. `num_checkpoint_limit` keeps the newest
folders. Nothing non-finite is ever written (the divergence guard stops the run first).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Callable, Optional

import numpy as np
import torch

from .config_check import ConfigError
from .run_folder import CHECKPOINTS_DIR, list_checkpoints

STATE_FILE = "training_state.pt"
STATE_FORMAT = "sd35zo-training-state/2"
# Keys a resumed run may change without changing what it trains: schedules of saving/evaluating, where it runs
# and logs, the run's length, how the reward service is reached and the resume switches themselves.
RESUME_FREE_KEYS = ("run_name", "resume_from", "num_epochs", "save_freq", "eval_freq", "num_checkpoint_limit",
                    "save_dir", "logdir", "wandb.", "reward_options.geneval.url", "reward_options.geneval.retry_timeout_s",
                    "reward_options.deqa.url", "reward_options.qwenvl.url", "reward_options.unifiedreward.url",
                    "resume_ignore_config_changes", "nan_policy", "sample.test_batch_size",
                    "test_hdf5_path", "test_prompt_file_path", "allow_tf32", "world_size", "sample.num_batches_per_epoch",
                    "train.gradient_accumulation_steps")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def math_key_diff(saved: dict, config) -> dict:
    """{key: (saved, now)} for the keys that differ between a checkpoint's config and this one and that change
    the training math (everything but RESUME_FREE_KEYS; the world size enters through the budget keys, so a
    resumed run may use another number of processes with the same global batch)."""
    old, new = _flatten(saved), _flatten(json.loads(json.dumps(config.to_dict())))
    missing = "<absent>"
    changed = {}
    for key in sorted(set(old) | set(new)):
        if any(key == free or (free.endswith(".") and key.startswith(free)) or key.startswith(free + ".")
               for free in RESUME_FREE_KEYS):
            continue
        if old.get(key, missing) != new.get(key, missing):
            changed[key] = (old.get(key, missing), new.get(key, missing))
    return changed


def load_state(checkpoint_dir: str) -> dict:
    """The training state of a checkpoint folder, read without unpickling code. One-line ConfigError when the
    file is missing, truncated, crafted or written by something else."""
    path = os.path.join(checkpoint_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"resume_from={checkpoint_dir!r}: no {STATE_FILE} there")
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
    """The global RNGs as tensors and plain data (numpy's state array becomes a tensor)."""
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


def save(run_dir: str, epoch: int, write_lora: Callable[[str], None], state: dict, limit: int) -> str:
    """Write `checkpoint-<epoch>` atomically (temporary folder, renamed last) and keep the newest `limit`."""
    folder = os.path.join(run_dir, CHECKPOINTS_DIR)
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"checkpoint-{epoch}")
    partial = os.path.join(folder, f".checkpoint-{epoch}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        write_lora(os.path.join(partial, "lora"))
        torch.save({**state, "format": STATE_FORMAT}, os.path.join(partial, STATE_FILE))
        if os.path.exists(final):  # only after a crash between this rename and the epoch's metrics line
            stale = f"{final}.replaced-{os.getpid()}"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    for _, old in list_checkpoints(run_dir)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def newest(run_dir: Optional[str]) -> Optional[str]:
    found = list_checkpoints(run_dir) if run_dir else []
    return found[-1][1] if found else None
