"""One error type for everything a user can get wrong.

The CLI catches :class:`BionetsError`, prints its message on one line and exits with status 2.
Every message names what was wrong, the value received and what would be right.
"""
from __future__ import annotations

import difflib
import numbers
import operator
import sys
from collections.abc import Iterable


class BionetsError(Exception):
    """A user-facing error: bad config, missing data, corrupt checkpoint, impossible shape."""


class Terminated(KeyboardInterrupt):
    """A SIGTERM (a scheduler's stop: SLURM, Kubernetes, ``kill``), raised where the command line
    runs as a Ctrl-C is, so that a run stops as it does on Ctrl-C: checkpoints whole, a run
    directory without a checkpoint removed, one line naming what is kept."""


def one_line(err: BaseException, limit: int = 200) -> str:
    """Another library's error in one line, for a message of ours: ``'TypeName: first line'`` (at
    most ``limit`` characters of it, cut at a space and marked '...', so that no number is cut; the
    type alone for an empty message)."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    first = lines[0] if len(lines[0]) <= limit else lines[0][:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(err).__name__}: {first}"


def closest(name: str, choices: Iterable[str], n: int = 3, first: Iterable[str] = ()) -> str:
    """A ' (did you mean: a, b?)' hint listing the valid names nearest to ``name``; '' if none.

    Names among ``first`` that contain ``name`` come before the rest (``resnet20``: bionets'
    ``resnet20_cifar`` before timm's ``resnet200``).
    """
    choices = list(choices)
    near = [c for c in sorted(first) if name.lower() in c.lower()]
    near += [c for c in difflib.get_close_matches(name, choices, n=n, cutoff=0.4) if c not in near]
    near = near or [c for c in choices if name.lower() in c.lower()]
    return f" (did you mean: {', '.join(near[:n])}?)" if near else ""


def unknown(kind: str, name: str, choices: Iterable[str], listed: Iterable[str] | None = None,
            see: str = "") -> BionetsError:
    """The error for an unknown ``kind`` called ``name``, naming the nearest valid choices (those
    among ``listed`` first), or else the first of ``listed`` (default: all choices), then ``see``
    (where to find the full list; left out where every choice is listed already)."""
    choices = sorted(choices)
    listed = sorted(listed) if listed is not None else choices
    hint = closest(name, choices, first=listed)
    if not hint:
        shown = ", ".join(listed[:12]) + (", ..." if len(listed) > 12 else "")
        hint = f" (valid: {shown})"
        see = "" if listed == choices and len(listed) <= 12 else see
    return BionetsError(f"unknown {kind} '{name}'{hint}" + (f"; {see}" if see else ""))


def whole(value) -> int | None:
    """``value`` as an int where it is a whole number (an int, NumPy's), else None: not a bool (True
    is 1 to Python), nor a tensor (whose value a check would read back from its device)."""
    torch = sys.modules.get("torch")       # (not imported here: the command line starts without it)
    if isinstance(value, bool) or torch is not None and isinstance(value, torch.Tensor):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def is_real(value) -> bool:
    """Whether ``value`` is a real number (int, float, NumPy's): not a bool, nor a tensor (which is
    no ``numbers.Real``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def require_bools(owner: str, **flags) -> None:
    """One error naming every one of ``flags`` that is not True or False (a string such as 'no' or
    'false' is truthy, and switched its option on silently)."""
    bad = [f"{name}={value!r}" for name, value in flags.items() if not isinstance(value, bool)]
    if bad:
        raise BionetsError(f"{owner} takes True or False for {', '.join(bad)}")


def require_sizes(owner: str, **sizes) -> None:
    """One error naming every one of ``sizes`` (a layer's widths, counts, kernel sizes) that is not a
    positive integer; ``owner`` names the layer. (Left to torch, 2.5 channels or -3 features failed
    deep inside a tensor constructor, and 0 features built a layer that failed at its first call.)"""
    bad = [f"{name}={value!r}" for name, value in sizes.items() if (n := whole(value)) is None or n < 1]
    if bad:
        raise BionetsError(f"{owner} needs positive whole numbers, got {', '.join(bad)}")


def name_list(value, what: str) -> list[str]:
    """``value`` (names or glob patterns) as a list; a bare string is an error, since it would be read
    a character at a time (``include="layer1*"`` matched every layer through its ``*``)."""
    if isinstance(value, str):
        raise BionetsError(f"{what} takes a list of names or glob patterns, got the string {value!r}: write "
                           f"[{value!r}]")
    return list(value)


def require_module(model, who: str) -> None:
    """One error where ``who`` is handed something other than a torch module."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise BionetsError(f"{who} takes a torch.nn.Module, got {type(model).__name__}")
