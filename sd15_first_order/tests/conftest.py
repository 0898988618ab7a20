"""Fixtures shared by the component's tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny tensors: on a shared 2-core runner intra-op threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
