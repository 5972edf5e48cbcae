"""Reversible in-place swaps, shared by every adapter's patch / unpatch.

A submodule is replaced by another that remembers the original (in a list, so it is not registered as a
submodule and adds nothing to ``parameters()`` or ``state_dict()``); an instance's methods are overridden by
instance attributes, and deleting those brings the class's methods back.

An override is ``functools.partial(function, module)``, not a bound method: a bound method pickles as
``getattr(module, name)``, which the half-built module cannot answer when it is unpickled, while a partial pickles
its function and module (``torch.save(model)`` / ``pickle`` of a patched model round-trips); ``inspect.signature``
reads both the same way (transformers' Trainer filters dataset columns by it).
"""
from __future__ import annotations

import functools
from typing import Callable

from torch import nn

_ORIGINAL = "_electra_fast_original"
# A replacement holds the original's hook registries themselves (the same dict objects): a hook registered on either
# module, before or after the swap, runs on the one in place, stays when the original comes back, and its handle
# removes it (a user's hook on the swapped module was dropped, silently)
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def swap_submodule(parent: nn.Module, name: str, replacement: nn.Module) -> None:
    """``parent.<name> = replacement``; :func:`restore_submodule` puts the current module back."""
    original = getattr(parent, name)
    for attr in _HOOK_DICTS:
        if hasattr(original, attr):
            object.__setattr__(replacement, attr, getattr(original, attr))
    replacement._is_full_backward_hook = original._is_full_backward_hook
    setattr(replacement, _ORIGINAL, [original])
    setattr(parent, name, replacement)


def restore_submodule(parent: nn.Module, name: str) -> None:
    """Undo :func:`swap_submodule`: the original comes back, in the replacement's train / eval mode, with the
    children they share by name as they are now (a projection wrapped after the swap, PEFT's LoRA, stays so, and
    a shared child keeps its own mode)."""
    current = getattr(parent, name)
    original = getattr(current, _ORIGINAL, None)
    if original is None:
        raise ValueError(f"model: the {type(current).__name__} at {type(parent).__name__}.{name} was not "
                         f"installed by an electra_fast patch")
    original = original[0]
    for child, module in current.named_children():
        if child in original._modules and original._modules[child] is not module:
            setattr(original, child, module)
    original._is_full_backward_hook = current._is_full_backward_hook
    # the mode: the original's own flag, and its children that were not in place (shared ones, such as a dropout
    # the user switched off, keep theirs: train() recursing would switch it on)
    original.training = current.training
    for child, module in original.named_children():
        if current._modules.get(child) is not module:
            module.train(current.training)
    setattr(parent, name, original)


_MARK = "_electra_fast_override"  # on each override: a method a user set on the instance is not one of ours


def override_methods(module: nn.Module, **functions: Callable) -> None:
    """Bind each function to ``module`` as the method of that name (this instance only)."""
    for name, function in functions.items():
        bound = functools.partial(function, module)
        setattr(bound, _MARK, True)
        setattr(module, name, bound)


def overrides(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s method ``name`` is overridden on the instance by :func:`override_methods`."""
    return getattr(vars(module).get(name), _MARK, False)


def restore_methods(module: nn.Module, *names: str) -> None:
    """Undo :func:`override_methods` for ``names`` (absent names, and a user's own instance methods, are left)."""
    for name in names:
        if overrides(module, name):
            del vars(module)[name]


def swapped(parent: nn.Module, name: str) -> bool:
    """Whether ``parent.<name>`` was installed by :func:`swap_submodule`."""
    return hasattr(getattr(parent, name), _ORIGINAL)
