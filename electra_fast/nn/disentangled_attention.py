"""Drop-in fused DeBERTa-v2/v3 attention for transformers models.

``DisentangledSelfAttention(config)`` has the constructor, parameter names and forward signature of
``transformers.models.deberta_v2.modeling_deberta_v2.DisentangledSelfAttention`` and computes the same
function with :func:`electra_fast.disentangled_attention` (no [B, H, T, T] scores, no [T, T] position table).
``patch_deberta_v2(model)`` swaps it into every layer of a transformers DebertaV2 model in place (same
Parameter objects) and makes the encoder pass the [B, T] padding mask instead of building [B, 1, T, T] and
the relative-position table; ``unpatch_deberta_v2(model)`` restores the original modules.

Differences from transformers (only where transformers' output is not meaningful): rows of padded queries
are 0 (transformers returns the mean of V there); attention dropout draws from the Philox stream (seeded
from torch's generator) instead of ``nn.Dropout``. ``output_attentions=True``, a ``query_states`` of another
length than ``hidden_states``, a non-standard ``relative_pos`` or a mask that is not a padding mask run
transformers' own computation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.disentangled_attention import disentangled_attention
from ..reference.disentangled_attention import attention_span, relative_slots
from .dropout import draw_seed


def _hf():
    from transformers.models.deberta_v2 import modeling_deberta_v2  # lazy: transformers is optional

    return modeling_deberta_v2



class DisentangledSelfAttention(nn.Module):
    """Fused drop-in for transformers' DebertaV2 ``DisentangledSelfAttention`` (same ``config`` argument)."""

    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"config.hidden_size: expected a multiple of num_attention_heads ({config.num_attention_heads}), "
                f"got {config.hidden_size}")
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = getattr(config, "attention_head_size",
                                           config.hidden_size // config.num_attention_heads)
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query_proj = nn.Linear(config.hidden_size, self.all_head_size, bias=True)
        self.key_proj = nn.Linear(config.hidden_size, self.all_head_size, bias=True)
        self.value_proj = nn.Linear(config.hidden_size, self.all_head_size, bias=True)
        self.share_att_key = getattr(config, "share_att_key", False)
        self.pos_att_type = config.pos_att_type if config.pos_att_type is not None else []
        self.relative_attention = getattr(config, "relative_attention", False)
        if self.relative_attention:
            self.position_buckets = getattr(config, "position_buckets", -1)
            self.max_relative_positions = getattr(config, "max_relative_positions", -1)
            if self.max_relative_positions < 1:
                self.max_relative_positions = config.max_position_embeddings
            self.pos_ebd_size = attention_span(self.position_buckets, self.max_relative_positions)
            self.pos_dropout = nn.Dropout(config.hidden_dropout_prob)
            if not self.share_att_key:
                if "c2p" in self.pos_att_type:
                    self.pos_key_proj = nn.Linear(config.hidden_size, self.all_head_size, bias=True)
                if "p2c" in self.pos_att_type:
                    self.pos_query_proj = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    @classmethod
    def from_transformers(cls, module: nn.Module) -> "DisentangledSelfAttention":
        """A fused module sharing ``module``'s submodules (hence its Parameter objects) and settings."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, value in vars(module).items():
            if not name.startswith("_") and name != "training":
                setattr(new, name, value)
        for name, child in module.named_children():
            setattr(new, name, child)
        new.train(module.training)
        return new

    # transformers' helpers, used by its own computation on the fallback path
    def transpose_for_scores(self, x, attention_heads) -> torch.Tensor:
        return _hf().DisentangledSelfAttention.transpose_for_scores(self, x, attention_heads)

    def disentangled_attention_bias(self, query_layer, key_layer, relative_pos, rel_embeddings, scale_factor):
        return _hf().DisentangledSelfAttention.disentangled_attention_bias(
            self, query_layer, key_layer, relative_pos, rel_embeddings, scale_factor)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H * D] -> [B, H, T, D] (contiguous)."""
        return x.view(*x.shape[:-1], self.num_attention_heads, -1).transpose(-3, -2).contiguous()

    def _pos(self, proj: nn.Module, rel: torch.Tensor) -> torch.Tensor:
        """[2k, hidden] -> [H, 2k, D]."""
        return proj(rel).view(rel.shape[0], self.num_attention_heads, -1).transpose(0, 1).contiguous()

    def _key_mask(self, attention_mask: Optional[torch.Tensor], B: int, T: int) -> "tuple[bool, object]":
        """(fusable, [B, T] key mask or None) from a [B, T], [B, T, T] or [B, 1, T, T] mask."""
        if attention_mask is None:
            return True, None
        if attention_mask.dim() <= 2:
            return True, attention_mask != 0 if attention_mask.is_floating_point() else attention_mask
        m = attention_mask.bool()
        m = m.reshape(B, T, T) if m.dim() == 4 and m.shape[1] == 1 else m
        if m.dim() != 3 or m.shape != (B, T, T):
            return False, None
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
        """hidden_states [B, T, hidden]; attention_mask [B, T] (1 = real token) or transformers' [B, 1, T, T];
        returns ``(context [B, T, H * D], None)`` (``(context, probabilities)`` with output_attentions)."""
        B, T = hidden_states.shape[0], hidden_states.shape[-2]
        fusable, key_mask = self._key_mask(attention_mask, B, T)
        if (output_attentions or not fusable or (query_states is not None and query_states.shape != hidden_states.shape)
                or not self._standard_relative_pos(relative_pos, T)):
            return self._transformers_forward(hidden_states, attention_mask, output_attentions, query_states,
                                              relative_pos, rel_embeddings)
        q_in = hidden_states if query_states is None else query_states
        q = self._heads(self.query_proj(q_in))
        k = self._heads(self.key_proj(hidden_states))
        v = self._heads(self.value_proj(hidden_states))
        c2p = "c2p" in self.pos_att_type
        p2c = "p2c" in self.pos_att_type
        pos_key = pos_query = None
        buckets, max_rel = 256, 512
        if self.relative_attention and (c2p or p2c):
            rel = self.pos_dropout(rel_embeddings)[: 2 * self.pos_ebd_size]
            if c2p:
                pos_key = self._pos(self.key_proj if self.share_att_key else self.pos_key_proj, rel)
            if p2c:
                pos_query = self._pos(self.query_proj if self.share_att_key else self.pos_query_proj, rel)
            buckets, max_rel = self.position_buckets, self.max_relative_positions
        # transformers divides by sqrt(D * (1 + #terms)) computed in fp32 and rounded to the activation dtype
        # (it counts pos_att_type even without relative attention)
        factor = 1 + int(c2p) + int(p2c)
        denom = torch.sqrt(torch.tensor(q.shape[-1], dtype=torch.float) * factor).to(q.dtype)
        p = self.dropout.p if self.training else 0.0
        seed = draw_seed() if p > 0 else None
        out = disentangled_attention(q, k, v, pos_key, pos_query, attention_mask=key_mask,
                                     position_buckets=buckets, max_relative_positions=max_rel, dropout_p=p,
                                     seed=seed, scale=1.0 / float(denom))
        context = out.transpose(1, 2).reshape(B, T, self.all_head_size)
        return (context, None)


def _encoder_get_attention_mask(self, attention_mask):
    """Patched DebertaV2Encoder.get_attention_mask: keep a [B, T] padding mask as it is."""
    if attention_mask.dim() <= 2:
        return attention_mask
    return type(self).get_attention_mask(self, attention_mask)


def _encoder_get_rel_pos(self, hidden_states, query_states=None, relative_pos=None):
    """Patched DebertaV2Encoder.get_rel_pos: the fused attention builds its own slots (no [T, T] table)."""
    return relative_pos


def patch_deberta_v2(model: nn.Module) -> nn.Module:
    """Replace the attention of every layer of a transformers DebertaV2 model (any head) in place.

    The new modules share the original submodules, so every Parameter object is kept (an optimizer built
    before patching keeps working). Returns ``model``; :func:`unpatch_deberta_v2` restores it.
    """
    hf = _hf()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    found = False
    for module in list(model.modules()):
        if isinstance(module, hf.DebertaV2Attention) and isinstance(module.self, hf.DisentangledSelfAttention):
            fused = DisentangledSelfAttention.from_transformers(module.self)
            fused._electra_fast_original = [module.self]  # a list: not registered as a submodule
            module.self = fused
            found = True
        elif isinstance(module, hf.DebertaV2Encoder) and "get_rel_pos" not in vars(module):
            module.get_attention_mask = _encoder_get_attention_mask.__get__(module)
            module.get_rel_pos = _encoder_get_rel_pos.__get__(module)
            found = True
        elif isinstance(module, DisentangledSelfAttention):
            found = True  # already patched
    if not found:
        raise ValueError(f"model: expected a transformers DebertaV2 model, found no DebertaV2 attention in "
                         f"{type(model).__name__}")
    return model


def unpatch_deberta_v2(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_deberta_v2` in place (the original modules come back with the same Parameters)."""
    hf = _hf()
    for module in list(model.modules()):
        if isinstance(module, hf.DebertaV2Attention) and isinstance(module.self, DisentangledSelfAttention):
            original = getattr(module.self, "_electra_fast_original", None)
            if original is None:
                raise ValueError("model: a fused attention module was not installed by patch_deberta_v2")
            original[0].train(module.self.training)
            module.self = original[0]
        elif isinstance(module, hf.DebertaV2Encoder):
            for name in ("get_attention_mask", "get_rel_pos"):
                vars(module).pop(name, None)
    return model
