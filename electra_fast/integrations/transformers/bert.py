"""electra_fast inside transformers' BERT, RoBERTa and ELECTRA models (one layer layout, three module files).

Per layer: ``attention.self`` (query / key / value) runs ``electra_fast.nn.encoder.standard_attention`` (SDPA, or
the fused attention op with Philox dropout when training on CPU); ``attention.output`` and ``output`` run the
fused dropout + add + LayerNorm; the layer's ``feed_forward_chunk`` runs ``gelu_mlp`` + that add-norm;
``*ForMaskedLM`` with labels computes the loss at the labelled rows only (``layers.mlm_forward_for``).

Training with attention dropout on CPU uses the fused attention op (its Philox dropout regenerates the mask in the
backward instead of storing [B, heads, T, T] probabilities) for batches without padding; a padded batch keeps SDPA
(the op leaves padded query rows 0, transformers attends from them). The fused dropout masks are drawn from the
Philox stream, seeded from torch's generator: reproducible under ``torch.manual_seed``, not the same masks as
transformers' (equal in distribution).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...nn.encoder import standard_attention
from . import layers
from .patching import Rule, fallback

FAMILIES = ("bert", "roberta", "electra")
SERVED_ATTENTION = ("eager", "sdpa", None)  # None: a module used standalone (transformers then runs eager)


@functools.lru_cache(maxsize=None)
def _modeling(family: str):
    import importlib

    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


PREFIXES = {"bert": "Bert", "roberta": "Roberta", "electra": "Electra"}


def _classes(suffix: str) -> tuple:
    return tuple(getattr(_modeling(f), PREFIXES[f] + suffix) for f in FAMILIES)


# -------------------------------------------------------------------------------------------- attention
def _call_unsupported(self, hidden_states, attention_mask, cache, kwargs) -> "tuple[str | None, object]":
    """(why transformers' code must serve this call, or None; the bool [B, T] key mask or None)."""
    capture = layers.graph_capture()
    if capture is not None:
        return capture, None
    if kwargs.get("output_attentions") or getattr(self.config, "output_attentions", False):
        return "output_attentions=True (the fused attention builds no probabilities)", None
    if cache is not None or kwargs.get("encoder_hidden_states") is not None:
        return "a key / value cache or encoder_hidden_states", None
    if kwargs.get("head_mask") is not None:
        return "a head_mask", None
    impl = getattr(self.config, "_attn_implementation", None)
    if impl not in SERVED_ATTENTION:
        return f"the attention implementation {impl!r} (served: 'eager', 'sdpa')", None
    reason = (layers.not_plain(query=self.query, key=self.key, value=self.value)
              or layers.not_called(dropout=self.dropout))
    if reason is not None:
        return reason, None
    if impl != "sdpa" and attention_mask is not None and attention_mask.dtype == torch.bool:
        # transformers makes additive float masks for eager, which adds a bool one to the scores as +1 / +0
        return "a bool attention mask under eager attention (transformers adds it to the scores)", None
    servable, key_mask = layers.padding_key_mask(attention_mask, *hidden_states.shape[:2])
    if not servable:
        return "an attention mask that is not a padding mask", None
    return None, key_mask


def attention_forward(self, hidden_states, *args, **kwargs):
    """``*SelfAttention.forward``: hidden_states [B, T, H] -> (context [B, T, H], None). ``(attention_mask, cache)``
    positionally or by name; transformers' code gets the arguments as they came (its cache argument was
    ``past_key_values`` in earlier 5.x releases: a fallback that passed ``cache`` raised "multiple values")."""
    attention_mask = args[0] if args else kwargs.get("attention_mask")
    cache = args[1] if len(args) > 1 else kwargs.get("cache", kwargs.get("past_key_values"))
    reason, key_mask = _call_unsupported(self, hidden_states, attention_mask, cache, kwargs)
    if reason is not None:
        fallback(self, reason)
        return type(self).forward(self, hidden_states, *args, **kwargs)
    p = self.dropout.p if self.training else 0.0
    padded = key_mask is not None and not bool(key_mask.all())
    # the fused dropout op leaves padded query rows 0 where transformers attends from them as from any row (a
    # question-answering loss reads them): padded batches keep SDPA, unpadded ones (pretraining) get the op
    context = standard_attention(hidden_states, self.query, self.key, self.value, self.num_attention_heads,
                                 key_mask if padded else None, p, fused_dropout=not padded)
    if padded and getattr(self.config, "_attn_implementation", None) != "sdpa":
        # eager's additive mask (dtype min on every key of a row with none) leaves uniform weights there: the mean
        # of V, i.e. value of the mean input (sdpa's bool mask gives what standard_attention gives)
        keyless = ~key_mask.any(dim=-1)
        if bool(keyless.any()):
            mean_value = self.value(hidden_states.mean(dim=-2, keepdim=True)).to(context.dtype)
            context = torch.where(keyless[:, None, None], mean_value, context)
    return context, None


def _attention_unsupported(module) -> "str | None":
    if module.is_decoder or module.is_causal:
        return "attention: a decoder (causal) self-attention"
    if module.all_head_size != module.query.in_features:
        return "attention: num_attention_heads * head size != hidden_size"
    reason = (layers.not_plain(query=module.query, key=module.key, value=module.value)
              or layers.not_called(dropout=module.dropout))
    if reason is not None:
        return f"attention: {reason}"
    impl = getattr(module.config, "_attn_implementation", None)
    if impl not in SERVED_ATTENTION:
        return f"attention: the attention implementation {impl!r} (served: 'eager', 'sdpa')"
    return None


# ----------------------------------------------------------------------------------------------- heads
def _bert_head(model):
    p = model.cls.predictions
    return p.transform, p.decoder, p.decoder.weight, p.decoder.bias


def _roberta_head(model):
    h = model.lm_head
    return (lambda x: h.layer_norm(F.gelu(h.dense(x)))), h.decoder, h.decoder.weight, h.decoder.bias


def _electra_head(model):
    g = model.generator_lm_head
    return model.generator_predictions, g, g.weight, g.bias


HEADS = {"bert": ("BertForMaskedLM", _bert_head), "roberta": ("RobertaForMaskedLM", _roberta_head),
         "electra": ("ElectraForMaskedLM", _electra_head)}


@functools.lru_cache(maxsize=None)
def _mlm_methods(cls: type) -> dict:
    family = next(f for f, (name, _) in HEADS.items() if getattr(_modeling(f), name) is cls)
    return dict(forward=layers.mlm_forward_for(cls, HEADS[family][1]))


def _mlm_classes() -> tuple:
    return tuple(getattr(_modeling(f), name) for f, (name, _) in HEADS.items())


def _head_methods(model) -> dict:
    cls = next(c for c in type(model).__mro__ if c in _mlm_classes())
    return _mlm_methods(cls)


def _feed_forward_chunk(self, attention_output):
    return layers.feed_forward(self, attention_output)


def rules() -> list:
    return [
        Rule("attention", lambda: _classes("SelfAttention"), methods=lambda m: dict(forward=attention_forward),
             unsupported=_attention_unsupported),
        Rule("layer_norm", lambda: _classes("SelfOutput") + _classes("Output"),
             methods=lambda m: dict(forward=layers.add_norm_forward),
             unsupported=layers.layer_norm_unsupported),
        Rule("mlp", lambda: _classes("Layer"), methods=lambda m: dict(feed_forward_chunk=_feed_forward_chunk),
             unsupported=layers.feed_forward_unsupported),
        Rule("mlm_head", _mlm_classes, methods=_head_methods,
             unsupported=lambda m: _head_methods(m)["forward"].unsupported(m)),
    ]


def pretrained_classes() -> list:
    """Each family's ``*PreTrainedModel`` (``patching.apply_to_transformers``)."""
    return list(_classes("PreTrainedModel"))
