"""A run's directory (``out_dir/name``): the files a run writes there, the directory claimed for
one run only (a rerun under a taken name gets ``name-2``, ...), and removed again when the run fails
before its first checkpoint, so that a rerun after the fix takes its name."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from bionets.engine.files import write_atomic

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "last.pt", "best.pt", "tb")


def unused_name(out_dir: str, name: str, config_text: Callable[[str], str]) -> str:
    """``name`` where its run directory (out_dir/name) holds no run's files yet, else the first of
    ``name-2``, ``name-3``, ... whose directory holds none: a new run neither overwrites an earlier
    one nor mixes its files with it. The directory is claimed as it is chosen (:func:`claim`), its
    config.yaml holding ``config_text(chosen name)``."""
    candidate, stem, k = name, name.rstrip("/\\"), 2
    while not claim(Path(out_dir) / candidate, config_text(candidate)):
        candidate, k = f"{stem}-{k}", k + 1
    return candidate


def claim(run_dir: Path, config: str) -> bool:
    """Whether ``run_dir`` held no run's files and is now this run's: its ``config.yaml`` created
    only if no file of that name exists, in one step, so that two runs started at the same moment
    never pick the same directory, and written at once with the run's ``config`` (one write
    call, so a run that dies next leaves its config, not an empty file another run would read as
    the default config). True also where the directory cannot be made: the caller's
    :func:`make_output_dir` then says why."""
    if any((run_dir / f).exists() for f in RUN_FILES):
        return False
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / "config.yaml", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return not (run_dir / "config.yaml").exists()       # taken a moment ago by another run, or not a directory
    except OSError:
        return True
    with os.fdopen(fd, "wb") as f:
        f.write(config.encode())
    return True


def remove_temporary_files(run_dir: Path) -> None:
    """Remove the temporary files (``.last.pt.*.tmp``, ...) that a write of a run's file leaves where
    its process is killed in the middle (SIGKILL, a lost machine): nothing else cleans them up."""
    for name in RUN_FILES:
        for tmp in run_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def remove_run_files(run_dir: Path) -> None:
    """Remove a run's files from ``run_dir``, and the directory if nothing else is left in it."""
    remove_temporary_files(run_dir)
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    with suppress(OSError):
        run_dir.rmdir()


def write_text(path, text: str) -> None:
    """Atomic small-file write (temp file + rename) so a crash never leaves half a file."""
    write_atomic(path, lambda f: f.write(text.encode()))


def copy_file(source: Path, path: Path) -> None:
    """Atomic copy of a file (temp file + rename), streamed, not read into memory at once."""
    with source.open("rb") as src:
        write_atomic(path, lambda f: shutil.copyfileobj(src, f))
