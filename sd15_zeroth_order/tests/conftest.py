"""Fixtures shared by the component's tests: the SD1.5 scheduler of the tiny kit (the real SD1.5 scheduler
config: scaled_linear β 0.00085..0.012, leading spacing, steps_offset 1) and its 50 timesteps; the two-process
(one node, gloo) tiny runs of both paper commands, shared by test_train.py and test_multi_node.py."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMPONENT = Path(__file__).resolve().parents[1]
SCRIPTS = {"grpo": "train_grpo.py", "grpo_pr": "train_grpo_pr.py"}
if str(COMPONENT) not in sys.path:
    sys.path.insert(0, str(COMPONENT))


@pytest.fixture(scope="session")
def sd15_scheduler():
    from rsm_testkit import get_tiny_model

    from sd15zo.models import load_scheduler

    return load_scheduler(str(get_tiny_model("sd15")), "main")


@pytest.fixture(scope="session")
def timesteps_50(sd15_scheduler):
    from sd15zo.schedule import inference_timesteps

    return inference_timesteps(sd15_scheduler, 50)


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny tensors on a shared 2-core runner: intra-op threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env():
    """The environment of a trainer started by a test: one thread, wandb off, the component importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(COMPONENT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(trainer, *args, port, processes=2, nodes=1, node_rank=0):
    """The tiny paper command under torchrun: `processes` processes on this node, one node of `nodes` whose rank-0
    node listens on 127.0.0.1:`port` (the engine's own flags, as a user types them)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port", str(port),
            SCRIPTS[trainer], "--tiny", *args]


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory):
    """two_process_run(trainer, epochs=2) -> (run folder, console) of `torchrun --nproc_per_node 2
    train_<trainer>.py --tiny` (one node, gloo; 2 epochs is the tiny default), run once a session on first use."""
    root, done = tmp_path_factory.mktemp("two_processes"), {}

    def run(trainer, epochs=2):
        if (trainer, epochs) not in done:
            folder = root / f"{trainer}_{epochs}"
            out = subprocess.run(torchrun(trainer, "--output-dir", str(folder), "--set", "run_name=run",
                                          *(["--set", f"num_train_epochs={epochs}"] if epochs != 2 else []),
                                          port=free_port()),
                                 cwd=COMPONENT, env=subprocess_env(), text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, timeout=400)
            assert out.returncode == 0, out.stdout[-6000:]
            done[trainer, epochs] = (folder / "run", out.stdout)
        return done[trainer, epochs]

    return run
