"""Where a run lives and what it writes there (TRAINER_CONTRACT.md §3-§4): the run folder, decided before any
model loads, `config.json` / `run.json` at start, and `metrics.jsonl` in strict JSON.

    <save_dir>/<run_name>/
        config.json            the fully resolved config
        run.json               component, config id, command lines, git commit, versions, world size, device
        metrics.jsonl          one JSON object a line: per optimizer step ("kind": "step") and per epoch ("epoch")
        checkpoints/checkpoint-<n>/   see checkpoints.py
        images/epoch_<n>.jpg   training images every 10 epochs

A run never destroys another: starting into a folder that holds metrics or checkpoints is refused (resume it or
pick another name); resuming continues in the checkpoint's own folder, cuts `metrics.jsonl` back to the lines
written when that checkpoint was saved, and refuses a checkpoint older than the folder's newest. Resuming with
another `run_name` continues in that new folder, which starts with the source run's metrics up to the
checkpoint (a fork; the source run is left as it was).
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

from .config_check import COMPONENT_ROOT, ConfigError, run_path

COMPONENT = "sd35_zeroth_order"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "shared_rewards", "ml_collections")


@dataclass
class RunPlan:
    """What `plan_run` decided: the folder, and the checkpoint to resume from (with its loaded state)."""
    run_dir: str
    resume_dir: Optional[str] = None  # checkpoint-<n> folder
    resume_state: Optional[dict] = None  # its training_state.pt, loaded with weights_only=True
    fork_from: Optional[str] = None  # the source run folder when resuming into another folder


def check_writable_dir(key: str, path: str) -> None:
    """`path` is (or can be created as) a writable directory: no component of it is a file."""
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
    checkpoints = os.path.join(run_dir, CHECKPOINTS_DIR)
    return os.path.isfile(os.path.join(run_dir, METRICS_FILE)) or (
        os.path.isdir(checkpoints) and any(name.startswith("checkpoint-") for name in os.listdir(checkpoints)))


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """[(n, path)] of the complete `checkpoint-<n>` folders of a run, oldest first."""
    folder = os.path.join(run_dir, CHECKPOINTS_DIR)
    found = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            number = name[len("checkpoint-"):]
            if name.startswith("checkpoint-") and number.isdigit() and os.path.isdir(os.path.join(folder, name)):
                found.append((int(number), os.path.join(folder, name)))
    return sorted(found)


def plan_run(config, load_state, math_key_diff) -> RunPlan:
    """Decide the run folder before any model loads; every refusal is a one-line ConfigError.

    `load_state(checkpoint_dir)` returns a checkpoint's state (one-line error if unreadable);
    `math_key_diff(saved_config_dict, config)` lists the keys whose change alters the training math."""
    save_dir = run_path(config.save_dir) if config.save_dir else run_path("logs")
    check_writable_dir("save_dir", save_dir)
    if not config.resume_from:
        name = config.run_name or time.strftime("%Y.%m.%d_%H.%M.%S")
        run_dir = os.path.join(save_dir, name)
        if holds_a_run(run_dir):
            if not config.run_name:  # two timestamped runs started in the same second
                run_dir = _unused_variant(run_dir)
            else:
                raise ConfigError(f"run folder {run_dir} already holds a run (metrics or checkpoints): resume it with "
                                  f"--config.resume_from={run_dir} or choose another --config.run_name")
        return RunPlan(run_dir)

    checkpoint = find_checkpoint(run_path(config.resume_from))
    state = load_state(checkpoint)
    saved_epoch = int(state["epoch"])
    if saved_epoch >= config.num_epochs:
        raise ConfigError(f"resume_from={config.resume_from!r}: the checkpoint is at epoch {saved_epoch} and "
                          f"num_epochs={config.num_epochs}: nothing left to train (raise --config.num_epochs)")
    if state.get("sampling_mode") != config.sample.sampling_mode:
        raise ConfigError(f"resume_from={config.resume_from!r}: written by the {state.get('trainer')} trainer "
                          f"(sampling_mode={state.get('sampling_mode')!r}); this config runs "
                          f"sampling_mode={config.sample.sampling_mode!r}")
    changed = math_key_diff(json.loads(state["config_json"]), config)
    if changed and not config.resume_ignore_config_changes:
        shown = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(changed.items())[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(f"resume_from={config.resume_from!r}: the checkpoint was trained with another config "
                          f"({shown}{more}); resume with the same config, or pass "
                          f"--config.resume_ignore_config_changes=True to continue anyway")
    source_run = os.path.dirname(os.path.dirname(checkpoint))
    in_run_layout = os.path.basename(os.path.dirname(checkpoint)) == CHECKPOINTS_DIR
    if in_run_layout and not config.run_name:
        newest = list_checkpoints(source_run)[-1][1]
        if os.path.realpath(newest) != os.path.realpath(checkpoint):
            raise ConfigError(f"resume_from={config.resume_from!r}: {source_run} has a newer checkpoint "
                              f"({os.path.basename(newest)}) that resuming here would overwrite; resume from it, or "
                              f"continue in a new folder with --config.run_name=<name>")
        return RunPlan(source_run, checkpoint, state)
    run_dir = os.path.join(save_dir, config.run_name or time.strftime("%Y.%m.%d_%H.%M.%S"))
    if in_run_layout and os.path.realpath(run_dir) == os.path.realpath(source_run):
        return plan_run(_without_run_name(config), load_state, math_key_diff)
    if holds_a_run(run_dir):
        raise ConfigError(f"run folder {run_dir} already holds a run: choose another --config.run_name, or drop it "
                          f"to continue in the checkpoint's own folder")
    return RunPlan(run_dir, checkpoint, state, fork_from=source_run if in_run_layout else None)


def _without_run_name(config):
    copy = config.copy_and_resolve_references()
    copy.run_name = ""
    return copy


def _unused_variant(run_dir: str) -> str:
    n = 2
    while holds_a_run(f"{run_dir}_{n}"):
        n += 1
    return f"{run_dir}_{n}"


def find_checkpoint(path: str) -> str:
    """A `checkpoint-<n>` folder, or the newest complete one in a run folder or its `checkpoints/`."""
    from .checkpoints import STATE_FILE

    if not os.path.exists(path):
        raise ConfigError(f"resume_from={path!r}: no such file or directory")
    if os.path.isfile(path):
        if os.path.basename(path) == STATE_FILE:
            return os.path.dirname(path)
        raise ConfigError(f"resume_from={path!r}: expected a checkpoint-<n> folder or a run folder, got a file")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    for run_dir in (path, os.path.dirname(path)):
        candidates = [p for _, p in list_checkpoints(run_dir) if os.path.isfile(os.path.join(p, STATE_FILE))]
        if candidates and (run_dir == path or os.path.basename(path) == CHECKPOINTS_DIR):
            return candidates[-1]
    raise ConfigError(f"resume_from={path!r}: no {STATE_FILE} there and no checkpoint-<n> folder holding one")


# ------------------------------------------------------------------------------------------------ run files

def create_run_dir(plan: RunPlan, metrics_lines: Optional[int]) -> None:
    """Make the folder (main process, after the models loaded); on a resume cut `metrics.jsonl` back to the
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


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_start_files(run_dir: str, config, world_size: int, device, resumed_from: Optional[str]) -> None:
    """`config.json` (resolved config) and `run.json` (what ran, where, with what; one entry per start)."""
    atomic_write(os.path.join(run_dir, "config.json"), json.dumps(strict(config.to_dict()), indent=2) + "\n")
    path = os.path.join(run_dir, "run.json")
    previous = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = {}
    start = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
             "world_size": world_size, "device": describe_device(device), "resumed_from": resumed_from}
    record = {"component": COMPONENT, "config_id": config.get("config_id", ""), "git_commit": git_commit(),
              "versions": library_versions(), "python": platform.python_version(), "host": platform.node(),
              "world_size": world_size, "device": start["device"],
              "starts": previous.get("starts", []) + [start]}
    atomic_write(path, json.dumps(record, indent=2) + "\n")


def git_commit() -> Optional[str]:
    """The commit of this checkout, with "-dirty" when tracked files changed; None outside git."""
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
    """`value` with every non-finite float replaced by None (strict JSON has no NaN/Infinity)."""
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
        names = set(os.listdir(plan.run_dir))
        if names <= {"config.json", "run.json", "wandb"}:
            shutil.rmtree(plan.run_dir, ignore_errors=True)
