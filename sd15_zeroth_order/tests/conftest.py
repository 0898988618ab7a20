"""Fixtures shared by the component's tests: the SD1.5 scheduler of the tiny kit (the real SD1.5 scheduler
config: scaled_linear β 0.00085..0.012, leading spacing, steps_offset 1) and its 50 timesteps."""
import os
import sys
from pathlib import Path

import pytest
import torch

COMPONENT = Path(__file__).resolve().parents[1]
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
