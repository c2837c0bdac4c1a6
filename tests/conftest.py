"""Shared test set-up."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per test: deterministic kernels and no oversubscription on small CI machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
