"""Output folders and files of runs and experiments: folders made with one-line errors (and removed
again where the job fails), files written atomically (a temporary file, then a rename)."""
from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from bionets.engine.signals import ctrl_c_deferred
from bionets.errors import BionetsError, one_line


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()     # a new file's usual permissions (a temporary file starts at 0600)


def make_output_dir(path: Path, option: str = "another path") -> Path:
    """``path`` made (with its parents) to write into; one error line where it cannot be, naming
    what is in the way and ``option``, the setting that chooses the path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        file = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        why = f"'{file}' is a file" if file is not None else err.strerror
        raise BionetsError(f"cannot make the output directory '{path}' ({why}): choose {option}") from None
    return path


@contextmanager
def output_dir(path: Path, option: str = "another path") -> Iterator[Path]:
    """:func:`make_output_dir` for a job that may fail: the directories it made (``path`` and any
    parent that did not exist) are removed again if the job raises and leaves them empty, so that
    a rejected option leaves nothing behind."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not p.exists()]
    make_output_dir(path, option)
    try:
        yield path
    except BaseException:
        for p in made:                  # the deepest first
            with suppress(OSError):
                p.rmdir()               # (only while empty)
        raise


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``: a reader sees
    the old file or the new one, never half, and a failed write leaves no temporary file. A Ctrl-C
    during the write takes effect once the new file is in place. The file gets the permissions of
    any new file (the umask's), not the temporary file's owner-only ones."""
    path = Path(path)
    if path.is_dir():
        raise BionetsError(f"cannot write '{path}': it is a directory; give a file path (inside it, say)")
    make_output_dir(path.parent)
    with ctrl_c_deferred():
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as err:
            raise BionetsError(f"cannot write '{path}' ({err.strerror or type(err).__name__}): give a path in a "
                               "folder you can write to") from None
        try:
            if hasattr(os, "fchmod"):                # (POSIX)
                os.fchmod(fd, _FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if (cause := _os_error_in(err)) is None:
                raise
            kept = f"; the earlier {path.name} there is unchanged" if path.is_file() else ""
            full = "free space there or " if cause.errno in _FULL else ""
            raise BionetsError(f"cannot write '{path}' ({cause.strerror or one_line(cause)}): {full}write elsewhere "
                               f"(another out_dir or path){kept}") from None


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}     # a full disk, or the user's quota


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (itself, or what it was raised from or during: torch.save reports a
    full disk as a RuntimeError raised while handling the OSError), or None. A context its raiser
    suppressed (``raise ... from None``) is not followed: that error was judged beside the point."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None
