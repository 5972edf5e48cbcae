"""``electra_fast.patch(model)`` / ``unpatch(model)``: one mechanism for every supported transformers family.

A family module (``bert.py``: BERT / RoBERTa / ELECTRA; ``deberta_v2.py``) lists :class:`Rule` s: which
transformers classes it serves, under which option (``attention`` / ``layer_norm`` / ``mlp`` / ``mlm_head``), why
a given instance cannot be served (a reason string, or None), and how to install / remove the fused computation on
that instance (``_swap``: instance-level method overrides, or a swapped submodule). :func:`patch` walks the model's
modules and installs every rule that applies; :func:`unpatch` removes them. Nothing is copied: the patched model
holds the same modules (but DeBERTa's swapped attention, which shares the original's projections), the same
Parameter objects and the same ``state_dict`` keys.

A call the fused code cannot serve (``output_attentions=True``, a cache, a mask that is not a padding mask, an
attention implementation other than eager / sdpa) runs transformers' own code for that call; with
``strict=True`` it raises a ``ValueError`` naming what is unsupported instead, and so does :func:`patch` for a
configuration it cannot serve.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Iterable, Optional

from torch import nn

from ...nn._plain import set_on_instance
from .. import _swap

OPTIONS = ("attention", "layer_norm", "mlp", "mlm_head")
_STRICT = _swap.STRICT  # instance attribute of a patched module (removed by unpatch)


def instance_method(option: str, module: nn.Module, name: str) -> Optional[str]:
    """Why ``option`` cannot serve ``module`` when its method ``name`` is set on the instance (accelerate's hooks, a
    user's adapter): the patch would lose that computation (None: it is not, :func:`.._plain.set_on_instance`)."""
    if set_on_instance(module, name):
        return f"{option}: {type(module).__name__}.{name} is set on the instance (accelerate's hooks, an adapter)"
    return None


class Rule:
    """How one option is installed on instances of some transformers classes.

    ``classes()`` -> the transformers classes (imports transformers on first use); ``unsupported(module)`` -> why
    this instance cannot be served (None: it can); ``methods(module)`` -> {method name: function} overridden on
    the instance, or ``swap`` = (submodule name, factory(module) -> replacement) for a swapped submodule.
    """

    def __init__(self, option: str, classes: Callable[[], tuple], *, methods: Optional[Callable] = None,
                 swap: Optional[tuple] = None, unsupported: Callable = lambda module: None):
        if option not in OPTIONS or (methods is None) == (swap is None):
            raise ValueError(f"Rule: option in {OPTIONS} and exactly one of methods / swap expected")
        self.option, self.classes, self.methods, self.swap, self.unsupported = (option, classes, methods, swap,
                                                                                unsupported)

    def applies(self, module: nn.Module) -> bool:
        return isinstance(module, self.classes())

    def why_not(self, module: nn.Module) -> Optional[str]:
        """Why this instance cannot be served (None: it can): a subclass that overrides a method this rule
        replaces, or a method set on the instance (accelerate's hooks, an adapter: either would be lost), or the
        family's reason."""
        if self.methods is not None:
            base = next(c for c in type(module).__mro__ if c in self.classes())
            for name in self.methods(module):
                if getattr(type(module), name) is not getattr(base, name, None):
                    return f"{self.option}: {type(module).__name__} overrides {base.__name__}.{name}"
                reason = instance_method(self.option, module, name)
                if reason is not None:
                    return reason
        return self.unsupported(module)

    def installed(self, module: nn.Module) -> bool:
        if self.swap is not None:
            return _swap.swapped(module, self.swap[0])
        return any(_swap.overrides(module, name) for name in self.methods(module))

    def install(self, module: nn.Module, strict: bool) -> None:
        if self.swap is not None:
            name, factory = self.swap
            _swap.swap_submodule(module, name, factory(module))
        else:
            _swap.override_methods(module, **self.methods(module))
        self.set_strict(module, strict)

    def set_strict(self, module: nn.Module, strict: bool) -> None:
        """Whether a call this installed rule cannot serve raises (see :func:`fallback`)."""
        setattr(getattr(module, self.swap[0]) if self.swap is not None else module, _STRICT, strict)

    def remove(self, module: nn.Module) -> None:
        if self.swap is not None:
            _swap.restore_submodule(module, self.swap[0])
        else:
            _swap.restore_methods(module, *self.methods(module))
            vars(module).pop(_STRICT, None)


def fallback(module: nn.Module, reason: str) -> None:
    """Called by a fused forward before it runs transformers' code for this call: raises under ``strict=True``."""
    if getattr(module, _STRICT, False):
        raise ValueError(f"strict: electra_fast cannot serve this call of {type(module).__name__}: {reason}")


@functools.lru_cache(maxsize=None)
def _rules() -> tuple:
    from . import bert, deberta_v2

    return tuple(bert.rules()) + tuple(deberta_v2.rules())


# The adapters override methods of transformers' layers, whose internals 5.0 rewrote (4.x's attention has no
# is_causal and another signature: patch raised AttributeError mid-check). Tested: 5.0.0 through 5.25.0.
MIN_TRANSFORMERS = (5, 0)


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


def check_transformers() -> None:
    """ImportError, in one line, for a transformers release the adapters were not written for."""
    version = _transformers_version()
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or tuple(map(int, found.groups())) < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise ImportError(f"electra_fast.patch needs transformers >= {need} (its layers' internals changed in "
                          f"{need}), found {version}: pip install -U 'transformers>={need}'")


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a transformers model), got {type(model).__name__}")


def _matches(model: nn.Module) -> Iterable:
    for module in list(model.modules()):
        for rule in _rules():
            if rule.applies(module):
                yield rule, module


def patch(model: nn.Module, *, attention: bool = True, layer_norm: bool = True, mlp: bool = True,
          mlm_head: bool = True, strict: bool = False) -> nn.Module:
    """Put electra_fast's fused computation into a transformers BERT / RoBERTa / ELECTRA / DeBERTa-v2 model (base
    model or any head) in place; returns ``model``.

    Args:
        attention: self-attention (BERT family: ``electra_fast.nn.encoder.standard_attention``, SDPA or the fused
            Philox-dropout attention op; DeBERTa: the disentangled attention op).
        layer_norm: every post-LN sublayer's dropout + residual add + LayerNorm as one op each way.
        mlp: the erf-GELU feed-forward block (``gelu_mlp``).
        mlm_head: ``*ForMaskedLM`` called with ``labels`` computes the loss at the labelled rows only with the
            streamed vocabulary projection + cross-entropy, and returns ``logits=None`` (False keeps transformers'
            head and its full ``[B, T, V]`` logits).
        strict: raise a ``ValueError`` naming what cannot be served (a configuration now, a call argument later)
            instead of running transformers' code for it.

    The model keeps its modules, Parameter objects and ``state_dict``; :func:`unpatch` restores transformers'
    computation exactly. Patching again applies that call's options: it installs what is not installed yet,
    removes what an option now False had installed (``patch(model, mlm_head=False)`` on a model
    ``electra_fast.from_pretrained`` patched gives the logits back), and applies its ``strict`` to the rest.
    """
    _check_model(model)
    check_transformers()
    options = dict(attention=attention, layer_norm=layer_norm, mlp=mlp, mlm_head=mlm_head)
    for name, value in {**options, "strict": strict}.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    plan, reasons, found, installed, turned_off = [], [], False, [], []
    for rule, module in _matches(model):
        found = True
        if rule.installed(module):
            (installed if options[rule.option] else turned_off).append((rule, module))
            continue
        if not options[rule.option]:
            continue
        reason = rule.why_not(module)
        if reason is None:
            plan.append((rule, module))
        elif reason not in reasons:
            reasons.append(reason)
    if not found:
        raise ValueError(f"model: expected a transformers BERT, RoBERTa, ELECTRA or DeBERTa-v2 model, found none of "
                         f"their layers in {type(model).__name__}")
    if strict and reasons:
        raise ValueError("strict: electra_fast cannot serve " + "; ".join(reasons))
    for rule, module in turned_off:  # patched before, its option False now: transformers' code again
        rule.remove(module)
    for rule, module in installed:  # patched before: this call's strict holds for it too
        rule.set_strict(module, strict)
    for rule, module in plan:
        rule.install(module, strict)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` in place (transformers' own modules and methods come back); returns ``model``."""
    _check_model(model)
    for rule, module in _matches(model):
        if rule.installed(module):
            rule.remove(module)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs electra_fast's computation."""
    _check_model(model)
    return any(rule.installed(module) for rule, module in _matches(model))


def from_pretrained(model_class, *args, attention: bool = True, layer_norm: bool = True, mlp: bool = True,
                    mlm_head: bool = True, strict: bool = False, **kwargs) -> nn.Module:
    """``patch(model_class.from_pretrained(*args, **kwargs), ...)``: e.g. ``electra_fast.from_pretrained(
    AutoModelForMaskedLM, "path/or/hub-id")``."""
    loader = getattr(model_class, "from_pretrained", None)
    if not callable(loader):
        raise TypeError(f"model_class: expected a transformers model or Auto* class with from_pretrained, got "
                        f"{getattr(model_class, '__name__', type(model_class).__name__)}")
    return patch(loader(*args, **kwargs), attention=attention, layer_norm=layer_norm, mlp=mlp, mlm_head=mlm_head,
                 strict=strict)


def _base_classes() -> tuple:
    from . import bert, deberta_v2

    return tuple(bert.pretrained_classes()) + (deberta_v2._hf().DebertaV2PreTrainedModel,)


def apply_to_transformers(*, attention: bool = True, layer_norm: bool = True, mlp: bool = True,
                          mlm_head: bool = True, strict: bool = False) -> None:
    """Patch every BERT / RoBERTa / ELECTRA / DeBERTa-v2 model transformers builds from now on (for code that builds
    models itself: ``Trainer(model_init=...)``, sentence-transformers, pipelines): each family's ``post_init`` (run
    at the end of every model's ``__init__``, also under ``from_pretrained``) ends with :func:`patch` with these
    options (calling this again replaces them). :func:`remove_from_transformers` stops it (models already built
    stay patched)."""
    options = dict(attention=attention, layer_norm=layer_norm, mlp=mlp, mlm_head=mlm_head, strict=strict)
    for name, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    check_transformers()
    remove_from_transformers()
    for cls in _base_classes():
        original = vars(cls).get("post_init")  # None: inherited from PreTrainedModel
        parent = original if original is not None else super(cls, cls).post_init

        def post_init(self, _parent=parent):
            _parent(self)
            # a model of the family with none of its layers (0 layers, a user's class holding only heads) is legal:
            # nothing to patch, where an explicit patch() names that
            if next(iter(_matches(self)), None) is not None:
                patch(self, **options)

        post_init._electra_fast_replaced = original
        cls.post_init = post_init


def remove_from_transformers() -> None:
    """Undo :func:`apply_to_transformers` (models built meanwhile stay patched: :func:`unpatch` them)."""
    for cls in _base_classes():
        installed = vars(cls).get("post_init")
        if installed is None or not hasattr(installed, "_electra_fast_replaced"):
            continue
        if installed._electra_fast_replaced is None:
            delattr(cls, "post_init")
        else:
            cls.post_init = installed._electra_fast_replaced
