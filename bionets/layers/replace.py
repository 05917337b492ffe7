"""Putting a new module where a model holds an old one: at every place it is held.

A module instance can be a child of several parents (one ``nn.ReLU`` shared by two blocks, a
convolution reused in two branches); ``named_modules()`` names it once, so replacing it by that name
alone would leave the other places running the old module.

The forward and backward hooks a user registered on the old module move to the new one, so that a
hook keeps observing the same place of the model (a feature extractor's, a Grad-CAM's), and its
handle still removes it. Where the old module carries a hook of PyTorch's own that works on that
module's attributes (``torch.nn.utils.prune``, the old ``weight_norm`` and ``spectral_norm``,
quantization observers), its hooks stay with it.
"""
from __future__ import annotations

from torch import nn

# a module's hook tables (dicts a RemovableHandle refers to, so moved whole) and the flag for its backward hooks
HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


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
    if names:
        _move_hooks(old, new)
    return names


def _torch_own(hook) -> bool:
    """Whether ``hook`` is PyTorch's (a pruning method, a weight norm, an observer hook), which reads
    the attributes of the module it was registered on."""
    owner = getattr(hook, "__self__", hook)             # (a bound method: its object)
    return (getattr(owner, "__module__", None) or type(owner).__module__).startswith("torch.")


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the hooks of ``old`` (``new`` has none of its own, being just made) and leave ``old``
    (which ``new`` may wrap) without them: the tables themselves move, which the hooks' handles refer
    to, so all or none of them do: none where one of them is PyTorch's own (:func:`_torch_own`)."""
    tables = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")    # (the others: flags)
    hooks = [h for t in tables for h in getattr(old, t).values()]
    if hooks and not any(map(_torch_own, hooks)) and not any(getattr(new, t) for t in HOOK_TABLES):
        for table in HOOK_TABLES:
            moved = getattr(old, table)
            setattr(old, table, type(moved)())
            setattr(new, table, moved)
        new._is_full_backward_hook = old._is_full_backward_hook
        old._is_full_backward_hook = None
