"""Putting a new module where a model holds an old one: at every place it is held.

A module instance can be a child of several parents (one ``nn.ReLU`` shared by two blocks, a
convolution reused in two branches); ``named_modules()`` names it once, so replacing it by that name
alone would leave the other places running the old module.
"""
from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Make every child slot of ``model`` that holds ``old`` hold ``new`` (the new module shared as the
    old one was); return the names of those slots, the first one ``named_modules()`` gives first."""
    parents = list(model.named_modules(remove_duplicate=False))    # before any change: ``new`` may hold ``old``
    names = []
    for prefix, parent in parents:
        for leaf, child in list(parent._modules.items()):     # (named_children() skips a second slot of one parent)
            if child is old:
                setattr(parent, leaf, new)
                names.append(f"{prefix}.{leaf}" if prefix else leaf)
    return names
