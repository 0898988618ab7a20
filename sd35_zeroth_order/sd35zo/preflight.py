"""Everything a run reads from outside its config values, checked before any model loads (TRAINER_CONTRACT.md
§2): the base model, the prompt files and their embeddings, a warm-start LoRA, the optimizer's library. Each
failure is one `ConfigError` line naming the key, the path and, where there is one, the command that fixes it.
(The run folder and the resume checkpoint are `run_folder.plan_run`'s; reward services are checked when the
rewards are built, which also happens before the models load.)
"""
from __future__ import annotations

import importlib.util
import os

from .config_check import ConfigError

FETCH_HINT = {"geneval": "python scripts/fetch_data.py --only geneval", "ocr": "python scripts/fetch_data.py --only ocr",
              "pickscore": "python scripts/fetch_data.py --only pickscore"}


def check_pretrained_model(model: str, revision: str = "main") -> None:
    """`pretrained.model` is a diffusers SD3 directory (transformer/ and vae/ configs), or a hub id that can be
    loaded: cached locally when HF_HUB_OFFLINE is set (otherwise the download itself tells)."""
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        for sub in ("transformer", "vae"):
            if not os.path.isfile(os.path.join(expanded, sub, "config.json")):
                raise ConfigError(f"pretrained.model={model!r}: no {sub}/config.json there; expected a diffusers "
                                  "SD3 pipeline directory (model_index.json, transformer/, vae/, ...)")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    looks_like_path = os.path.isabs(expanded) or model.startswith((".", "~")) or model.count("/") > 1
    try:
        validate_repo_id(model)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path or os.path.exists(expanded):
        raise ConfigError(f"pretrained.model={model!r}: no such directory (and not a hub id like "
                          "stabilityai/stable-diffusion-3.5-medium)")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "transformer/config.json", revision=revision)
        if not isinstance(cached, str):
            raise ConfigError(f"pretrained.model={model!r} (revision {revision!r}) is not in the local hub cache and "
                              "HF_HUB_OFFLINE is set: download it once online, or pass a local directory with --model")


def _dataset_hint(config, path: str) -> str:
    for name, command in FETCH_HINT.items():
        if os.path.basename(os.path.dirname(path)) == name:
            if path.endswith(".h5"):
                return (f" (run PROMPT_PRESET={name} bash scripts/preprocess/preprocess_sd35_embeddings.sh, "
                        "or use --tiny for the test kit's prompts)")
            return f" (run {command}, or use --tiny for the test kit's prompts)"
    return ""


def prompt_data(config):
    """(train_set, test_set): the prompt files with their precomputed embeddings, each checked to exist,
    hold prompts and match. Cheap: the datasets read prompt lines and HDF5 attributes, no tensors."""
    from .embeddings import PrecomputedEmbeddingDataset

    sets = []
    for split in ("train", "test"):
        prompts, embeds = config[f"{split}_prompt_file_path"], config[f"{split}_hdf5_path"]
        for key, path in ((f"{split}_prompt_file_path", prompts), (f"{split}_hdf5_path", embeds)):
            if not os.path.isfile(path):
                raise ConfigError(f"{key}={path!r}: file not found{_dataset_hint(config, path)}")
        if config.prompt_fn == "geneval" and not prompts.endswith(".jsonl"):
            raise ConfigError(f"{split}_prompt_file_path={prompts!r}: prompt_fn='geneval' needs GenEval metadata "
                              "(.jsonl, one object with 'prompt', 'tag', 'include' a line)")
        try:
            dataset = PrecomputedEmbeddingDataset(embeds, prompts)
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(" ".join(str(error).split())) from None
        if len(dataset) == 0:
            raise ConfigError(f"{split}_prompt_file_path={prompts!r}: the file holds no prompts")
        sets.append(dataset)
    return tuple(sets)


def check_lora_path(config) -> None:
    path = config.train.lora_path
    if path is None or path == "":
        return
    from .config_check import run_path

    resolved = run_path(path)
    if not os.path.isdir(resolved) or not any(name.endswith(".safetensors") for name in os.listdir(resolved)):
        raise ConfigError(f"train.lora_path={path!r}: not a folder holding a diffusers LoRA (*.safetensors)")


def check_optimizer(config) -> None:
    if config.train.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("train.use_8bit_adam=True needs bitsandbytes (pip install bitsandbytes), which is not "
                          "installed; or leave it False for torch AdamW")


def check_all(config):
    """Every check above, in the order a user fixes them; returns (train_set, test_set)."""
    check_pretrained_model(config.pretrained.model, config.pretrained.revision)
    check_lora_path(config)
    check_optimizer(config)
    return prompt_data(config)
