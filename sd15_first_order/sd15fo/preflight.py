"""Everything a run reads from outside its config values, checked before any model loads (contract §2): the
base model (local folder or hub id), the prompt files, the reward weights named in the config, the optional
libraries a key asks for, and the device. Each failure is one `ConfigError` line naming the key, the path and,
where there is one, the command that fixes it. (The run folder and the resume checkpoint are
`run_folder.plan_run`'s.)
"""
from __future__ import annotations

import importlib.util
import os

from .config import ConfigError
from .prompts import FETCH_HINT, PromptSource, eval_kwargs

SD15_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
MIRROR = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def check_pretrained_model(model: str, revision: str) -> None:
    """`model.pretrained` is a diffusers SD1.5 folder, or a hub id that can be loaded (in the local cache when
    HF_HUB_OFFLINE is set; otherwise the download itself reports)."""
    key = "model.pretrained"
    if os.path.isdir(model):
        for part in SD15_PARTS:
            if not os.path.isdir(os.path.join(model, part)):
                raise ConfigError(f"{key}={model!r}: no {part}/ there; expected a diffusers SD1.5 folder "
                                  f"({', '.join(SD15_PARTS)})")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    looks_like_path = os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1
    try:
        validate_repo_id(model)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path or os.path.exists(model):
        raise ConfigError(f"{key}={model!r}: no such directory (and not a hub id like {MIRROR})")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "unet/config.json", revision=revision), str):
            hint = f" ({model} was withdrawn from the hub; the mirror is {MIRROR})" if model.startswith("runwayml/") else ""
            raise ConfigError(f"{key}={model!r} (revision {revision!r}) is not in the local hub cache and "
                              f"HF_HUB_OFFLINE is set: download it once online, or pass a local folder with "
                              f"--model{hint}")


def check_scheduler(config: dict) -> None:
    """The step counts fit the model's training timesteps (read from a local folder; hub ids at load)."""
    from .models import read_scheduler_config

    model = config["model"]["pretrained"]
    scheduler = read_scheduler_config(model) if os.path.isdir(model) else None
    if scheduler is None:
        return
    total = int(scheduler.get("num_train_timesteps", 1000))
    for key, value in (("sample.num_steps", config["sample"]["num_steps"]), ("eval.num_steps", config["eval"]["num_steps"])):
        if value > total:
            raise ConfigError(f"{key}={value} exceeds the {total} training timesteps of {model}/scheduler")


def check_prompts(config: dict) -> None:
    source = PromptSource(config["data_dir"])
    for split_kwargs in (config["prompt_fn_kwargs"], eval_kwargs(config)):
        for key, path, fetch in source.files(config["prompt_fn"], split_kwargs):
            if not os.path.isfile(path):
                hint = f" ({FETCH_HINT.format(set=fetch)})" if fetch else ""
                raise ConfigError(f"{key}={os.path.dirname(path) if key == 'data_dir' else path!r}: "
                                  f"{path} not found{hint}")
            with open(path, encoding="utf-8") as f:
                if not f.read(1):
                    raise ConfigError(f"{path}: the prompt file is empty")


def check_reward_weights(config: dict) -> None:
    for key in ("checkpoint_path", "weights", "clip"):
        value = (config["reward_fn_kwargs"] or {}).get(key)
        if isinstance(value, str) and (value.startswith((".", "/", "~")) or value.count("/") > 1) \
                and not os.path.exists(os.path.expanduser(value)):
            raise ConfigError(f"reward_fn_kwargs.{key}={value!r}: no such file or directory")


def check_libraries(config: dict) -> None:
    if config["train"]["adam"]["use_8bit"] and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("train.adam.use_8bit=true needs bitsandbytes (pip install bitsandbytes), which is not "
                          "installed; or set it to false for torch AdamW")
    if config["report_to"] == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("report_to='tensorboard' needs tensorboard (pip install tensorboard), which is not "
                          "installed; or use report_to: none (metrics.jsonl is always written)")
    if config["report_to"] == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("report_to='wandb' needs wandb (pip install wandb); or use report_to: none")


def check_device(config: dict) -> None:
    import torch

    if config["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is visible; use device: auto or cpu")
    if config["mixed_precision"] == "fp16" and (config["device"] == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("mixed_precision='fp16' needs a CUDA device; use bf16 or no on a CPU")


def check_all(config: dict) -> None:
    """Every check above, in the order a user fixes them."""
    check_pretrained_model(config["model"]["pretrained"], config["model"]["revision"])
    check_scheduler(config)
    check_prompts(config)
    check_reward_weights(config)
    check_libraries(config)
    check_device(config)
