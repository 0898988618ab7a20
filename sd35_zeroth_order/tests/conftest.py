"""Fixtures shared by the component's tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_cpu_thread():
    """For tests on tiny tensors: on a shared 2-core runner, intra-op threads cost far more than they save
    (the tiny-SD3 sampler test takes ~0.4 s with one thread and 5-20 s with two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
