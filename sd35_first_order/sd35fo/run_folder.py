"""Where a run lives and what it writes there (TRAINER_CONTRACT.md §3-§4), decided before any model loads.

    <saving.output_dir>/<reward>_vggflow_<exp_name>_seed<seed>/     (upstream's run name, e.g. hpscore_vggflow_OURS_seed0)
        config.json          the fully resolved config
        run.json             component, preset, command lines, git commit, versions, world size, device
        metrics.jsonl        strict JSON, one object a line: "kind": "step" per optimizer step, "epoch" per epoch
        images/epoch_<n>.jpg the last rollout batch of each epoch (256 px), captioned in wandb
        checkpoints/checkpoint-<n>/   after n trained epochs (see checkpoints.py)

A run never destroys another: a folder that already holds metrics or checkpoints is refused (resume it, or choose
another --exp_name). A resume continues in the checkpoint's own folder and cuts metrics.jsonl back to the records
written when that checkpoint was saved; resuming under another run name forks into that new folder, which starts
with the source's history up to the checkpoint.
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

from .config_check import COMPONENT_ROOT, ConfigError

COMPONENT = "sd35_first_order"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "peft", "shared_rewards", "ml_collections")


def run_name(config) -> str:
    """Upstream's name: `<reward_fn up to its first underscore>_vggflow_<exp_name>_seed<seed>`."""
    return f"{config.experiment.reward_fn.split('_')[0]}_vggflow_{config.exp_name}_seed{config.seed}"


@dataclass
class RunPlan:
    run_dir: str
    resume_dir: Optional[str] = None     # checkpoint-<n> folder
    resume_state: Optional[dict] = None  # its training state
    fork_from: Optional[str] = None      # source run folder when resuming into another folder


def output_root(config) -> str:
    return os.path.abspath(os.path.expanduser(config.saving.output_dir))


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
    """[(n, path)] of the `checkpoint-<n>` folders of a run, oldest first."""
    folder = os.path.join(run_dir, CHECKPOINTS_DIR)
    found = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            number = name[len("checkpoint-"):]
            if name.startswith("checkpoint-") and number.isdigit() and os.path.isdir(os.path.join(folder, name)):
                found.append((int(number), os.path.join(folder, name)))
    return sorted(found)


def find_checkpoint(path: str) -> str:
    """A `checkpoint-<n>` folder, or the newest complete one of a run folder (or of its checkpoints/)."""
    from .checkpoints import STATE_FILE

    if not os.path.exists(path):
        raise ConfigError(f"--resume={path!r}: no such file or directory")
    if os.path.isfile(path):
        if os.path.basename(path) == STATE_FILE:
            return os.path.dirname(path)
        raise ConfigError(f"--resume={path!r}: expected a checkpoint-<n> folder or a run folder, got a file")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    for run_dir in (path, os.path.dirname(path)):
        candidates = [p for _, p in list_checkpoints(run_dir) if os.path.isfile(os.path.join(p, STATE_FILE))]
        if candidates and (run_dir == path or os.path.basename(path) == CHECKPOINTS_DIR):
            return candidates[-1]
    raise ConfigError(f"--resume={path!r}: no {STATE_FILE} there and no checkpoint-<n> folder holding one")


def plan_run(config, load_state, math_key_diff, name_given: bool = False) -> RunPlan:
    """The run folder (and the checkpoint to resume), before any model loads; each refusal is one ConfigError.
    `name_given`: --exp_name was on the command line (a resume then continues under that name, a fork when it
    differs from the checkpoint's run; without it a resume continues in the checkpoint's own folder)."""
    root = output_root(config)
    check_writable_dir("saving.output_dir", root)
    name = config.run_name
    if not config.saving.resume_from:
        run_dir = os.path.join(root, name)
        if holds_a_run(run_dir):
            raise ConfigError(f"run folder {run_dir} already holds a run (metrics or checkpoints): resume it with "
                              f"--resume={run_dir}, or choose another --exp_name (or --output_dir)")
        return RunPlan(run_dir)
    checkpoint = find_checkpoint(os.path.abspath(os.path.expanduser(config.saving.resume_from)))
    state = load_state(checkpoint)
    if int(state["epoch"]) >= config.training.num_epochs:
        raise ConfigError(f"--resume={config.saving.resume_from!r}: the checkpoint is at epoch {state['epoch']} and "
                          f"training.num_epochs={config.training.num_epochs}: nothing left to train (raise "
                          "--config.training.num_epochs)")
    changed = math_key_diff(json.loads(state["config_json"]), config)
    if changed and not config.saving.resume_ignore_config_changes:
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changed.items())[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(f"--resume={config.saving.resume_from!r}: the checkpoint was trained with another config "
                          f"({shown}{more}); resume with the same config and flags, or pass "
                          "--config.saving.resume_ignore_config_changes=True to continue anyway")
    source = os.path.dirname(os.path.dirname(checkpoint))
    in_run = os.path.basename(os.path.dirname(checkpoint)) == CHECKPOINTS_DIR
    run_dir = os.path.join(root, name)
    if in_run and (os.path.realpath(run_dir) == os.path.realpath(source) or not name_given):
        newest = list_checkpoints(source)[-1][1]
        if os.path.realpath(newest) != os.path.realpath(checkpoint):
            raise ConfigError(f"--resume={config.saving.resume_from!r}: {source} has a newer checkpoint "
                              f"({os.path.basename(newest)}) that resuming here would overwrite; resume from it, or "
                              "continue in a new folder with another --exp_name")
        return RunPlan(source, checkpoint, state)
    if holds_a_run(run_dir):
        raise ConfigError(f"run folder {run_dir} already holds a run: choose another --exp_name, or leave --exp_name out "
                          "to continue in the checkpoint's own folder")
    return RunPlan(run_dir, checkpoint, state, fork_from=source if in_run else None)


def create_run_dir(plan: RunPlan, metrics_lines: Optional[int]) -> None:
    """Make the folder (main process, after the models loaded); on a resume cut metrics.jsonl back to the
    `metrics_lines` records the checkpoint saw (a fork copies them from its source)."""
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


def write_start_files(run_dir: str, config, world_size: int, device, resumed_from: Optional[str],
                      hosts: Optional[list] = None) -> None:
    """config.json, and run.json with one entry per start (`hosts`: every process's host, in rank order)."""
    atomic_write(os.path.join(run_dir, "config.json"), json.dumps(strict(config.to_dict()), indent=2) + "\n")
    path = os.path.join(run_dir, "run.json")
    previous = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = {}
    hosts = hosts or [platform.node()]
    start = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv), "world_size": world_size,
             "nodes": len(set(hosts)), "hosts": sorted(set(hosts)), "device": describe_device(device),
             "resumed_from": resumed_from}
    record = {"component": COMPONENT, "preset": config.get("preset", ""), "tiny": bool(config.get("tiny", False)),
              "git_commit": git_commit(), "versions": library_versions(), "python": platform.python_version(),
              "host": platform.node(), "world_size": world_size, "device": start["device"],
              "starts": previous.get("starts", []) + [start]}
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
    """`value` with non-finite floats as None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def remove_if_empty_start(plan: RunPlan) -> None:
    """A start that failed before its first epoch record leaves no folder behind."""
    if plan.resume_dir is None and os.path.isdir(plan.run_dir) and not holds_a_run(plan.run_dir):
        if set(os.listdir(plan.run_dir)) <= {"config.json", "run.json", "wandb", "images"}:
            shutil.rmtree(plan.run_dir, ignore_errors=True)
