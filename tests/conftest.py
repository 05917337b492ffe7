"""Shared fixtures.

``one_thread``: tiny shapes run faster on one thread (threads only add overhead and contention on a
shared CPU); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.

Every test runs on the CPU, also on a machine with a GPU, unless it is marked ``cuda`` (the tests of
``test_cuda.py`` and the other CUDA checks): the figures, seeds and exact-resume checks of the rest
are CPU ones, and a GPU's nondeterministic kernels would fail them for no fault of the code.

The processes a test starts (the CLI, torchrun's workers) import bionets from this checkout, as the
test itself does, whatever copy of bionets is installed (or none).

bionets' C++ kernels (four CPU builds, two emulated CUDA builds: ~3 min of compiling on 2 cores,
once per machine) start building in two background processes as the suite starts, so that they
compile while the first tests run; a test that needs one before it is done waits on torch's build
lock, as a second process of a real run would.
"""
import io
import os
import subprocess
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
    """sys.stderr as a terminal (where progress bars show), its text in ``.getvalue()``. Take it in
    the test's body (``request.getfixturevalue``): pytest's capture, resumed for the test's call,
    sets sys.stderr over a fixture argument's."""
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


# the builds in the order the suite first needs them, split over two processes
PREBUILDS = (["arr_cpu", "quadratic_cpu", "emulated:arr_cuda"], ["raa_cpu", "map_norm_cpu", "emulated:raa_cuda"])
_PREBUILD = """import sys, warnings
warnings.simplefilter("ignore")
from bionets.layers import cpu_kernels
import cuda_emulated
for name in sys.argv[1:]:
    try:
        cuda_emulated.ops(name.split(":")[1]) if name.startswith("emulated:") else cpu_kernels.ops(name)
    except Exception:       # the test that needs it builds it again and reports why
        pass
"""
_builders: list[subprocess.Popen] = []


def _built(name: str) -> bool:
    """Whether the build ``name`` (as PREBUILDS names it) is in torch's extension cache already."""
    from bionets.layers import cpu_kernels
    from cuda_emulated import extension
    ext = extension(name.split(":")[1])[0] if name.startswith("emulated:") else cpu_kernels.extension_name(name)[0]
    return cpu_kernels.is_built(ext)


def pytest_sessionstart(session):
    from bionets.layers import cpu_kernels
    if not cpu_kernels.enabled() or session.config.getoption("collectonly"):
        return
    missing = [[n for n in names if not _built(n)] for names in PREBUILDS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    for names in filter(None, missing):
        _builders.append(subprocess.Popen([sys.executable, "-c", _PREBUILD, *names], cwd=Path(__file__).parent, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          preexec_fn=lambda: os.nice(10)))


def pytest_sessionfinish(session):
    for builder in _builders:       # (one stopped mid-build can leave a lock that torch's builder then waits on)
        builder.wait()
