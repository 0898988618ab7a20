"""Everything a run reads from outside its config values, checked before any model loads (TRAINER_CONTRACT.md §2):
the base model (local folder or hub id), the prompt file, the optional GPU libraries a config asks for. Each
failure is one ConfigError line naming the key, the path and, where there is one, the command that fixes it.
(The run folder and the resume checkpoint are `run_folder.plan_run`'s; the reward is built right after, also
before the models.)
"""
from __future__ import annotations

import importlib.util
import os

from .config import REPO_ROOT, WITHDRAWN_MODELS, ConfigError, looks_like_local_path
from .prompts import read_prompts

SUBFOLDERS = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json",
              "tokenizer")
FETCH = "python scripts/fetch_data.py --only dancegrpo"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def check_model(model: str, revision: str = "main") -> None:
    """A diffusers SD1.5 folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), or a hub id (in the local
    cache when HF_HUB_OFFLINE is set; online, the download itself tells)."""
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        for sub in SUBFOLDERS:
            if not os.path.exists(os.path.join(expanded, sub)):
                raise ConfigError(f"pretrained_model={model!r}: no {sub} there; expected a diffusers SD1.5 folder "
                                  "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    local = looks_like_local_path(model)
    try:
        validate_repo_id(model)
    except HFValidationError:
        local = True
    if local or os.path.exists(expanded):
        raise ConfigError(f"pretrained_model={model!r}: no such folder (and not a hub id like "
                          f"{WITHDRAWN_MODELS['runwayml/stable-diffusion-v1-5']})")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        for candidate in (model, WITHDRAWN_MODELS.get(model)):
            if candidate and isinstance(try_to_load_from_cache(candidate, "unet/config.json", revision=revision), str):
                return
        raise ConfigError(f"pretrained_model={model!r} (revision {revision!r}) is not in the local hub cache and "
                          "HF_HUB_OFFLINE is set: download it once online, or pass a local folder with --model")


def check_prompt_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        hint = ""
        if os.path.normpath(path) == os.path.normpath(os.path.join(REPO_ROOT, "data", "dancegrpo", "prompts.txt")):
            hint = f" (run `{FETCH}` from the repository root, or use --tiny for the test kit's prompts)"
        raise ConfigError(f"prompt_file={path!r}: file not found{hint}")
    try:
        prompts = read_prompts(path)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"prompt_file={path!r}: cannot read it as UTF-8 text ({error})") from None
    if not prompts:
        raise ConfigError(f"prompt_file={path!r}: the file holds no prompts (one a line)")
    return prompts


def check_libraries(config) -> None:
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("use_8bit_adam=true needs bitsandbytes (pip install bitsandbytes), which is not installed; "
                          "or --set use_8bit_adam=false for torch AdamW")
    if config.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise ConfigError("enable_xformers_memory_efficient_attention=true needs xformers (pip install xformers), "
                          "which is not installed")


def check_all(config) -> list[str]:
    """Every check above in the order a user fixes them; returns the prompts."""
    check_model(config.pretrained_model, config.revision)
    prompts = check_prompt_file(config.prompt_file)
    check_libraries(config)
    return prompts
