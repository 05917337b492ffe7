"""Checkpoints: written atomically (temp file, then rename), read with one-line errors.

A checkpoint is a dict with ``format``, the resolved ``config``, ``model`` and the optimizer,
scheduler, grad-scaler, EMA and RNG states, ``epoch`` (completed), ``step`` and ``history``.
"""
from __future__ import annotations

import codecs
import errno
import math
import os
import pickle
import random
import signal
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from bionets.errors import BionetsError, one_line

FORMAT = "bionets-checkpoint/1"


_deferring = False        # whether a ctrl_c_deferred block runs (an inner one leaves its signals to it)
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)     # Ctrl-C, and a scheduler's stop (SLURM, Kubernetes, kill)


@contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) or SIGTERM that arrives inside the block and act on it when the block
    is done. Raised inside ``torch.save``, a KeyboardInterrupt makes its zip writer fail while
    closing, and the run ended on that RuntimeError's traceback; raised inside TensorBoard's writer,
    between its queue's put and the wake-up of the thread that drains it, it can stall the writer's
    close for up to its flush interval (two minutes); a SIGTERM that ends the process mid-write left
    a partial temporary file. A block inside another holds its signals for the outer one. A signal
    held acts as its handler before the block would have (Python's SIGINT handler raises
    KeyboardInterrupt; the CLI's SIGTERM handler :class:`~bionets.errors.Terminated`; the default
    SIGTERM action ends the process, now with the file whole); with both held, SIGTERM acts (the
    scheduler's stop is the one that cannot be waited out). A signal that arrives while the handlers
    are put or put back is not lost and leaves none of them half changed (:func:`restore_handlers`);
    one held while the block raised acts all the same (the block's error is its context). Python runs
    signal handlers in the main thread only, and a signal the process ignores (Ctrl-C when started
    in the background, or under nohup) stays ignored: in another thread, and for such a signal, this
    holds nothing."""
    global _deferring
    if threading.current_thread() is not threading.main_thread() or _deferring:
        yield
        return
    _deferring, held, previous = True, [], {}
    try:
        for signum in HELD_SIGNALS:        # (inside the try: a signal that raises here restores the rest)
            if signal.getsignal(signum) not in (signal.SIG_IGN, None):
                previous[signum] = signal.signal(signum, lambda number, frame: held.append(number))
        yield
    finally:
        _deferring = False
        late = restore_handlers(previous)
        if held:                            # also when the block raised: the stop still acts
            signum = signal.SIGTERM if signal.SIGTERM in held else held[0]
            if callable(previous[signum]):
                previous[signum](signum, None)
            else:                           # SIG_DFL: the process ends as the signal would have ended it
                os.kill(os.getpid(), signum)
        if late is not None:
            raise late


def restore_handlers(previous: dict) -> KeyboardInterrupt | None:
    """Put the ``previous`` signal handlers back, every one. ``signal.signal`` first runs the handlers
    of signals that have arrived: a Ctrl-C just after SIGINT's own handler is back raises there,
    before SIGTERM's is, which left the deferral's handler on SIGTERM for good (every later SIGTERM
    swallowed). Such a KeyboardInterrupt (or Terminated) is kept and returned, and that handler set
    again (the check runs before the change, so it had not been)."""
    late = None
    for signum, handler in previous.items():
        while True:
            try:
                signal.signal(signum, handler)
                break
            except KeyboardInterrupt as err:    # a restored handler's, for a signal that came meanwhile
                late = late or err
    return late


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


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def _is_text(path: Path) -> bool:
    """Whether the file starts as text does (UTF-8, no NUL byte): a YAML config or a log passed as a
    checkpoint, which torch.load reports as a pickling error."""
    with path.open("rb") as f:
        head = f.read(512)
    if not head or head.startswith(b"PK\x03\x04") or b"\0" in head:     # (a zip's header: torch.save's format)
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)     # (a character cut at byte 512 is no error)
    except UnicodeDecodeError:
        return False
    return True


def load_checkpoint(path: str | Path, *, exported: bool = False) -> dict:
    """Read a checkpoint on the CPU; a missing, truncated or foreign file is one BionetsError, and so
    is the plain state dict of ``bionets export`` unless ``exported``."""
    if not isinstance(path, str | os.PathLike):
        raise BionetsError(f"load_checkpoint takes the path of a .pt file (a str or Path), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        what = {"best.pt": "its best epoch", "last.pt": "its latest, which --resume continues"}
        found = [f"{path / n} ({w})" for n, w in what.items() if (path / n).is_file()]
        hint = f": pass {' or '.join(found)}" if found else ", and it holds no best.pt or last.pt"
        raise BionetsError(f"checkpoint '{path}' is a directory{hint} (a .pt file written by 'bionets train')")
    if not path.is_file():
        raise BionetsError(f"checkpoint '{path}' does not exist: pass the path of a .pt file written by 'bionets train'")
    try:
        _check_crc(path)
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        if _is_text(path):
            raise BionetsError(f"'{path}' is a text file, not a checkpoint (a config?): give a .pt file that "
                               "'bionets train' wrote (runs/NAME/best.pt or last.pt)") from None
        raise BionetsError(f"checkpoint '{path}' is corrupt or truncated ({type(err).__name__}): "
                           "use another checkpoint (e.g. best.pt or last.pt of the run)") from None
    except (AttributeError, ImportError) as err:    # a pickled object whose class this process cannot find
        raise BionetsError(f"'{path}' is not a bionets checkpoint (it pickles objects of another program: "
                           f"{err}): give a file that 'bionets train' (best.pt, last.pt) or 'bionets export' wrote") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BionetsError(f"'{path}' is not a bionets checkpoint (no '{FORMAT}' marker): give a file that "
                           "'bionets train' (best.pt, last.pt) or 'bionets export' wrote")
    weights = "plain_model" if "model" not in state and "plain_model" in state else "model"
    if weights == "plain_model" and not exported:
        raise BionetsError(f"'{path}' holds exported plain weights ('bionets export'), not a training run: eval or resume "
                           "the run's best.pt or last.pt, or load its 'plain_model' state dict into a plain model")
    require_entries(state, path, ("config", weights))
    return state


def _check_crc(path: Path) -> None:
    """A zip checkpoint (what torch.save writes) whose bytes changed on disk raises BadZipFile: torch.load
    does not check the CRC-32 that torch.save stores with each tensor, so flipped bytes inside a tensor
    loaded silently. Reading the file once more costs ~1 s a GB."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if (bad := archive.testzip()) is not None:
                raise zipfile.BadZipFile(f"bad CRC-32 for {bad}")


_ENTRY_TYPES = {"config": dict, "model": dict, "plain_model": dict, "optimizer": dict, "scheduler": dict,
                "scaler": dict, "rng": dict, "epoch": int, "step": int, "best_top1": (int, float), "history": list,
                "ema": dict, "data_info": dict}


def _odd_contents(key: str, value) -> str | None:
    """What is wrong inside a checkpoint entry of the right type, or None: a state dict needs names
    and tensors (a module's ``_extra_state`` aside), a history records of numbers (a string there
    failed only after the resumed run had trained, at its summary), the data's shape two counts."""
    if key in ("model", "plain_model", "ema"):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"holds the key {k!r} in its '{key}' state dict, whose keys are parameter names"
            if not isinstance(v, torch.Tensor) and not k.endswith("_extra_state"):
                return f"holds a {type(v).__name__} at '{k}' in its '{key}' state dict, whose values are tensors"
    if key == "history":
        if not all(isinstance(r, dict) for r in value):
            return f"holds a list of non-records as its '{key}' entry"
        odd = next((f"{k}={v!r}" for r in value for k, v in r.items()
                    if isinstance(v, bool) or not isinstance(v, (int, float))), None)
        if odd is not None:
            return f"holds {odd} in its '{key}' entry, whose epoch records hold numbers"
    if key == "best_top1" and not math.isfinite(value):         # (no epoch would beat it: no best.pt)
        return f"holds best_top1={value}"
    if key == "data_info":
        odd = next((f"{k}={value.get(k)!r}" for k in ("num_classes", "in_chans")
                    if isinstance(value.get(k), bool) or not isinstance(value.get(k), int) or value[k] < 1), None)
        if odd is None and "classes" in value and not (isinstance(value["classes"], list)
                                                      and all(isinstance(c, str) for c in value["classes"])):
            odd = f"classes={value['classes']!r}"
        if odd is not None:
            return f"holds {odd} in its '{key}' entry, which gives the data's class and channel counts"
    return None


def require_entries(state: dict, path: str | Path, keys: tuple[str, ...]) -> None:
    """One error line where a checkpoint lacks one of ``keys``, holds it as the wrong kind of value,
    or holds the wrong things inside it (:func:`_odd_contents`): a file with the marker but not all of
    a run's state (another program's, or edited)."""
    for key in keys:
        value = state.get(key)
        if not isinstance(value, _ENTRY_TYPES[key]):
            what = "lacks" if key not in state else f"holds a {type(value).__name__} as"
            what = f"{what} its '{key}' entry"
        else:
            what = _odd_contents(key, value)
        if what:
            raise BionetsError(f"checkpoint '{path}' {what} (not as 'bionets train' writes it): "
                               "use another checkpoint (e.g. best.pt or last.pt of the run)")


def saved_model_name(state: dict) -> str | None:
    """The model name in a checkpoint's saved config, or None where it holds none."""
    config = state.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    name = model.get("name") if isinstance(model, dict) else None
    return name if isinstance(name, str) else None


def load_model_state(model: nn.Module, state: dict, source: str | Path) -> None:
    """Load weights, turning a key or shape mismatch into one line that names both models."""
    saved = saved_model_name(state) or "?"
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).split("\n")[1].strip() if "\n" in str(err) else str(err)
        raise BionetsError(f"checkpoint '{source}' holds a different model (saved from '{saved}'; {first[:160]}): "
                           "use the config it was trained with") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
