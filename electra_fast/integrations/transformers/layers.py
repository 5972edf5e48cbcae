"""The pieces every transformers family shares, as method overrides of transformers' own module instances.

Each ``*_forward`` here is bound to one transformers module (``_swap.override_methods``): it reads that module's own
submodules and Parameters (nothing is copied or re-registered), computes with electra_fast's modules and ops, and
calls transformers' class method for a call it cannot serve (the fallback), so the answer is always transformers'.

- :func:`add_norm_forward`: ``*SelfOutput`` / ``*Output`` (dense, dropout, LayerNorm(x + residual)) with the dropout,
  add and norm as one ``dropout_add_layer_norm`` op each way (``electra_fast.nn.encoder.add_norm``).
- :func:`feed_forward`: a layer's feed-forward block (``intermediate`` + ``output``) as ``electra_fast.nn.linear.
  gelu_mlp`` (erf GELU only) followed by the output's add-norm.
- :func:`mlm_forward_for`: ``*ForMaskedLM.forward`` with ``labels``: the head's transform at the labelled rows only,
  then the vocabulary projection + cross-entropy streamed by ``electra_fast.mlm_loss_and_sample`` (the ``[B, T, V]``
  logits are never built; the output's ``logits`` is None).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...nn._plain import global_hooks, hooked, not_plain, own_forward
from ...nn.dropout import Dropout
from ...nn.encoder import add_norm
from ...ops.linear import gelu_mlp
from ...ops.sampling import mlm_loss_and_sample
from .. import _swap
from .patching import fallback

IGNORE_INDEX = -100  # torch's CrossEntropyLoss default, which every transformers MLM head uses


def erf_gelu(act) -> bool:
    """Whether a transformers activation module / function is the erf GELU (``ACT2FN["gelu"]``)."""
    return act is F.gelu or (type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu)


def is_layer_norm(module) -> bool:
    return type(module) is nn.LayerNorm and module.elementwise_affine


def not_called(**modules: Optional[nn.Module]) -> Optional[str]:
    """Why the fused code may not skip calling these modules (None: it may): a container of transformers' (an
    ``*Intermediate`` / ``*Output``, its activation) or torch's dropout, which the fused code computes itself, with
    hooks, or whose forward is not transformers' / torch's own (a subclass overriding it, one set on the instance: an
    adapter, accelerate's hooks)."""
    why = global_hooks()
    if why is not None:
        return why
    for name, module in modules.items():
        if not isinstance(module, nn.Module):  # an activation function, not a module: nothing to skip
            continue
        ours = type(module) is Dropout  # the native modules' dropout: what the fused code applies in its place
        if own_forward(module) or not (
                ours or getattr(type(module).forward, "__module__", "").startswith(("transformers.", "torch."))):
            return f"{name} is a {type(module).__name__} with its own forward (the fused code would skip it)"
        if hooked(module):
            return f"{name} has hooks (the fused code does not call it)"
    return None


# ------------------------------------------------------------------------------------------ add + norm
def norm(output: nn.Module, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """LayerNorm(dropout(y) + residual) with ``output``'s LayerNorm and dropout: fused when ``output``'s forward is
    patched, else transformers' three ops. Mixed dtypes (a bf16 dense output, an fp32 residual under autocast) are
    promoted first, as transformers' add does."""
    if not _swap.overrides(output, "forward"):
        return output.LayerNorm(output.dropout(y) + residual)
    reason = layer_norm_unsupported(output)
    if reason is not None:
        fallback(output, reason)
        return output.LayerNorm(output.dropout(y) + residual)
    dtype = torch.promote_types(y.dtype, residual.dtype)
    return add_norm(y.to(dtype), residual.to(dtype), output.LayerNorm, output.dropout, output.training)


def add_norm_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    """``*SelfOutput`` / ``*Output``.forward: hidden_states [B, T, in], input_tensor [B, T, H] -> [B, T, H]."""
    return norm(self, self.dense(hidden_states), input_tensor)


# ------------------------------------------------------------------------------------------ feed-forward
def feed_forward(layer: nn.Module, attention_output: torch.Tensor) -> torch.Tensor:
    """``layer.output(layer.intermediate(a), a)`` for an erf-GELU intermediate: a [B, T, H] -> [B, T, H]."""
    d1, out = layer.intermediate.dense, layer.output
    reason = _mlp_parts(layer)
    if reason is not None:
        fallback(layer, f"mlp: {reason}")
        return out(layer.intermediate(attention_output), attention_output)
    y = gelu_mlp(attention_output, d1.weight, d1.bias, out.dense.weight, out.dense.bias)
    return norm(out, y, attention_output)


def feed_forward_unsupported(layer: nn.Module) -> Optional[str]:
    reason = _mlp_parts(layer)
    return None if reason is None else f"mlp: {reason}"


def _mlp_parts(layer: nn.Module) -> Optional[str]:
    """Why the fused feed-forward may not stand in for ``layer.intermediate`` and ``layer.output`` (None: it may).
    Checked at each call: an activation swapped after patching (``intermediate_act_fn = nn.ReLU()``) is seen."""
    inter, out = layer.intermediate, layer.output
    act = inter.intermediate_act_fn
    if not erf_gelu(act):
        name = getattr(act, "__name__", type(act).__name__)
        return f"the feed-forward activation {name} is not the erf GELU ('gelu')"
    return (not_plain(**{"intermediate.dense": inter.dense, "output.dense": out.dense})
            or not_called(**{"intermediate": inter, "output": out, "intermediate.intermediate_act_fn":
                             inter.intermediate_act_fn, "output.dropout": out.dropout}))


def layer_norm_unsupported(output: nn.Module) -> Optional[str]:
    """Why the add-norm of a ``*SelfOutput`` / ``*Output`` cannot be fused (None: it can); at patch time and at
    each call."""
    if not is_layer_norm(output.LayerNorm):
        return "layer_norm: not torch's LayerNorm"
    reason = not_plain(LayerNorm=output.LayerNorm) or not_called(dropout=output.dropout)
    return None if reason is None else f"layer_norm: {reason}"


# --------------------------------------------------------------------------------------------- masks
def graph_capture() -> Optional[str]:
    """Why transformers' code serves this call under torch.export / torch.jit.trace (None otherwise): the fused paths
    read the mask's and labels' values to pick their path, which export cannot guard and a trace would freeze (a
    model traced on an unpadded batch attended to the padding of later ones). torch.compile keeps the fused path."""
    if torch.compiler.is_exporting():
        return "torch.export (the fused path reads the mask's values, which export cannot guard)"
    if torch.jit.is_tracing():
        return "torch.jit.trace (the fused path reads the mask's values, which a trace would freeze)"
    return None


def padding_key_mask(mask: Optional[torch.Tensor], B: int, T: int) -> "tuple[bool, Optional[torch.Tensor]]":
    """(servable, bool [B, T] key mask or None) from what transformers' ``create_bidirectional_mask`` passes to
    an attention layer: None, a bool [B|1, 1, T|1, T] mask (True = attend; sdpa) or an additive float one (0 /
    dtype min; eager). Anything else (another shape, other values, rows that differ: not a padding mask) is not
    servable."""
    if mask is None:
        return True, None
    if mask.dim() != 4 or mask.shape[0] not in (1, B) or mask.shape[1] != 1 or mask.shape[2] not in (1, T) \
            or mask.shape[3] != T:
        return False, None
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask == 0
        if not bool((allowed | (mask == torch.finfo(mask.dtype).min)).all()):
            return False, None  # an additive bias, not a padding mask
    else:
        return False, None
    keys = allowed[:, 0, 0, :]
    if not bool((allowed == keys[:, None, None, :]).all()):
        return False, None
    return True, keys.expand(B, T)


# ------------------------------------------------------------------------------------------ MLM head
HeadParts = Callable[[nn.Module], "tuple[Callable, torch.Tensor, Optional[torch.Tensor]]"]


@functools.lru_cache(maxsize=None)
def _signature(function) -> inspect.Signature:
    return inspect.signature(function)


def _accepts_var_keywords(function) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in _signature(function).parameters.values())


class mlm_forward_for:
    """The loss-only forward of one transformers ``*ForMaskedLM`` class ``cls``, called as ``forward(model, *args,
    **kwargs)``; ``head_parts(model) -> (transform, projection, weight [V, E], bias [V] or None)``: the head's layers
    before its vocabulary projection, the projection module transformers calls (None when it reads the weight
    itself, e.g. tied embeddings) and the projection's parameters. ``head_parts`` must be a module-level function:
    a patched model pickles this object. ``__wrapped__`` gives it the original's signature (the Trainer's column
    filtering reads it)."""

    def __init__(self, cls: type, head_parts: HeadParts):
        self.cls, self.head_parts = cls, head_parts
        functools.update_wrapper(self, cls.forward)
        self.__code__ = cls.forward.__code__  # torch.export reads the bound forward's code for its argument names

    def __call__(self, model, *args, **kwargs):
        original = self.cls.forward
        labels = _signature(original).bind(model, *args, **kwargs).arguments.get("labels")
        if not isinstance(labels, torch.Tensor):
            return original(model, *args, **kwargs)
        reason = graph_capture() or self.unsupported(model)
        if reason is not None:
            fallback(model, reason)
            return original(model, *args, **kwargs)
        return _mlm_loss_only(model, original, self.head_parts, args, kwargs)

    def unsupported(self, model) -> Optional[str]:
        """Why ``model``'s head cannot be served (None: it can)."""
        reason = not_plain(projection=self.head_parts(model)[1]) or not_called(**_head_modules(model))
        return None if reason is None else f"mlm_head: {reason}"

    def __reduce__(self):  # update_wrapper's __dict__ copy holds nothing picklable by reference
        return (mlm_forward_for, (self.cls, self.head_parts))


def _head_modules(model: nn.Module) -> dict:
    """{name: module} of the masked-LM head (every module outside the base model: ``cls``, ``lm_head``,
    ``lm_predictions``, ...), whose forwards the loss-only path calls in part or not at all."""
    return {name: module for name, module in model.named_modules()
            if name and name.split(".", 1)[0] != model.base_model_prefix}


def _mlm_loss_only(model, original, head_parts: HeadParts, args, kwargs):
    from transformers.modeling_outputs import MaskedLMOutput

    arguments = dict(_signature(original).bind(model, *args, **kwargs).arguments)
    arguments.pop("self", None)
    extra = {}
    for name, parameter in _signature(original).parameters.items():
        if parameter.kind is parameter.VAR_KEYWORD:
            extra = dict(arguments.pop(name, {}))
    labels = arguments.pop("labels")
    return_dict = arguments.pop("return_dict", extra.pop("return_dict", None))
    base = getattr(model, model.base_model_prefix)
    passed = {k: v for k, v in arguments.items() if v is not None}
    if _accepts_var_keywords(type(base).forward):  # as the original passes **kwargs on (or drops them)
        passed.update(extra)
    outputs = base(**passed, return_dict=True)
    hidden = outputs[0]
    if labels.numel() != hidden.shape[0] * hidden.shape[1]:  # transformers' own check, in its words' place
        raise ValueError(f"labels: expected one per token of input_ids {tuple(hidden.shape[:2])}, got shape "
                         f"{tuple(labels.shape)}")
    labels = labels.to(hidden.device)
    rows = labels.reshape(-1) != IGNORE_INDEX
    transform, _, weight, bias = head_parts(model)
    h = transform(hidden.reshape(-1, hidden.shape[-1])[rows])
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    loss, _ = mlm_loss_and_sample(h.to(dtype), weight.to(dtype), labels.reshape(-1)[rows],
                                  bias=None if bias is None else bias.to(dtype), seed=0,
                                  ignore_index=IGNORE_INDEX)
    out = MaskedLMOutput(loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    if return_dict:
        return out
    # transformers' tuple is (loss, logits, *the base model's other outputs): keep logits' place (None), so that
    # out[1] is not silently the hidden states (ModelOutput.to_tuple drops None entries)
    return (loss, None) + tuple(v for v in (outputs.hidden_states, outputs.attentions) if v is not None)
