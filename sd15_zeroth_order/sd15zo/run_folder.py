"""Where a run lives and what it writes (TRAINER_CONTRACT.md §3-§4), decided before any model loads.

    <logging_dir>/<run_name>/
        config.json                       the resolved config, with the derived budget
        run.json                          component, config file, command lines, git commit, versions, world size
                                          (all processes, every node) and nodes
        metrics.jsonl                     strict JSON, "kind": "step" per optimizer update, "epoch" per epoch
        checkpoints/checkpoint-<n>/       after n trained epochs (checkpoints.py)
        images/epoch_<n>.jpg, eval_<n>.jpg

A run never destroys another: starting into a folder that holds metrics or checkpoints is refused (resume it or
choose another run_name); resuming continues in the checkpoint's own folder and cuts metrics.jsonl back to what
it held when the checkpoint was written; an older checkpoint of a folder holding a newer one is refused;
resuming under another run_name forks (the new folder starts with the source's history up to the checkpoint).
A failed start leaves no folder behind.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Optional

from .config import COMPONENT_ROOT, TRAINER_SCRIPTS, ConfigError

COMPONENT = "sd15_zeroth_order"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
VERSIONED = ("torch", "diffusers", "transformers", "peft", "accelerate", "shared_rewards", "PyYAML", "open_clip_torch")


@dataclass
class RunPlan:
    run_dir: str
    resume_dir: Optional[str] = None   # checkpoint-<n> folder (or an upstream checkpoint_<e>.pt file)
    resume_state: Optional[dict] = None
    fork_from: Optional[str] = None    # the source run folder when resuming into another folder


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
        raise ConfigError(f"{key}={path!r}: {probe} is not writable (--output-dir chooses another folder)")


def holds_a_run(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, METRICS_FILE)) or bool(list_checkpoints(run_dir))


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """[(n, path)] of the complete checkpoint-<n> folders of a run, oldest first."""
    folder = os.path.join(run_dir, CHECKPOINTS_DIR)
    found = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            number = name[len("checkpoint-"):]
            if name.startswith("checkpoint-") and number.isdigit() and os.path.isdir(os.path.join(folder, name)):
                found.append((int(number), os.path.join(folder, name)))
    return sorted(found)


def _timestamp() -> str:
    return time.strftime("%Y-%m-%d-%H-%M-%S")  # upstream's run_name default


def plan_run(config, load_state, math_key_diff) -> RunPlan:
    """The run folder and the state to resume, before any model loads; every refusal is one ConfigError line.
    `load_state(path)` reads a checkpoint (one-line error when unreadable); `math_key_diff(saved, config)` lists
    the keys whose change alters the training math."""
    root = config.logging_dir
    check_writable_dir("logging_dir", root)
    if not config.resume_from_checkpoint:
        run_dir = os.path.join(root, config.run_name or _timestamp())
        if holds_a_run(run_dir):
            if not config.run_name:
                run_dir = _unused_variant(run_dir)
            else:
                raise ConfigError(f"run folder {run_dir} already holds a run (metrics or checkpoints): continue it "
                                  f"with --set resume_from_checkpoint={run_dir}, or choose another --set run_name=...")
        return RunPlan(run_dir)

    source = config.resume_from_checkpoint
    checkpoint = find_checkpoint(source)
    state = load_state(checkpoint)
    epoch = int(state["epoch"])
    if epoch >= config.num_train_epochs:
        raise ConfigError(f"resume_from_checkpoint={source!r}: the checkpoint is at epoch {epoch} and "
                          f"num_train_epochs={config.num_train_epochs}: nothing left to train (raise "
                          "--set num_train_epochs=...)")
    if state.get("trainer", config.trainer) != config.trainer:
        raise ConfigError(f"resume_from_checkpoint={source!r} was written by {TRAINER_SCRIPTS[state['trainer']]}; "
                          f"this is {TRAINER_SCRIPTS[config.trainer]}")
    if "config" in state:
        changed = math_key_diff(state["config"], config)
        if changed and not config.resume_ignore_config_changes:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise ConfigError(f"resume_from_checkpoint={source!r}: the checkpoint was trained with another config "
                              f"({shown}{more}); resume with the same config, or pass --set "
                              "resume_ignore_config_changes=true to continue anyway")
    in_layout = os.path.isdir(checkpoint) and os.path.basename(os.path.dirname(checkpoint)) == CHECKPOINTS_DIR
    source_run = os.path.dirname(os.path.dirname(checkpoint)) if in_layout else None
    if in_layout and not config.run_name:
        newest = list_checkpoints(source_run)[-1][1]
        if os.path.realpath(newest) != os.path.realpath(checkpoint):
            raise ConfigError(f"resume_from_checkpoint={source!r}: {source_run} has a newer checkpoint "
                              f"({os.path.basename(newest)}) that resuming here would overwrite; resume from it, or "
                              "continue in a new folder with --set run_name=<name>")
        return RunPlan(source_run, checkpoint, state)
    run_dir = os.path.join(root, config.run_name or _timestamp())
    if in_layout and os.path.realpath(run_dir) == os.path.realpath(source_run):
        newest = list_checkpoints(source_run)[-1][1]
        if os.path.realpath(newest) != os.path.realpath(checkpoint):
            raise ConfigError(f"resume_from_checkpoint={source!r}: {source_run} has a newer checkpoint "
                              f"({os.path.basename(newest)}); resume from it, or choose another run_name")
        return RunPlan(source_run, checkpoint, state)
    if holds_a_run(run_dir):
        raise ConfigError(f"run folder {run_dir} already holds a run: choose another --set run_name=..., or leave "
                          "run_name out to continue in the checkpoint's own folder")
    return RunPlan(run_dir, checkpoint, state, fork_from=source_run)


def _unused_variant(run_dir: str) -> str:
    n = 2
    while holds_a_run(f"{run_dir}_{n}"):
        n += 1
    return f"{run_dir}_{n}"


def find_checkpoint(path: str) -> str:
    """A checkpoint-<n> folder, the newest one of a run folder (or its checkpoints/), or an upstream
    checkpoint_<e>.pt file."""
    from .checkpoints import STATE_FILE

    if not os.path.exists(path):
        raise ConfigError(f"resume_from_checkpoint={path!r}: no such file or directory")
    if os.path.isfile(path):
        if os.path.basename(path) == STATE_FILE:
            return os.path.dirname(path)
        if path.endswith(".pt"):
            return path  # upstream's checkpoint_<e>.pt
        raise ConfigError(f"resume_from_checkpoint={path!r}: expected a checkpoint-<n> folder, a run folder or an "
                          "upstream checkpoint_<e>.pt file")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    for run_dir in (path, os.path.dirname(path)):
        found = [p for _, p in list_checkpoints(run_dir) if os.path.isfile(os.path.join(p, STATE_FILE))]
        if found and (run_dir == path or os.path.basename(path) == CHECKPOINTS_DIR):
            return found[-1]
    raise ConfigError(f"resume_from_checkpoint={path!r}: no {STATE_FILE} there and no checkpoint-<n> folder holding one")


# ------------------------------------------------------------------------------------------------ files

def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def create_run_dir(plan: RunPlan, metrics_lines: Optional[int]) -> None:
    """Make the folder (main process, once the models loaded); on a resume, cut metrics.jsonl back to the
    `metrics_lines` records written when the checkpoint was saved (a fork copies them from the source)."""
    os.makedirs(plan.run_dir, exist_ok=True)
    if plan.resume_dir is None or metrics_lines is None:
        return
    source = os.path.join(plan.fork_from or plan.run_dir, METRICS_FILE)
    if not os.path.isfile(source):
        return
    with open(source, encoding="utf-8") as f:
        kept = [line for _, line in zip(range(metrics_lines), f) if line.endswith("\n")]
    atomic_write(os.path.join(plan.run_dir, METRICS_FILE), "".join(kept))


def write_start_files(run_dir: str, config, budget, world_size: int, device, resumed_from: Optional[str]) -> None:
    """config.json (resolved config + derived budget) and run.json (one entry per start); written by global rank 0,
    `world_size` counting the processes of every node."""
    resolved = {**config.to_dict(), "derived": budget.__dict__ if budget is not None else {}}
    atomic_write(os.path.join(run_dir, "config.json"), json.dumps(strict(resolved), indent=2) + "\n")
    path = os.path.join(run_dir, "run.json")
    previous = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = {}
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))  # torchrun's (and accelerate launch's) node count
    start = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv), "world_size": world_size,
             "nodes": nodes, "device": describe_device(device), "resumed_from": resumed_from}
    record = {"component": COMPONENT, "trainer": TRAINER_SCRIPTS[config.trainer], "config_file": config.config_file,
              "tiny": config.tiny, "git_commit": git_commit(), "versions": library_versions(),
              "python": platform.python_version(), "host": platform.node(), "world_size": world_size, "nodes": nodes,
              "device": start["device"], "starts": previous.get("starts", []) + [start]}
    atomic_write(path, json.dumps(record, indent=2) + "\n")


def git_commit() -> Optional[str]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=COMPONENT_ROOT, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=COMPONENT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict:
    versions = {}
    for package in VERSIONED:
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
    return f"cpu ({platform.processor() or platform.machine()})"


def strict(value):
    """Non-finite floats -> None (strict JSON has no NaN/Infinity), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def remove_if_empty_start(plan: RunPlan) -> None:
    """A start that failed before its first epoch leaves no folder it created behind."""
    if plan.resume_dir is None and os.path.isdir(plan.run_dir) and not holds_a_run(plan.run_dir):
        if set(os.listdir(plan.run_dir)) <= {"config.json", "run.json", "wandb", "images"}:
            shutil.rmtree(plan.run_dir, ignore_errors=True)
