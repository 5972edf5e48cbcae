"""Whether fused code may read a module's Parameters instead of calling it.

The fused layers (the encoder's one-GEMM q / k / v projection, its GELU MLP, its dropout + add + LayerNorm, and the
transformers adapters built on them) read ``weight`` / ``bias`` directly. That is only the module's computation when
the module is exactly torch's ``Linear`` / ``LayerNorm`` (or electra_fast's ``Linear``) and nothing is hooked on
it: a PEFT LoRA wrapper exposing its base layer's ``weight``, a parametrized or pruned layer, a subclass, a user's
hook or accelerate's (a ``forward`` set on the instance: offloading loads the weights there) would be skipped
silently. Callers fall back to calling the modules when :func:`not_plain` names a reason.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .linear import Linear

_PLAIN = (nn.Linear, Linear, nn.LayerNorm)


class FusedMethod:
    """Base of electra_fast's own instance-level methods (``integrations/_swap.py``): a ``forward`` of this type set
    on a module is the fused code itself. Told apart by type: accelerate's hook wrapper around one copies its
    attributes (``functools.update_wrapper``)."""

    __slots__ = ()


def set_on_instance(module: nn.Module, name: str) -> bool:
    """Whether ``module`` has a method ``name`` set on the instance that may compute something else than its class's:
    not electra_fast's own, and not the class's method bound to this very module (transformers 5.0's output
    recorder "restores" each layer's forward so after every ``output_attentions`` call: that one changes nothing,
    and counting it left those layers unpatched, or refused under ``strict``)."""
    method = vars(module).get(name)
    if method is None or isinstance(method, FusedMethod):
        return False
    return not (getattr(method, "__self__", None) is module
                and getattr(method, "__func__", None) is getattr(type(module), name, None))


def own_forward(module: nn.Module) -> bool:
    """Whether ``module`` has a ``forward`` set on the instance that is not electra_fast's: accelerate's hooks
    (``add_hook_to_module``: device placement, CPU / disk offloading, whose weights are on "meta" until it runs) or
    a user's adapter, the module's computation either way (:func:`set_on_instance`)."""
    return set_on_instance(module, "forward")


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own (pruning and weight norm are forward pre-hooks;
    accelerate's are an :func:`own_forward`)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks) or own_forward(module)


def global_hooks() -> Optional[str]:
    """A reason when hooks are registered for every module (``nn.modules.module.register_module_forward_hook``)."""
    m = nn.modules.module
    if (m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
            or m._global_backward_pre_hooks):
        return "hooks registered for every module (the fused code does not call the layers it reads)"
    return None


def not_plain(**modules: Optional[nn.Module]) -> Optional[str]:
    """Why the fused code, which reads these modules' Parameters instead of calling them, would skip part of their
    computation (None: it would not): a module that is not exactly torch's Linear / LayerNorm (a PEFT LoRA wrapper,
    a quantised or parametrized layer, a subclass) or one with forward or backward hooks (pruning, weight norm, a
    user's hook, accelerate's), or hooks on every module. None entries are skipped. Checked at each call, so a
    wrapper installed after the model was built (or patched) is seen."""
    why = global_hooks()
    if why is not None:
        return why
    for name, module in modules.items():
        if module is None:
            continue
        if type(module) not in _PLAIN:
            return (f"{name} is a {type(module).__name__}, not torch's Linear / LayerNorm (its own forward would be "
                    "skipped)")
        if hooked(module):
            return f"{name} has hooks (the fused code does not call it)"
    return None
