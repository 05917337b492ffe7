"""One error type for everything a user can get wrong.

The CLI catches :class:`BionetsError`, prints its message on one line and exits with status 2.
Every message names what was wrong, the value received and what would be right.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class BionetsError(Exception):
    """A user-facing error: bad config, missing data, corrupt checkpoint, impossible shape."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean: a, b?)' hint listing the valid names nearest to ``name``; '' if none."""
    choices = list(choices)
    near = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not near:
        near = [c for c in choices if name.lower() in c.lower()][:n]
    return f" (did you mean: {', '.join(near)}?)" if near else ""


def unknown(kind: str, name: str, choices: Iterable[str], listed: Iterable[str] | None = None,
            see: str = "") -> BionetsError:
    """The error for an unknown ``kind`` called ``name``, naming the nearest valid choices, or else
    the first of ``listed`` (default: all choices), then ``see`` (where to find the full list)."""
    choices = sorted(choices)
    hint = closest(name, choices)
    if not hint:
        listed = sorted(listed) if listed is not None else choices
        shown = ", ".join(listed[:12]) + (", ..." if len(listed) > 12 else "")
        hint = f" (valid: {shown})"
    return BionetsError(f"unknown {kind} '{name}'{hint}" + (f"; {see}" if see else ""))
