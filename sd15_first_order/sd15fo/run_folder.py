"""Where a run lives and what it writes there (TRAINER_CONTRACT.md §3-§4), decided before any model loads.

    <logging_dir>/<run_name>/
        config.json          the resolved config
        run.json             component, config id, command lines, git commit, versions, world size, device
        metrics.jsonl        strict JSON, one object a line: "kind": "step" per optimizer step, "epoch" per epoch
        checkpoints/checkpoint-<n>/   after n trained epochs (checkpoints.py)
        images/              training images of the epoch's last batch, evaluation images

A run never destroys another: starting into a folder that holds metrics or checkpoints is refused (resume it or
choose another run_name). Resuming continues in the checkpoint's own folder and cuts `metrics.jsonl` back to
the lines written when that checkpoint was saved; resuming under another run_name copies that history into
the new folder (a fork, the source left as it was). A checkpoint older than its folder's newest is refused
there (resuming would overwrite the newer history). A failed start leaves no folder behind.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Optional

from .config import COMPONENT_ROOT, ConfigError

COMPONENT = "sd15_first_order"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "training_state.pt"
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "peft", "shared_rewards", "open_clip_torch", "PyYAML")
UPSTREAM_CHECKPOINT = re.compile(r"checkpoint_epoch(\d+)$")


@dataclass
class RunPlan:
    run_dir: str
    resume_dir: Optional[str] = None  # a checkpoint-<n> folder (ours) or a checkpoint_epoch<E> folder (upstream)
    fork_from: Optional[str] = None  # the source run folder when resuming into another folder
    upstream_epoch: Optional[int] = None  # E of an upstream checkpoint_epoch<E> (LoRA only: a warm start)
    new_folder: bool = True  # False when resuming in the checkpoint's own run folder


def check_writable_dir(key: str, path: str) -> None:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"{key}={path!r}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path!r}: {probe} is not writable")


def holds_a_run(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, METRICS_FILE)) or bool(list_checkpoints(run_dir))


def list_checkpoints(run_dir: str) -> list:
    """[(n, path)] of the complete `checkpoint-<n>` folders of a run, oldest first."""
    folder = os.path.join(run_dir, CHECKPOINTS_DIR)
    found = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            number = name[len("checkpoint-"):]
            if name.startswith("checkpoint-") and number.isdigit() and os.path.isdir(os.path.join(folder, name)):
                found.append((int(number), os.path.join(folder, name)))
    return sorted(found)


def upstream_checkpoint_epoch(path: str) -> int:
    """E of the reference trainer's `checkpoint_epoch<E>` folder (spec §5.6); ValueError for another name."""
    match = UPSTREAM_CHECKPOINT.search(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise ValueError(f"cannot read an epoch from {os.path.basename(os.path.normpath(path))!r} "
                         "(expected checkpoint_epoch<E>)")
    return int(match.group(1))


def default_run_name(config: dict) -> str:
    """resnabladb-db_<reward>_<YYYYmmdd-HHMMSS>, <reward> = reward_fn up to its first "_" (upstream's)."""
    return f"resnabladb-db_{config['reward_fn'].split('_')[0]}_{time.strftime('%Y%m%d-%H%M%S')}"


def find_checkpoint(path: str) -> str:
    """A checkpoint folder: `checkpoint-<n>` (or its training_state.pt), the newest one of a run folder or of its
    checkpoints/, or an upstream `checkpoint_epoch<E>` folder."""
    key = "model.resume_from_checkpoint"
    if not os.path.exists(path):
        raise ConfigError(f"{key}={path!r}: no such file or directory")
    if os.path.isfile(path):
        if os.path.basename(path) == STATE_FILE:
            return os.path.dirname(path)
        raise ConfigError(f"{key}={path!r}: expected a checkpoint folder or a run folder, got a file")
    if os.path.isfile(os.path.join(path, STATE_FILE)) or UPSTREAM_CHECKPOINT.search(os.path.basename(os.path.normpath(path))):
        return path
    for run_dir in (path, os.path.dirname(path)):
        candidates = [p for _, p in list_checkpoints(run_dir) if os.path.isfile(os.path.join(p, STATE_FILE))]
        if candidates and (run_dir == path or os.path.basename(path) == CHECKPOINTS_DIR):
            return candidates[-1]
    raise ConfigError(f"{key}={path!r}: no {STATE_FILE} there and no checkpoint-<n> folder holding one")


def plan_run(config: dict, load_state: Callable, math_key_diff: Callable, world_size: int) -> RunPlan:
    """The run folder and the checkpoint to resume, or a one-line ConfigError. `load_state(dir)` reads a
    checkpoint's state (one line if unreadable); `math_key_diff(saved_config, config)` lists changed keys that
    change the training math."""
    root = config["logging_dir"]
    check_writable_dir("logging_dir", root)
    name = config["run_name"]
    resume = config["model"]["resume_from_checkpoint"]
    if not resume:
        run_dir = os.path.join(root, name or default_run_name(config))
        if holds_a_run(run_dir):
            if not name:
                run_dir = _unused_variant(run_dir)
            else:
                raise ConfigError(f"run folder {run_dir} already holds a run (metrics or checkpoints): resume it with "
                                  f"--resume {run_dir} or choose another --run-name")
        return RunPlan(run_dir)

    checkpoint = find_checkpoint(resume)
    if not os.path.isfile(os.path.join(checkpoint, STATE_FILE)):  # upstream checkpoint_epoch<E>: LoRA only
        epoch = upstream_checkpoint_epoch(checkpoint)
        try:
            from .models import find_lora_file

            find_lora_file(checkpoint)
        except FileNotFoundError as error:
            raise ConfigError(f"model.resume_from_checkpoint={resume!r}: {error}") from None
        if epoch + 1 >= config["train"]["max_epochs"]:
            raise ConfigError(f"model.resume_from_checkpoint={resume!r}: upstream epoch {epoch} was the last of "
                              f"train.max_epochs={config['train']['max_epochs']}; nothing left to train")
        run_dir = os.path.join(root, name or default_run_name(config))
        if holds_a_run(run_dir):
            raise ConfigError(f"run folder {run_dir} already holds a run: choose another --run-name")
        return RunPlan(run_dir, checkpoint, upstream_epoch=epoch)

    state = load_state(checkpoint)
    trained = int(state["epoch"])
    if trained >= config["train"]["max_epochs"]:
        raise ConfigError(f"model.resume_from_checkpoint={resume!r}: the checkpoint has trained {trained} epochs and "
                          f"train.max_epochs={config['train']['max_epochs']}: nothing left to train (raise "
                          "train.max_epochs)")
    changed = math_key_diff(json.loads(state["config_json"]), config)
    if int(state.get("world_size", world_size)) != world_size:
        changed["world_size"] = (int(state["world_size"]), world_size)
    if changed and not config["resume_ignore_config_changes"]:
        shown = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(changed.items())[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(f"model.resume_from_checkpoint={resume!r}: the checkpoint was trained with another config "
                          f"({shown}{more}); resume with the same config, or pass --set "
                          "resume_ignore_config_changes=true to continue anyway")
    source_run = os.path.dirname(os.path.dirname(checkpoint))
    in_run_layout = os.path.basename(os.path.dirname(checkpoint)) == CHECKPOINTS_DIR
    if in_run_layout and not name:
        newest = list_checkpoints(source_run)[-1][1]
        if os.path.realpath(newest) != os.path.realpath(checkpoint):
            raise ConfigError(f"model.resume_from_checkpoint={resume!r}: {source_run} has a newer checkpoint "
                              f"({os.path.basename(newest)}) that resuming here would overwrite; resume from it, or "
                              "continue in a new folder with --run-name <name>")
        return RunPlan(source_run, checkpoint, new_folder=False)
    run_dir = os.path.join(root, name or default_run_name(config))
    if in_run_layout and os.path.realpath(run_dir) == os.path.realpath(source_run):
        return plan_run({**config, "run_name": None}, load_state, math_key_diff, world_size)
    if holds_a_run(run_dir):
        raise ConfigError(f"run folder {run_dir} already holds a run: choose another --run-name, or drop it to "
                          "continue in the checkpoint's own folder")
    return RunPlan(run_dir, checkpoint, fork_from=source_run if in_run_layout else None)


def _unused_variant(run_dir: str) -> str:
    n = 2
    while holds_a_run(f"{run_dir}_{n}"):
        n += 1
    return f"{run_dir}_{n}"


# ------------------------------------------------------------------------------------------------ run files

def create_run_dir(plan: RunPlan, metrics_lines: Optional[int]) -> None:
    """Make the folder; on a resume cut `metrics.jsonl` back to the `metrics_lines` records written when the
    checkpoint was saved (a fork copies them from the source)."""
    os.makedirs(plan.run_dir, exist_ok=True)
    if plan.resume_dir is None or metrics_lines is None:
        return
    source = os.path.join(plan.fork_from or plan.run_dir, METRICS_FILE)
    if not os.path.isfile(source):
        return
    with open(source, encoding="utf-8") as f:
        kept = [line for _, line in zip(range(metrics_lines), f) if line.endswith("\n")]
    atomic_write(os.path.join(plan.run_dir, METRICS_FILE), "".join(kept))


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_start_files(run_dir: str, config: dict, config_id: str, world_size: int, device, resumed_from) -> None:
    atomic_write(os.path.join(run_dir, "config.json"), json.dumps(strict(config), indent=2) + "\n")
    path = os.path.join(run_dir, "run.json")
    previous = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = {}
    start = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv), "world_size": world_size,
             "device": describe_device(device), "resumed_from": resumed_from}
    record = {"component": COMPONENT, "config_id": config_id, "git_commit": git_commit(),
              "versions": library_versions(), "python": platform.python_version(), "host": platform.node(),
              "world_size": world_size, "device": start["device"], "starts": previous.get("starts", []) + [start]}
    atomic_write(path, json.dumps(record, indent=2) + "\n")


def git_commit() -> Optional[str]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=COMPONENT_ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=COMPONENT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def describe_device(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()})"


def strict(value):
    """Non-finite floats -> None (strict JSON has no NaN / Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def remove_if_empty_start(plan: RunPlan) -> None:
    """A start that failed before its first record leaves no folder it created behind."""
    if plan.new_folder and os.path.isdir(plan.run_dir) and not holds_a_run(plan.run_dir):
        if set(os.listdir(plan.run_dir)) <= {"config.json", "run.json", "wandb", "tensorboard", "images"}:
            shutil.rmtree(plan.run_dir, ignore_errors=True)
