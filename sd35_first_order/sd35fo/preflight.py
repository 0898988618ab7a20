"""Everything a run reads from outside its config values, checked before any model loads (TRAINER_CONTRACT.md §2):
the base model and the TAESD3 decoder (a local diffusers folder, or a hub id in the local cache when offline), the
prompt files of the training and evaluation prompt functions. Each failure is one `ConfigError` line naming the key,
the path and, where there is one, the command that fixes it. (The run folder and the resume state are
`run_folder.plan_run`'s; the reward weights are checked when the reward is built, also before the models.)
"""
from __future__ import annotations

import os

from . import prompts
from .config_check import ConfigError, eval_prompt_kwargs


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def check_model_source(key: str, value: str, revision: str, files: tuple, what: str) -> None:
    """`value` is a local folder holding `files`, or a hub id (cached locally when HF_HUB_OFFLINE is set)."""
    expanded = os.path.expanduser(value)
    if os.path.isdir(expanded):
        for name in files:
            if not os.path.isfile(os.path.join(expanded, name)):
                raise ConfigError(f"{key}={value!r}: no {name} there; expected {what}")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    looks_like_path = os.path.isabs(expanded) or value.startswith((".", "~")) or value.count("/") > 1
    try:
        validate_repo_id(value)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path or os.path.exists(expanded):
        raise ConfigError(f"{key}={value!r}: no such directory (and not a hub id)")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(value, files[0], revision=revision), str):
            raise ConfigError(f"{key}={value!r} (revision {revision!r}) is not in the local hub cache and HF_HUB_OFFLINE "
                              "is set: download it once online, or pass a local directory")


def check_models(config) -> None:
    pretrained = config.pretrained
    needed = ["model_index.json", "transformer/config.json", "text_encoder/config.json", "text_encoder_3/config.json"]
    if not pretrained.autoencodertiny or (config.eval.enabled and config.eval.decoder == "vae"):
        needed.append("vae/config.json")
    check_model_source("pretrained.model (--model)", pretrained.model, pretrained.revision, tuple(needed),
                       "a diffusers StableDiffusion3Pipeline folder")
    if pretrained.autoencodertiny:
        check_model_source("pretrained.autoencodertiny_model", pretrained.autoencodertiny_model, "main",
                           ("config.json",), "a diffusers AutoencoderTiny folder (madebyollin/taesd3)")


def prompt_source(config):
    """The training PromptSource, its files read now."""
    source = prompts.PromptSource(config.experiment.prompt_fn, dict(config.experiment.prompt_fn_kwargs),
                                  config.experiment.data_dir or None, config.quirks.hpd_list_growth)
    try:
        source.check()
    except (prompts.PromptFileError, OSError) as error:
        raise ConfigError(f"experiment.prompt_fn={config.experiment.prompt_fn!r}: {error}") from None
    return source


def evaluation_items(config):
    """The evaluation prompt list (None when evaluation is off)."""
    if not config.eval.enabled:
        return None
    try:
        items = prompts.eval_items(config.eval.prompt_fn, eval_prompt_kwargs(config), config.experiment.data_dir or None)
    except (prompts.PromptFileError, OSError) as error:
        raise ConfigError(f"eval.prompt_fn={config.eval.prompt_fn!r}: {error}") from None
    if not items:
        raise ConfigError(f"eval.prompt_fn={config.eval.prompt_fn!r}: no evaluation prompts")
    return items


def check_all(config):
    """(training PromptSource, evaluation items or None), after checking the models' sources."""
    check_models(config)
    return prompt_source(config), evaluation_items(config)
