"""Fixtures shared by the component's tests."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMPONENT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny tensors: on a shared 2-core runner intra-op threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PAPER = {"pruned": "config/simple_res-nabladb_sd_hps.yaml", "ours": "config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml"}


def free_port() -> int:
    """A loopback port nobody listens on now (tests on a shared machine must not collide on fixed ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    """The environment of a trainer started by a test: one thread, no wandb, no hub, no torchrun variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "GROUP_RANK")}
    return dict(env, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="session")
def two_processes_one_node(tmp_path_factory):
    """The tiny "ours" paper command (2 epochs) under torchrun with 2 gloo processes on one node: the run folder
    and the console. test_train checks what it trains; test_multi_node compares two nodes with it."""
    out = tmp_path_factory.mktemp("two_processes")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "simple_res-nabladb.py", "--config", PAPER["ours"], "--tiny", "--output-dir", str(out),
               "--run-name", "run"]
    done = subprocess.run(command, cwd=COMPONENT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out / "run", done.stdout + done.stderr


class RecordingLogger:
    """Stands in for MetricLogger: keeps the records."""

    def __init__(self):
        self.records, self.lines = [], 0

    def log(self, record, step, kind="step"):
        self.records.append({"kind": kind, "step": step, **record})
        self.lines += 1

    def log_images(self, *args, **kwargs):
        return None

    def finish(self):
        pass


def tiny_values(which="ours", overrides=(), tmp_path=None):
    """The paper config `which` on the tiny kit (as --tiny builds it), with `--set` overrides."""
    from sd15fo import config

    extra = [f"logging_dir={tmp_path}"] if tmp_path is not None else []
    return config.load(PAPER[which], list(overrides) + extra, tiny=True).values


def build_run(values, tmp_path, reward=None):
    """A trainer Run on the tiny kit without a run folder: models + LoRA (seeded), optimizer, scaler, reward,
    prompts and a recording logger. `reward` replaces the config's reward when given."""
    from sd15fo import distributed, trainer
    from sd15fo.models import add_lora, load_models
    from sd15fo.prompts import PromptSource
    from sd15fo.rewards import load as load_reward
    from sd15fo.sampling import encode_prompts
    from sd15fo.subsampling import num_train_timesteps

    procs = distributed.Processes()
    models = load_models(values, procs.device)
    torch.manual_seed(values["seed"])
    params = add_lora(models.unet, values["model"]["lora_rank"], values["model"]["lora_alpha"], False)
    optimizer = trainer.make_optimizer(values, params)
    with torch.no_grad():
        negative = encode_prompts(models.tokenizer, models.text_encoder, [""], procs.device)
    sample, train = values["sample"], values["train"]
    per_rank = sample["batch_size"] * sample["num_batches_per_epoch"]
    return trainer.Run(values, "test", procs, models, models.unet, params, optimizer,
                       trainer.make_scaler(values, procs.device),
                       reward or load_reward(values["reward_fn"], values["reward_fn_kwargs"], procs.device),
                       PromptSource(values["data_dir"]), negative, str(tmp_path), RecordingLogger(),
                       num_train_timesteps(sample["num_steps"], train["timestep_fraction"]),
                       per_rank // (train["batch_size"] * train["gradient_accumulation_steps"]))
