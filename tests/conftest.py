"""Shared fixtures. ``one_thread``: tiny shapes run faster on one thread (threads only add overhead
and contention on a shared CPU); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
