"""Shared fixtures.

``one_thread``: tiny shapes run faster on one thread (threads only add overhead and contention on a
shared CPU); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.

Every test runs on the CPU, also on a machine with a GPU, unless it is marked ``cuda`` (the tests of
``test_cuda.py`` and the other CUDA checks): the figures, seeds and exact-resume checks of the rest
are CPU ones, and a GPU's nondeterministic kernels would fail them for no fault of the code.

The processes a test starts (the CLI, torchrun's workers) import bionets from this checkout, as the
test itself does, whatever copy of bionets is installed (or none).
"""
import io
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal_stderr(monkeypatch) -> io.StringIO:
    """sys.stderr as a terminal (where progress bars show), its text in ``.getvalue()``."""
    monkeypatch.setattr(sys, "stderr", _Terminal())
    return sys.stderr


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # device 'auto' resolves to the CPU
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")                    # and in the processes a test starts


@pytest.fixture(autouse=True)
def subprocesses_import_this_checkout(monkeypatch):
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", ROOT if not path else ROOT + os.pathsep + path)
