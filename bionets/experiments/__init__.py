"""``bionets experiment NAME [key=value ...]``: the papers' analysis experiments.

An experiment module registers a function that takes keyword options (parsed from ``key=value``
strings with YAML typing) and an output directory, writes CSV and PNG files there and returns a
short summary (printed by the CLI)::

    @register_experiment("gaussian")
    def gaussian(out_dir: Path, *, n_max: int = 1000, seed: int = 0) -> str: ...

Unknown options are an error naming the valid ones (the CLI checks them against the signature).
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path

from bionets.errors import unknown

EXPERIMENTS: dict[str, Callable[..., str]] = {}


def register_experiment(name: str):
    def wrap(fn: Callable[..., str]):
        EXPERIMENTS[name] = fn
        return fn
    return wrap


def get_experiment(name: str) -> Callable[..., str]:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    if name not in EXPERIMENTS:
        raise unknown("experiment", name, EXPERIMENTS)
    return EXPERIMENTS[name]


__all__ = ["EXPERIMENTS", "Path", "get_experiment", "register_experiment"]
