"""Shared fixtures: the component root and tests/ on sys.path (the package and the toy models)."""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny tensors: on a shared 2-core runner intra-op threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


COMPONENT = os.path.dirname(HERE)
OURS = ["--config=config/hpsv2_geneval_ours.py", "--exp_name=OURS"]


def clean_env(**extra):
    """The environment of a trainer subprocess: one thread, no wandb, no torchrun variables of an outer launcher."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", **extra)
    env.pop("WANDB_API_KEY", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="session")
def two_processes_on_one_node(tmp_path_factory):
    """Ours' tiny paper command under `torchrun --nproc_per_node 2` (gloo, 2 epochs): its run folder. Shared by the
    one-node test (test_train.py) and the two-node test (test_multi_node.py), so the suite runs it once."""
    import subprocess

    out = tmp_path_factory.mktemp("two_processes")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29763",
               "train_vggflow.py", *OURS, "--tiny", f"--output_dir={out}"]
    done = subprocess.run(command, cwd=COMPONENT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    return out / "hpscore_vggflow_OURS_seed0"
