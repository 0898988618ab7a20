"""Checkpoints that resume exactly and can be trusted (TRAINER_CONTRACT.md §4; spec §10.6, §11 item 22).

    <run>/checkpoints/checkpoint-<n>/          after n trained epochs
        lora/pytorch_lora_weights.safetensors  the UNet LoRA as diffusers writes it (StableDiffusionPipeline
                                               .load_lora_weights reads it at the trained strength, alpha = r)
        training_state.pt                      trainable weights, optimizer, grad scaler, RNG, counters, config

Written into a hidden temporary folder and renamed into place when complete; read with
`torch.load(weights_only=True)` (tensors and plain data only: a crafted file cannot run code); the newest
`num_checkpoint_limit` are kept. Upstream's `checkpoint_<e>.pt` ({lora_config, lora_weights, optimizer_state})
is read too, its LoRA keys with or without the adapter name, to continue an upstream run.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Callable, Optional

import numpy as np
import torch

from .config import ConfigError
from .run_folder import CHECKPOINTS_DIR, list_checkpoints

STATE_FILE = "training_state.pt"
STATE_FORMAT = "sd15zo-training-state/1"
LORA_DIR, LORA_FILE = "lora", "pytorch_lora_weights.safetensors"
# Keys a resumed run may change without changing what it trains (bookkeeping, logging, compute-only switches).
RESUME_FREE_KEYS = {"run_name", "resume_from_checkpoint", "num_train_epochs", "save_freq", "eval_freq",
                    "eval_num_batches", "eval_batch_size", "eval_num_steps", "eval_seed", "eval_prompt_seed",
                    "eval_noise_seed", "num_checkpoint_limit", "logging_dir", "report_to", "wandb_mode",
                    "wandb_project", "resume_ignore_config_changes", "nan_policy", "image_log_freq", "allow_tf32",
                    "gradient_checkpointing", "enable_xformers_memory_efficient_attention", "train_approx_kl",
                    "efficient_rollout", "reward_batch_size", "latent_chunk_size", "config_file", "tiny", "hub_token"}


def math_key_diff(saved: dict, config) -> dict:
    """{key: (saved, now)} for the keys that differ and change the training math."""
    missing = "<absent>"
    now = json.loads(json.dumps(config.to_dict()))
    changed = {}
    for key in sorted((set(saved) | set(now)) - RESUME_FREE_KEYS - {"derived"}):
        if saved.get(key, missing) != now.get(key, missing):
            changed[key] = (saved.get(key, missing), now.get(key, missing))
    return changed


def _read(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - zip errors, unpickling refusals, EOF: all mean "not a state"
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ConfigError(f"{path}: not a readable training state (truncated, or not written by this trainer: "
                          f"{reason})") from None


def load_state(checkpoint: str) -> dict:
    """The training state of a checkpoint-<n> folder (or an upstream checkpoint_<e>.pt, converted), read without
    unpickling code. One ConfigError line when missing, truncated, crafted or foreign."""
    if os.path.isfile(checkpoint):
        return _upstream_state(checkpoint, _read(checkpoint))
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"resume_from_checkpoint={checkpoint!r}: no {STATE_FILE} there")
    state = _read(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{path}: not a training state of this trainer (format {found!r}, expected {STATE_FORMAT!r})")
    return state


def _upstream_state(path: str, raw) -> dict:
    """Upstream's {lora_weights, optimizer_state: {optimizer, epoch, global_step}} as a state of ours (its epoch
    e is 0-based: e + 1 trained epochs)."""
    ok = isinstance(raw, dict) and isinstance(raw.get("lora_weights"), dict) and isinstance(
        raw.get("optimizer_state"), dict) and {"optimizer", "epoch", "global_step"} <= set(raw["optimizer_state"])
    if not ok:
        raise ConfigError(f"{path}: not a checkpoint of this trainer or of upstream's train_grpo*.py (expected "
                          "lora_weights and optimizer_state)")
    opt = raw["optimizer_state"]
    return {"format": "upstream", "epoch": int(opt["epoch"]) + 1, "global_step": int(opt["global_step"]),
            "lora_weights": raw["lora_weights"], "optimizer": opt["optimizer"]}


def with_adapter_name(state: dict, adapter: str = "default") -> dict:
    """LoRA keys `...lora_A.weight` -> `...lora_A.<adapter>.weight` where the adapter name is missing (upstream's
    resume accepted PEFT 0.7-style keys this way)."""
    out = {}
    for key, value in state.items():
        for part in (".lora_A.", ".lora_B."):
            if part in key and f"{part}{adapter}." not in key:
                key = key.replace(part, f"{part}{adapter}.")
        out[key] = value
    return out


def load_lora_state(unet, lora_state: dict) -> None:
    """Load PEFT LoRA tensors (keys with or without the adapter name) into the UNet's adapter; every adapter
    tensor must be covered and nothing unexpected given."""
    missing, unexpected = unet.load_state_dict(with_adapter_name(lora_state), strict=False)
    lora_missing = [k for k in missing if "lora_" in k]
    if unexpected or lora_missing:
        raise ConfigError(f"LoRA weights do not fit this UNet ({len(unexpected)} unexpected keys, e.g. "
                          f"{(unexpected or lora_missing)[0]}; {len(lora_missing)} adapter tensors missing)")


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


def save_lora(unet, directory: str) -> None:
    """The UNet's LoRA in diffusers' layout. alpha = r, which is what `load_lora_weights` assumes without adapter
    metadata, so none is written (its key order is not reproducible: two identical runs would differ in bytes)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    config = unet.peft_config["default"]
    if config.lora_alpha != config.r:
        raise ValueError(f"lora_alpha={config.lora_alpha} != r={config.r}: diffusers would load it at another strength")
    lora = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=lora)


def save(run_dir: str, epoch: int, write_weights: Callable[[str], None], state: dict, limit: Optional[int]) -> str:
    """Write checkpoint-<epoch> atomically (a temporary folder renamed last) and keep the newest `limit`."""
    folder = os.path.join(run_dir, CHECKPOINTS_DIR)
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"checkpoint-{epoch}")
    partial = os.path.join(folder, f".checkpoint-{epoch}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        write_weights(partial)
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
