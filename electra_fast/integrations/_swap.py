"""Reversible in-place swaps, shared by every adapter's patch / unpatch.

A submodule is replaced by another that remembers the original (in a list, so it is not registered as a
submodule and adds nothing to ``parameters()`` or ``state_dict()``); an instance's methods are overridden by
instance attributes, and deleting those brings the class's methods back.

An override is an :class:`_Override`: the function and a weak reference to the module. Anything holding the module
strongly (a bound method, ``functools.partial(function, module)``) and stored in the module's own ``__dict__`` is a
reference cycle: a dropped patched model would live on until a full cyclic GC (on a GPU, with its memory). It pickles as
its function and module, not as ``getattr(module, name)`` (a bound method's way, which the half-built module cannot
answer when it is unpickled): ``torch.save(model)`` / ``pickle`` / ``copy.deepcopy`` of a patched model give a copy
whose overrides act on the copy. ``inspect.signature`` reads it as a bound method (transformers' Trainer filters
dataset columns by it).
"""
from __future__ import annotations

import inspect
import weakref
from typing import Callable

import torch
from torch import nn

from ..nn._plain import FusedMethod

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
STRICT = "_electra_fast_strict"  # a patched module's flag (patching.py): a call it cannot serve raises


class _PatchedDict(dict):
    """A patched module's ``__dict__``, whose overrides dynamo does not see under torch.export: a strict export
    traces transformers' own methods. Dynamo names each module by the path it reached it through, and an override's
    only path to its module is its weak reference (``encoder.layer.0.forward.module().attention``): a constant lifted
    there failed the export, and ``torch.export.unflatten`` refused the rest. A module patched with ``strict=True``
    keeps them (its calls raise rather than run transformers' code). CPython's attribute lookup never calls
    ``__contains__``: eager calls, torch.compile and non-strict export run the overrides."""

    __slots__ = ()

    def __contains__(self, name) -> bool:  # nn.Module.__getattr__ asks 3 times per child: the common case first
        if type(dict.get(self, name)) is not _Override:
            return dict.__contains__(self, name)
        return not torch.compiler.is_exporting() or bool(dict.get(self, STRICT))


class _Override(FusedMethod):
    """``function`` bound to ``module``, which it holds weakly (see the module docstring)."""

    # __dict__ holds only the mark: a wrapper made by functools.update_wrapper (accelerate's fp32 output wrapper of
    # a model's forward) copies it and counts as installed, as it did when the override was a partial (the fused
    # code tells its own from such a wrapper by type: _plain.own_forward)
    __slots__ = ("function", "module", "__dict__", "__weakref__")  # weakref-able, as the partial was

    def __init__(self, function: Callable, module: nn.Module):
        self.function, self.module = function, weakref.ref(module)
        setattr(self, _MARK, True)
        if type(vars(module)) is dict:  # also on a copy, which is built through here (__reduce__)
            object.__setattr__(module, "__dict__", _PatchedDict(vars(module)))

    def __call__(self, *args, **kwargs):
        module = self.module()
        if module is None:  # only reachable through a reference taken from the module (m.forward) that outlived it
            raise ReferenceError(f"{getattr(self.function, '__name__', self.function)}: its module was freed")
        return self.function(module, *args, **kwargs)

    def __reduce__(self):  # with the module itself: unpickled / deep-copied, it acts on the new module
        return _Override, (self.function, self.module())

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(self.function)
        return signature.replace(parameters=tuple(signature.parameters.values())[1:])

    @property
    def __code__(self):  # non-strict torch.export reads the module's forward's (it reads a partial's func's)
        return self.function.__code__


# Dynamo compiles no frame of its own for __call__ (it still traces through it, as through a partial): run after a
# graph break in the module's _call_impl, that frame was one more graph break and, its code shared by every override,
# recompiled for each. A private API: a torch without it only loses that.
try:
    from torch._dynamo.eval_frame import skip_code
except ImportError:
    pass
else:
    skip_code(_Override.__call__.__code__)


def override_methods(module: nn.Module, **functions: Callable) -> None:
    """Bind each function to ``module`` as the method of that name (this instance only)."""
    for name, function in functions.items():
        setattr(module, name, _Override(function, module))


def overrides(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s method ``name`` is overridden on the instance by :func:`override_methods`."""
    return getattr(vars(module).get(name), _MARK, False)


def restore_methods(module: nn.Module, *names: str) -> None:
    """Undo :func:`override_methods` for ``names`` (absent names, and a user's own instance methods, are left)."""
    for name in names:
        if overrides(module, name):
            del vars(module)[name]
    attributes = vars(module)
    if type(attributes) is _PatchedDict and not any(type(v) is _Override for v in attributes.values()):
        object.__setattr__(module, "__dict__", dict(attributes))  # the last override gone: a plain module again


def swapped(parent: nn.Module, name: str) -> bool:
    """Whether ``parent.<name>`` was installed by :func:`swap_submodule`."""
    return hasattr(getattr(parent, name), _ORIGINAL)
