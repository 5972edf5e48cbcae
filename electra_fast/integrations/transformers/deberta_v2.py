"""electra_fast's disentangled attention inside transformers' DeBERTa-v2/v3 models.

``patch_deberta_v2(model)`` swaps :class:`FusedDisentangledSelfAttention` into every layer of a transformers
DebertaV2 model (any head) in place, sharing the original projections (same Parameter objects), and makes the
encoder pass the [B, T] padding mask instead of building [B, 1, T, T] and the relative-position table;
``unpatch_deberta_v2(model)`` restores the original modules.

:class:`FusedDisentangledSelfAttention` is ``electra_fast.nn.DisentangledSelfAttention`` with transformers'
constructor (a ``DebertaV2Config``) and forward signature. ``output_attentions=True``, a ``query_states`` of
another shape than ``hidden_states``, a non-standard ``relative_pos`` or a mask that is not a padding mask run
transformers' own computation on the same parameters.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from ... import _seed
from ...nn._plain import own_forward
from ...nn.disentangled_attention import POSITION_TERMS, DisentangledSelfAttention, applied_dropout
from ...ops.disentangled_attention import disentangled_attention
from ...reference.disentangled_attention import relative_slots
from .. import _swap


def _hf():
    from transformers.models.deberta_v2 import modeling_deberta_v2  # deferred: transformers is optional

    return modeling_deberta_v2


def config_arguments(config) -> dict:
    """``DisentangledSelfAttention``'s arguments from a ``DebertaV2Config``, resolved as transformers does."""
    max_rel = getattr(config, "max_relative_positions", -1)
    return dict(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                head_size=getattr(config, "attention_head_size", None),
                relative_attention=getattr(config, "relative_attention", False),
                position_buckets=getattr(config, "position_buckets", -1),
                max_relative_positions=max_rel if max_rel >= 1 else config.max_position_embeddings,
                pos_att_type=[t for t in config.pos_att_type or [] if t in POSITION_TERMS],  # others: unused
                share_att_key=getattr(config, "share_att_key", False),
                attention_dropout=config.attention_probs_dropout_prob, pos_dropout=config.hidden_dropout_prob)


def _module_arguments(module: nn.Module) -> dict:
    """The same arguments read back from a built transformers ``DisentangledSelfAttention``; the dropouts' are
    placeholders (0): :meth:`FusedDisentangledSelfAttention.from_transformers` takes module's own dropout modules,
    whatever their p (a p of 1, legal in transformers, failed this constructor's check before the fallback)."""
    relative = module.relative_attention
    return dict(hidden_size=module.query_proj.in_features, num_heads=module.num_attention_heads,
                head_size=module.attention_head_size, relative_attention=relative,
                position_buckets=module.position_buckets if relative else -1,
                max_relative_positions=module.max_relative_positions if relative else 1,
                pos_att_type=[t for t in module.pos_att_type if t in POSITION_TERMS],
                share_att_key=module.share_att_key, attention_dropout=0.0, pos_dropout=0.0)


def _with_parameters(module: nn.Module) -> set:
    return {name for name, child in module.named_children() if any(True for _ in child.parameters())}


class FusedDisentangledSelfAttention(DisentangledSelfAttention):
    """Drop-in for transformers' DebertaV2 ``DisentangledSelfAttention``: same ``config`` argument, parameter
    names and forward signature, computed by the fused op.

    forward(hidden_states [B, T, hidden], attention_mask [B, T] (1 = real token) or transformers' [B, 1, T, T]
    / [B, T, T], output_attentions, query_states, relative_pos, rel_embeddings [2k, hidden]) returns
    ``(context [B, T, H * D], None)`` (``(context, probabilities)`` with output_attentions).
    """

    def __init__(self, config):
        super().__init__(**config_arguments(config))

    @classmethod
    def from_transformers(cls, module: nn.Module) -> "FusedDisentangledSelfAttention":
        """The fused module over ``module``'s projections (the same Parameter objects) and settings."""
        hf = _hf()
        if type(module) is not hf.DisentangledSelfAttention:  # a subclass's own code would be bypassed
            raise TypeError(f"module: expected transformers' DebertaV2 DisentangledSelfAttention (not a subclass), "
                            f"got {type(module).__name__}")
        new = cls.__new__(cls)
        with torch.device("meta"):  # projections are placeholders until replaced by module's own below
            DisentangledSelfAttention.__init__(new, **_module_arguments(module))
        projections = _with_parameters(new)
        if _with_parameters(module) != projections:
            raise ValueError(f"module: expected submodules with parameters {sorted(projections)}, got "
                             f"{sorted(_with_parameters(module))} (an unknown transformers layout)")
        for name in projections:
            setattr(new, name, getattr(module, name))
        for name in ("dropout", "pos_dropout"):  # module's own objects: a user's hook or module on them is kept
            if name in module._modules and name in new._modules:
                setattr(new, name, module._modules[name])
        new.training = module.training  # its own flag only: every child is module's, in the mode the user set
        return new

    # transformers' helpers, which its own computation (the fallback path) calls on self
    def transpose_for_scores(self, x, attention_heads) -> torch.Tensor:
        return _hf().DisentangledSelfAttention.transpose_for_scores(self, x, attention_heads)

    def disentangled_attention_bias(self, query_layer, key_layer, relative_pos, rel_embeddings, scale_factor):
        return _hf().DisentangledSelfAttention.disentangled_attention_bias(
            self, query_layer, key_layer, relative_pos, rel_embeddings, scale_factor)

    def _key_mask(self, attention_mask: Optional[torch.Tensor], B: int, T: int) -> "tuple[bool, object]":
        """(fusable, [B, T] key mask or None) from a [B, T], [B, T, T] or [B, 1, T, T] mask."""
        if attention_mask is None:
            return True, None
        if attention_mask.dim() <= 2:
            return True, attention_mask != 0 if attention_mask.is_floating_point() else attention_mask
        m = attention_mask.bool()
        m = m[:, 0] if m.dim() == 4 and m.shape[1] == 1 else m
        if m.dim() != 3 or m.shape[1:] != (T, T) or m.shape[0] not in (1, B):
            return False, None
        m = m.expand(B, T, T)  # one mask for the batch, as transformers broadcasts it
        keys = m.any(dim=-2)  # a padding mask is outer(keys, keys); anything else is not fusable
        if not torch.equal(m, keys[:, :, None] & keys[:, None, :]):
            return False, None
        return True, keys

    def _standard_relative_pos(self, relative_pos: Optional[torch.Tensor], T: int) -> bool:
        if relative_pos is None or not self.relative_attention:
            return True
        rel = relative_pos.reshape(-1, T, T) if relative_pos.numel() % (T * T) == 0 else None
        if rel is None:
            return False
        span = self.pos_ebd_size
        slots = relative_slots(T, self.position_buckets, self.max_relative_positions, rel.device).long()
        i = torch.arange(T, device=rel.device)
        expected = slots[i[:, None] - i[None, :] + T - 1] - span  # bucket(i - j), possibly clamped
        c2p = torch.clamp(rel.long() + span, 0, 2 * span - 1) - span  # what transformers gathers for c2p
        p2c = torch.clamp(span - rel.long().transpose(-1, -2), 0, 2 * span - 1) - span  # and for p2c
        return bool((c2p == expected).all() and (p2c == expected).all())

    def _transformers_forward(self, hidden_states, attention_mask, output_attentions, query_states, relative_pos,
                              rel_embeddings):
        if attention_mask is not None and attention_mask.dim() <= 2:  # the patched encoder passes [B, T]
            ext = attention_mask[:, None, None, :]
            attention_mask = ext * ext.squeeze(-2).unsqueeze(-1)
        if attention_mask is None:
            T = hidden_states.shape[-2]
            attention_mask = torch.ones(1, 1, T, T, dtype=torch.bool, device=hidden_states.device)
        return _hf().DisentangledSelfAttention.forward(self, hidden_states, attention_mask, output_attentions,
                                                       query_states, relative_pos, rel_embeddings)

    def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None,
                rel_embeddings=None):
        from . import layers  # imported here: layers imports this module's patching rules

        B, T = hidden_states.shape[0], hidden_states.shape[-2]
        capture = layers.graph_capture()
        fusable, key_mask = (False, None) if capture else self._key_mask(attention_mask, B, T)
        reason = (capture if capture
                  else "output_attentions=True (the fused attention builds no probabilities)" if output_attentions
                  else "an attention mask that is not a padding mask" if not fusable
                  else "query_states of another shape than hidden_states"
                  if query_states is not None and query_states.shape != hidden_states.shape
                  else "a non-standard relative_pos" if not self._standard_relative_pos(relative_pos, T)
                  else _dropout_not_called(self))
        if reason is not None:
            from .patching import fallback

            fallback(self, reason)  # raises when patched with strict=True
            return self._transformers_forward(hidden_states, attention_mask, output_attentions, query_states,
                                              relative_pos, rel_embeddings)
        context = super().forward(hidden_states, key_mask, rel_embeddings=rel_embeddings, query_states=query_states)
        if key_mask is not None and not bool(key_mask.bool().all()):
            # transformers' padded query rows attend uniformly to every key (heads that read padded positions, such
            # as question answering's softmax, see them); the fused op leaves them 0
            keys = key_mask.bool()
            rows = self._keyless_rows(hidden_states, applied_dropout(self.dropout))
            context = torch.where(keys[..., None], context, rows.to(context.dtype))
        return (context, None)

    def _value(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.value_proj  # torch's Linear: its weights, so its hooks see one call (V's), as transformers'
        # but accelerate's hook is its computation (an offloaded weight is on "meta" outside the call)
        return F.linear(x, proj.weight, proj.bias) if type(proj) is nn.Linear and not own_forward(proj) else proj(x)

    def _keyless_rows(self, hidden_states: torch.Tensor, p: float) -> torch.Tensor:
        """transformers' context at padded query rows: dropout(uniform weights over the T keys) @ V, [B, T or 1,
        H * D] (meant only at the padded rows). Without dropout the mean of V, i.e. value_proj of the mean input.
        With it each head's weights are dropped independently, as transformers' nn.Dropout does (the mean of V
        alone had the right mean and no spread: a training loss at padded rows, question answering's, differed):
        the fused op on zero queries and keys (uniform weights over every key) with its Philox dropout, which
        stores no [B, H, T, T] weights for the backward."""
        if p == 0.0:
            return self._value(hidden_states.mean(dim=-2, keepdim=True))
        B, T = hidden_states.shape[0], hidden_states.shape[-2]
        v = self._value(hidden_states).view(B, T, self.num_attention_heads, -1).transpose(1, 2).contiguous()
        zeros = torch.zeros_like(v)
        out = disentangled_attention(zeros, zeros, v, None, None, dropout_p=p, seed=_seed.draw(), scale=1.0)
        return out.transpose(1, 2).reshape(B, T, -1)


def _dropout_not_called(module: nn.Module) -> Optional[str]:
    """The fused op reads the attention dropout's p and never calls it: a hook on it, or a module of the user's
    there other than torch's Dropout / Identity needs transformers' computation. pos_dropout is called by both,
    unless no position term reads it (transformers calls it whenever the attention is relative)."""
    from .layers import not_called

    unread = module.relative_attention and not any(t in POSITION_TERMS for t in module.pos_att_type)
    why = not_called(dropout=module.dropout, **({"pos_dropout": module.pos_dropout} if unread else {}))
    if why is None and applied_dropout(module.dropout) is None:
        why = f"dropout is a {type(module.dropout).__name__} (the fused attention applies nn.Dropout only)"
    return why


def _encoder_get_attention_mask(self, attention_mask):
    """Patched DebertaV2Encoder.get_attention_mask: keep a [B, T] padding mask as it is."""
    if attention_mask.dim() <= 2:
        return attention_mask
    return type(self).get_attention_mask(self, attention_mask)


def _encoder_get_rel_pos(self, hidden_states, query_states=None, relative_pos=None):
    """Patched DebertaV2Encoder.get_rel_pos: the fused attention builds its own slots (no [T, T] table)."""
    return relative_pos


_ENCODER_METHODS = dict(get_attention_mask=_encoder_get_attention_mask, get_rel_pos=_encoder_get_rel_pos)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def patch(model: nn.Module) -> int:
    """Patch every DeBERTa-v2 attention and encoder of ``model`` in place; returns how many such modules it
    holds, patched now or before (0: not a DeBERTa-v2 model, nothing changed)."""
    _check_model(model)
    hf = _hf()
    found = 0
    for module in list(model.modules()):
        if isinstance(module, hf.DebertaV2Attention) and type(module.self) is hf.DisentangledSelfAttention:
            _swap.swap_submodule(module, "self", FusedDisentangledSelfAttention.from_transformers(module.self))
        elif isinstance(module, hf.DebertaV2Encoder):
            if not _swap.overrides(module, "get_rel_pos"):
                _swap.override_methods(module, **_ENCODER_METHODS)
        elif not isinstance(module, DisentangledSelfAttention):  # ours (fused already) count as patched
            continue
        found += 1
    return found


def unpatch(model: nn.Module) -> int:
    """Undo :func:`patch` in place; returns how many modules were restored."""
    _check_model(model)
    hf = _hf()
    restored = 0
    for module in list(model.modules()):
        if isinstance(module, hf.DebertaV2Attention) and isinstance(module.self, FusedDisentangledSelfAttention):
            _swap.restore_submodule(module, "self")
        elif isinstance(module, hf.DebertaV2Encoder) and _swap.overrides(module, "get_rel_pos"):
            _swap.restore_methods(module, *_ENCODER_METHODS)
        else:
            continue
        restored += 1
    return restored


def patch_deberta_v2(model: nn.Module) -> nn.Module:
    """Replace the attention of every layer of a transformers DebertaV2 model (any head) in place.

    The new modules share the original projections, so every Parameter object is kept (an optimizer built
    before patching keeps working). Returns ``model``; :func:`unpatch_deberta_v2` restores it.
    """
    if patch(model) == 0:
        raise ValueError(f"model: expected a transformers DebertaV2 model, found no DebertaV2 attention in "
                         f"{type(model).__name__}")
    return model


def unpatch_deberta_v2(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_deberta_v2` in place (the original modules come back with the same Parameters)."""
    unpatch(model)
    return model


# ------------------------------------------------------------------ electra_fast.patch (all four options)
def _attention_unsupported(module: nn.Module) -> Optional[str]:
    from .patching import instance_method

    # the swap replaces the whole module: a forward set on it (an adapter's, accelerate's) would be dropped, silently
    reason = instance_method("attention", module.self, "forward")
    if reason is not None:
        return reason
    try:
        FusedDisentangledSelfAttention.from_transformers(module.self)
    except (TypeError, ValueError) as error:
        return f"attention: {error}"
    reason = _dropout_not_called(module.self)
    return None if reason is None else f"attention: {reason}"


def _encoder_unsupported(encoder: nn.Module) -> Optional[str]:
    """The encoder passes [B, T] masks only when every attention it drives is (or can be) the fused one."""
    unfused = [layer.attention for layer in encoder.layer
               if not isinstance(layer.attention.self, DisentangledSelfAttention)]
    return next((r for r in map(_attention_unsupported, unfused) if r is not None), None)


def _layer_forward(self, hidden_states, attention_mask, query_states=None, relative_pos=None, rel_embeddings=None,
                   output_attentions: bool = False):
    """DebertaV2Layer.forward with the feed-forward block as ``layers.feed_forward``."""
    from . import layers

    attention_output, att_matrix = self.attention(hidden_states, attention_mask, output_attentions=output_attentions,
                                                  query_states=query_states, relative_pos=relative_pos,
                                                  rel_embeddings=rel_embeddings)
    return layers.feed_forward(self, attention_output), (att_matrix if output_attentions else None)


def _head(model):
    if model.legacy:
        p = model.cls.predictions
        return p.transform, p.decoder, p.decoder.weight, p.decoder.bias
    h = model.lm_predictions.lm_head  # transformers reads the tied embedding matrix itself: no module to call
    return (lambda x: h.LayerNorm(h.transform_act_fn(h.dense(x)))), None, \
        model.deberta.embeddings.word_embeddings.weight, h.bias


def rules() -> list:
    """This family's rules for ``electra_fast.patch`` (``patching.Rule``)."""
    from . import layers
    from .patching import Rule

    hf = _hf
    return [
        Rule("attention", lambda: (hf().DebertaV2Attention,),
             swap=("self", lambda m: FusedDisentangledSelfAttention.from_transformers(m.self)),
             unsupported=_attention_unsupported),
        Rule("attention", lambda: (hf().DebertaV2Encoder,), methods=lambda m: _ENCODER_METHODS,
             unsupported=_encoder_unsupported),
        Rule("layer_norm", lambda: (hf().DebertaV2SelfOutput, hf().DebertaV2Output),
             methods=lambda m: dict(forward=layers.add_norm_forward),
             unsupported=layers.layer_norm_unsupported),
        Rule("mlp", lambda: (hf().DebertaV2Layer,), methods=lambda m: dict(forward=_layer_forward),
             unsupported=layers.feed_forward_unsupported),
        Rule("mlm_head", lambda: (hf().DebertaV2ForMaskedLM,),
             methods=lambda m: _mlm_methods(), unsupported=lambda m: _mlm_methods()["forward"].unsupported(m)),
    ]


@functools.lru_cache(maxsize=None)
def _mlm_methods() -> dict:
    from . import layers

    return dict(forward=layers.mlm_forward_for(_hf().DebertaV2ForMaskedLM, _head))
