"""``bionets experiment NAME [key=value ...]``: the papers' analysis experiments.

An experiment module registers a function that takes keyword options (parsed from ``key=value``
strings with YAML typing) and an output directory, writes CSV and PNG files there and returns a
short summary (printed by the CLI)::

    @register_experiment("gaussian")
    def gaussian(out_dir: Path, *, n_max: int = 1000, seed: int = 0) -> str: ...

Unknown options are an error naming the valid ones (the CLI checks them against the signature);
values are validated against the annotations (``PositiveInt``, ``Fraction``, ...) before any work,
a bad one being one error line.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import ConfigDict, Field, ValidationError, validate_call

from bionets.configbase import takes_a_number
from bionets.errors import BionetsError, unknown

Fraction = Annotated[float, Field(gt=0, le=1)]      # a fraction of a training set
T = TypeVar("T")
NonEmpty = Annotated[list[T], Field(min_length=1)]  # NonEmpty[X]: a list option that needs a value

EXPERIMENTS: dict[str, Callable[..., str]] = {}


def register_experiment(name: str):
    def wrap(fn: Callable[..., str]):
        checked = validate_call(fn, config=ConfigDict(arbitrary_types_allowed=True, allow_inf_nan=False))

        @functools.wraps(fn)
        def run(out_dir: Path, **options):
            numbers = {k for k, t in typing.get_type_hints(fn).items() if takes_a_number(t)}
            for option, value in options.items():       # (pydantic reads seeds=true as 1)
                if isinstance(value, bool) and option in numbers:
                    raise BionetsError(f"experiment {name}: option {option}={value!r}: takes a number, not true or false")
            try:
                return checked(out_dir, **options)
            except ValidationError as err:
                if err.title != fn.__name__:       # raised inside the experiment: not about its options
                    raise
                first = err.errors()[0]
                option = ".".join(str(part) for part in first["loc"])
                raise BionetsError(f"experiment {name}: option {option}={first['input']!r}: "
                                   f"{first['msg'].removeprefix('Value error, ')}") from None

        EXPERIMENTS[name] = run
        return run
    return wrap


def experiment_names() -> list[str]:
    """Every experiment's name (its module imported, which registers it)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return sorted(EXPERIMENTS)


def get_experiment(name: str) -> Callable[..., str]:
    if name not in experiment_names():
        raise unknown("experiment", name, EXPERIMENTS, see=f"experiments: {', '.join(experiment_names())}")
    return EXPERIMENTS[name]


__all__ = ["EXPERIMENTS", "Fraction", "NonEmpty", "Path", "experiment_names", "get_experiment", "register_experiment"]
