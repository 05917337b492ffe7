"""Checkpoints: written atomically (temp file, then rename), read with one-line errors.

A checkpoint is a dict with ``format``, the resolved ``config``, ``model`` and the optimizer,
scheduler, grad-scaler, EMA and RNG states, ``epoch`` (completed), ``step`` and ``history``.
"""
from __future__ import annotations

import codecs
import math
import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bionets.engine.files import write_atomic
from bionets.errors import BionetsError

FORMAT = "bionets-checkpoint/1"


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
