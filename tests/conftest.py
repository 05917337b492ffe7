"""Shared fixtures.

``one_thread``: tiny shapes run faster on one thread (threads only add overhead and contention on a
shared CPU); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.

Every test runs on the CPU, also on a machine with a GPU, unless it is marked ``cuda`` (the tests of
``test_cuda.py`` and the other CUDA checks): the figures, seeds and exact-resume checks of the rest
are CPU ones, and a GPU's nondeterministic kernels would fail them for no fault of the code.
"""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # device 'auto' resolves to the CPU
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")                    # and in the processes a test starts
