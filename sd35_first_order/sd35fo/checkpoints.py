"""Checkpoints that resume exactly and can be trusted (TRAINER_CONTRACT.md §4, spec §9.7 / §10 I4).

    <run>/checkpoints/checkpoint-<n>/          after n trained epochs (upstream's checkpoint_epoch<n-1>)
        lora/pytorch_lora_weights.safetensors  the policy LoRA in diffusers' SD3 format (keys `transformer.*`, adapter
                                               metadata r = alpha = 8), read by `pipe.load_lora_weights`
        training_state.pt                      policy LoRA, value net, optimizer, GradScaler, tau, prompt draws, RNG,
                                               counters, the config: tensors and plain data only

A checkpoint is written into a hidden temporary folder and renamed into place when complete, so a crash never
leaves a `checkpoint-<n>` that fails to load; the state is read with `torch.load(weights_only=True)`, so a crafted
file cannot run code. `logging.num_checkpoint_limit` keeps the newest. Nothing non-finite is ever written.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from .config_check import ConfigError
from .run_folder import CHECKPOINTS_DIR, list_checkpoints

STATE_FILE = "training_state.pt"
STATE_FORMAT = "sd35fo-training-state/1"
# Keys a resume may change without changing what it trains: how long it runs, how often it saves and evaluates,
# where it writes and logs, the resume switches, memory/speed switches with the same math.
RESUME_FREE_KEYS = ("training.num_epochs", "training.nan_policy", "training.allow_tf32", "training.gradient_checkpointing",
                    "logging.", "saving.", "eval.", "experiment.data_dir", "exp_name", "run_name", "preset")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def math_key_diff(saved: dict, config) -> dict:
    """{key: (saved, now)} of the keys that differ and change the training math (all but RESUME_FREE_KEYS)."""
    old, new = _flatten(saved), _flatten(json.loads(json.dumps(config.to_dict())))
    missing = "<absent>"
    changed = {}
    for key in sorted(set(old) | set(new)):
        if any(key == free or (free.endswith(".") and key.startswith(free)) for free in RESUME_FREE_KEYS):
            continue
        if old.get(key, missing) != new.get(key, missing):
            changed[key] = (old.get(key, missing), new.get(key, missing))
    return changed


def load_state(checkpoint_dir: str) -> dict:
    path = os.path.join(checkpoint_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"--resume={checkpoint_dir!r}: no {STATE_FILE} there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - zip errors, unpickling refusals, EOF all mean "not a state"
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
    tensors = list(tensors)
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def save(run_dir: str, epoch: int, write_lora, state: dict, limit: int) -> str:
    """`checkpoint-<epoch>` written atomically (temporary folder renamed last); keeps the newest `limit`."""
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


def save_lora(transformer, directory: str) -> None:
    """The policy adapter "default" as diffusers' `save_lora_weights` writes it, with its adapter config as
    metadata (so `load_lora_weights` applies alpha / r exactly)."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    lora = {k: v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(transformer, adapter_name="default").items()}
    StableDiffusion3Pipeline.save_lora_weights(directory, transformer_lora_layers=lora,
                                               transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
