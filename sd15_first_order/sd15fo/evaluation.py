"""Offline evaluation of checkpoints (spec §9 item 16): the paper's curves for "ours" cannot come from its run,
which evaluates only before epoch 0 (eval.freq 100 with 100 epochs).

    python evaluate.py --config config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml logs/<run>      # every checkpoint
    python evaluate.py --config config/<paper>.yaml logs/<run>/checkpoints/checkpoint-50 --base      # one + the base model
    torchrun --nproc_per_node=4 evaluate.py --config config/<paper>.yaml logs/<run>                  # 4 GPUs share the prompts

Each checkpoint (ours: checkpoint-<n>; upstream's checkpoint_epoch<E> folders too) is evaluated exactly as the
trainer does (trainer.evaluate: the config's eval prompts, eval.num_steps, CFG, η, reward and per-step KL to the
base model) with the same prompts and noise for every checkpoint (`--key`, default 0: the prompts of the run's
own epoch-0 evaluation), so the curve compares policies, not prompt draws. One JSON line per checkpoint goes to
`<run>/offline_eval.jsonl` (or `--out`), and a table to the console.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from .config import ConfigError

logger = logging.getLogger("sd15fo.evaluation")


def build_eval_run(loaded, procs, out_dir: str):
    """A trainer Run for sampling and evaluation only: models with the "pf" adapter (zero: the base model),
    reward, prompts; images go to `out_dir`/images. Checks run before any model loads, as for training."""
    from . import preflight, trainer
    from .metrics import MetricLogger
    from .models import ModelLoadError, add_lora, load_models
    from .prompts import PromptSource
    from .rewards import load as load_reward
    from .sampling import encode_prompts
    from .subsampling import num_train_timesteps

    config = loaded.values
    preflight.check_all(config)
    try:
        reward = load_reward(config["reward_fn"], config["reward_fn_kwargs"], procs.device)
    except (OSError, ValueError) as error:
        raise ConfigError(f"reward_fn={config['reward_fn']!r}: {' '.join(str(error).split())[:300]}") from None
    try:
        models = load_models(config, procs.device)
    except ModelLoadError as error:
        raise ConfigError(str(error)) from None
    params = add_lora(models.unet, config["model"]["lora_rank"], config["model"]["lora_alpha"], config["model"]["use_xformers"])
    with torch.no_grad():  # a fresh adapter has lora_B = 0: the base model until a checkpoint loads
        negative = encode_prompts(models.tokenizer, models.text_encoder, [""], procs.device)
    quiet = {**config, "report_to": "none"}
    return trainer.Run(config, loaded.config_id, procs, models, models.unet, params, None, None, reward,
                       PromptSource(config["data_dir"]), negative, out_dir, MetricLogger(out_dir, quiet, procs.is_main),
                       num_train_timesteps(config["sample"]["num_steps"], config["train"]["timestep_fraction"]), 0)


def checkpoints_of(path: str) -> list:
    """[(checkpoint folder, trained epochs, global step or None)]: a run folder's checkpoints in order, or the one
    checkpoint named (ours or upstream's checkpoint_epoch<E>, which is E + 1 trained epochs)."""
    from .run_folder import STATE_FILE, UPSTREAM_CHECKPOINT, list_checkpoints, upstream_checkpoint_epoch

    def describe(folder):
        state_file = os.path.join(folder, STATE_FILE)
        if os.path.isfile(state_file):
            from .checkpoints import load_state

            state = load_state(folder)
            return folder, int(state["epoch"]), int(state["global_step"])
        if UPSTREAM_CHECKPOINT.search(os.path.basename(os.path.normpath(folder))):
            return folder, upstream_checkpoint_epoch(folder) + 1, None
        raise ConfigError(f"{folder}: neither a checkpoint-<n> folder (with {STATE_FILE}) nor upstream's "
                          "checkpoint_epoch<E>")

    if not os.path.isdir(path):
        raise ConfigError(f"{path}: no such checkpoint or run folder")
    found = [p for _, p in list_checkpoints(path)]
    if not found:
        upstream = sorted((upstream_checkpoint_epoch(os.path.join(path, n)), os.path.join(path, n))
                          for n in os.listdir(path) if UPSTREAM_CHECKPOINT.search(n))
        found = [p for _, p in upstream]
    return [describe(p) for p in found] if found else [describe(path)]


def run_folder_of(path: str) -> str:
    """The run folder a checkpoint belongs to (<run>/checkpoints/checkpoint-<n>, or upstream's <run>/checkpoint_epoch<E>),
    or the path itself when it is a run folder."""
    from .run_folder import CHECKPOINTS_DIR, STATE_FILE, UPSTREAM_CHECKPOINT

    path = os.path.abspath(path)
    if os.path.basename(os.path.dirname(path)) == CHECKPOINTS_DIR and os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.dirname(os.path.dirname(path))
    if UPSTREAM_CHECKPOINT.search(os.path.basename(path)):
        return os.path.dirname(path)
    return path


def evaluate_checkpoints(run, targets: list, key: int, base: bool) -> list:
    """Evaluate the base model (optional) and each (folder, epoch, step); LoRA loaded into the adapter in turn."""
    from .models import load_lora_into
    from .trainer import evaluate

    rows = []
    if base:
        rows.append({"checkpoint": "base", "epoch": 0, "global_step": 0, "key": key, **evaluate(run, key, "eval_base")})
    for folder, epoch, step in targets:
        load_lora_into(run.unet, folder)
        run.global_step = step or 0
        rows.append({"checkpoint": folder, "epoch": epoch, "global_step": step, "key": key,
                     **evaluate(run, key, f"eval_{os.path.basename(os.path.normpath(folder))}")})
    return rows


def main(argv=None) -> None:
    from .cli import common_arguments, fail, load_config, setup_logging

    parser = argparse.ArgumentParser(description="Evaluate checkpoints of a residual ∇-DB / RSM run offline.")
    common_arguments(parser)
    parser.add_argument("checkpoints", nargs="+", help="run folders (every checkpoint) or checkpoint folders")
    parser.add_argument("--key", type=int, default=0, help="seeds the eval prompts and noise (default 0: the run's "
                        "epoch-0 evaluation); the same for every checkpoint")
    parser.add_argument("--base", action="store_true", help="also evaluate the base model (no LoRA)")
    parser.add_argument("--out", help="JSONL file of the results (default <first run folder>/offline_eval.jsonl)")
    args = parser.parse_args(argv)
    try:
        loaded = load_config(args)
        targets = [t for path in args.checkpoints for t in checkpoints_of(os.path.abspath(path))]
    except ConfigError as error:
        fail(str(error))
    out = os.path.abspath(args.out) if args.out else os.path.join(run_folder_of(args.checkpoints[0]), "offline_eval.jsonl")
    setup_logging()
    from . import distributed

    procs = None
    try:
        procs = distributed.start(loaded.values["device"])
        run = build_eval_run(loaded, procs, os.path.join(os.path.dirname(out), "offline_eval"))
        rows = evaluate_checkpoints(run, targets, args.key, args.base)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        fail(" ".join(str(error).split()))
    finally:
        if procs is not None:
            procs.close()
    if procs.is_main:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{'checkpoint':<60} {'epoch':>5} {'reward':>9} {'± std':>8} {'KL':>10}")
        for row in rows:
            print(f"{row['checkpoint'][-60:]:<60} {row['epoch']:>5} {row['eval_reward_mean']:>9.4f} "
                  f"{row['eval_reward_std']:>8.4f} {row['eval_kl_divergence']:>10.3g}")
        print(f"wrote {out}", file=sys.stderr)
