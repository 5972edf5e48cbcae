"""DeBERTa-v2/v3 disentangled self-attention as a module, on the fused op.

``DisentangledSelfAttention(hidden_size, num_heads, ...)`` holds the parameters of transformers'
``modeling_deberta_v2.DisentangledSelfAttention`` under the same names (query_proj / key_proj / value_proj
[+ pos_key_proj / pos_query_proj], so checkpoints map one to one) and computes the same function with
:func:`electra_fast.disentangled_attention` (no [B, H, T, T] scores, no [T, T] position table).

Differences from transformers (only where transformers' output is not meaningful): rows of padded queries are 0
(transformers returns the mean of V there); attention dropout draws from the Philox stream (seeded from torch's
generator) instead of ``nn.Dropout``, and so does the relative embeddings' dropout (``electra_fast.nn.Dropout``).

This module knows nothing about transformers: swapping it into a transformers model (and transformers' own
signature, masks and fallbacks) is ``electra_fast.integrations.transformers.deberta_v2``.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import _seed, _validate
from ..ops.disentangled_attention import disentangled_attention
from ..reference.disentangled_attention import attention_span
from ._moved import moved
from .dropout import Dropout
from .packing import Packed

POSITION_TERMS = ("c2p", "p2c")


def _position_terms(pos_att_type: Union[str, Sequence[str], None]) -> list:
    """["c2p", "p2c"]-style list from a sequence or transformers' "p2c|c2p" string."""
    if pos_att_type is None:
        return []
    if isinstance(pos_att_type, str):  # as DebertaV2Config reads it
        terms = [t.strip() for t in pos_att_type.lower().split("|") if t.strip()]
    elif isinstance(pos_att_type, (list, tuple)):
        terms = list(pos_att_type)
    else:
        raise TypeError(f"pos_att_type: expected a list of terms from {POSITION_TERMS} or a 'p2c|c2p' string, got "
                        f"{type(pos_att_type).__name__}")
    if any(t not in POSITION_TERMS for t in terms):
        raise ValueError(f"pos_att_type: expected terms from {POSITION_TERMS}, got {pos_att_type!r}")
    return terms


def applied_dropout(module: nn.Module) -> Optional[float]:
    """The drop probability the fused op applies for the attention's dropout ``module``: its ``p`` while it is in
    training mode (its own flag, as it would apply itself: a user may switch one dropout off), 0 for an
    nn.Identity (dropout removed), None for any other module (the op cannot apply it)."""
    if isinstance(module, nn.Identity):
        return 0.0
    if isinstance(module, nn.Dropout):
        return float(module.p) if module.training else 0.0
    return None


def _init_signature(cls) -> inspect.Signature:
    """``cls.__init__``'s parameters without self: what inspect.signature / help() show for the class (its
    ``__new__``, for the deprecated config form, hid them behind (*args, **kwargs))."""
    sig = inspect.signature(cls.__init__)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


class DisentangledSelfAttention(nn.Module):
    """hidden_states [B, T, hidden] -> context [B, T, num_heads * head_size], DeBERTa attention.

    Args:
        hidden_size, num_heads: the input width and the number of heads.
        head_size: per-head width D (default hidden_size // num_heads, which must then divide evenly).
        relative_attention: add the relative-position terms of ``pos_att_type`` (False: content only, as
            transformers, whose scale still counts ``pos_att_type``).
        position_buckets, max_relative_positions: as in ``DebertaV2Config`` (k = position_buckets if > 0 else
            max_relative_positions; ``rel_embeddings`` must hold at least 2k rows). Checked by the op.
        pos_att_type: the position terms, from ("c2p", "p2c") (or transformers' "p2c|c2p").
        share_att_key: project the relative embeddings with key_proj / query_proj instead of their own
            pos_key_proj (c2p) / pos_query_proj (p2c).
        attention_dropout: dropout on the attention probabilities (Philox, regenerated in the backward).
        pos_dropout: dropout on the relative embeddings (transformers' ``hidden_dropout_prob``).

    Defaults: DeBERTa-v3's (256 buckets, 512 positions, c2p + p2c, shared keys), no dropout. Parameters and their
    creation order are transformers' (same names, same initialisation under one seed).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__signature__ = _init_signature(cls)

    def __new__(cls, *args, **kwargs):
        # Deprecated: DisentangledSelfAttention(config) built the transformers drop-in, which now lives in
        # integrations/. Python then runs that class's __init__(config) on the instance returned here.
        if cls is DisentangledSelfAttention and args and hasattr(args[0], "num_attention_heads"):
            return super().__new__(moved("DisentangledSelfAttention(config)", "FusedDisentangledSelfAttention"))
        return super().__new__(cls)

    def __init__(self, hidden_size: int, num_heads: int, *, head_size: Optional[int] = None,
                 relative_attention: bool = True, position_buckets: int = 256, max_relative_positions: int = 512,
                 pos_att_type: Union[str, Sequence[str], None] = POSITION_TERMS, share_att_key: bool = True,
                 attention_dropout: float = 0.0, pos_dropout: float = 0.0):
        super().__init__()
        hidden_size = _validate.integer_arg("hidden_size", hidden_size, 1)
        self.num_attention_heads = _validate.integer_arg("num_heads", num_heads, 1)
        if head_size is None:
            if hidden_size % num_heads != 0:
                raise ValueError(f"hidden_size: expected a multiple of num_heads ({num_heads}) when head_size is "
                                 f"not given, got {hidden_size}")
            head_size = hidden_size // num_heads
        # transformers' attribute names: its own forward reads them (integrations/transformers/deberta_v2.py)
        self.attention_head_size = _validate.integer_arg("head_size", head_size, 1)
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query_proj = nn.Linear(hidden_size, self.all_head_size, bias=True)
        self.key_proj = nn.Linear(hidden_size, self.all_head_size, bias=True)
        self.value_proj = nn.Linear(hidden_size, self.all_head_size, bias=True)
        self.share_att_key = bool(share_att_key)
        self.pos_att_type = _position_terms(pos_att_type)
        self.relative_attention = bool(relative_attention)
        if self.relative_attention:
            self.position_buckets = _validate.integer_arg("position_buckets", position_buckets)
            self.max_relative_positions = _validate.integer_arg("max_relative_positions", max_relative_positions, 1)
            if self.pos_att_type:  # the op refuses these at every forward: say it where the module is built
                _validate.log_buckets(self.position_buckets, self.max_relative_positions)
            self.pos_ebd_size = attention_span(position_buckets, max_relative_positions)
            # the library's dropout (an nn.Dropout): seeded from torch's generator, so a compiled model draws the masks
            # the eager one draws (torch's own under Inductor drew from Inductor's generator, shifting every seed)
            self.pos_dropout = Dropout(_validate.probability("pos_dropout", pos_dropout, one=True))
            if not self.share_att_key:
                if "c2p" in self.pos_att_type:
                    self.pos_key_proj = nn.Linear(hidden_size, self.all_head_size, bias=True)
                if "p2c" in self.pos_att_type:
                    self.pos_query_proj = nn.Linear(hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(_validate.probability("attention_dropout", attention_dropout, one=True))

    @classmethod
    def from_transformers(cls, module: nn.Module) -> "DisentangledSelfAttention":
        """Deprecated here: ``FusedDisentangledSelfAttention.from_transformers`` in
        ``electra_fast.integrations.transformers.deberta_v2`` (which overrides this)."""
        return moved("DisentangledSelfAttention.from_transformers",
                     "FusedDisentangledSelfAttention.from_transformers")(module)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H * D] -> [B, H, T, D] (contiguous)."""
        return x.view(*x.shape[:-1], self.num_attention_heads, -1).transpose(-3, -2).contiguous()

    def _pos(self, proj: nn.Module, rel: torch.Tensor) -> torch.Tensor:
        """[2k, hidden] -> [H, 2k, D]."""
        return proj(rel).view(rel.shape[0], self.num_attention_heads, -1).transpose(0, 1).contiguous()

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                rel_embeddings: Optional[torch.Tensor] = None,
                query_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden_states [B, T, hidden] float; attention_mask [B, T] bool / int (1 = real token) or None, or a
        :class:`~electra_fast.nn.packing.Packed` layout with hidden_states [N, hidden] (an unpadded batch: returns
        [N, num_heads * head_size]);
        rel_embeddings [>= 2k, hidden] (needed with relative attention and position terms); query_states
        [B, T, hidden] or None (queries from hidden_states). Returns [B, T, num_heads * head_size]."""
        packed = attention_mask if isinstance(attention_mask, Packed) else None  # [N, hidden] real tokens
        if packed is not None:
            attention_mask = None
        _validate.tensor("hidden_states", hidden_states)
        if hidden_states.dim() != (2 if packed is not None else 3):
            raise ValueError("hidden_states: expected [B, T, hidden] (or [N, hidden] with a Packed layout as "
                             f"attention_mask), got shape {tuple(hidden_states.shape)}")
        B, T = hidden_states.shape[0], hidden_states.shape[-2]
        if T == 0 or B == 0:
            raise ValueError("hidden_states: expected at least one token and one row, got shape "
                             f"{tuple(hidden_states.shape)}")
        if query_states is not None and query_states.shape != hidden_states.shape:
            raise ValueError(f"query_states: expected shape {tuple(hidden_states.shape)} (that of hidden_states), "
                             f"got {tuple(query_states.shape)}")
        q_in = hidden_states if query_states is None else query_states
        heads = self._heads if packed is None else (lambda t: t.view(t.shape[0], self.num_attention_heads, -1))
        q = heads(self.query_proj(q_in))
        k = heads(self.key_proj(hidden_states))
        v = heads(self.value_proj(hidden_states))
        c2p = "c2p" in self.pos_att_type
        p2c = "p2c" in self.pos_att_type
        pos_key = pos_query = None
        buckets, max_rel = 256, 512
        if self.relative_attention and (c2p or p2c):
            if rel_embeddings is None or rel_embeddings.dim() != 2 or rel_embeddings.shape[0] < 2 * self.pos_ebd_size:
                got = None if rel_embeddings is None else tuple(rel_embeddings.shape)
                raise ValueError(f"rel_embeddings: expected [>= {2 * self.pos_ebd_size}, hidden] (2k rows), got {got}")
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
        p = applied_dropout(self.dropout)
        if p is None:
            raise TypeError(f"dropout: expected an nn.Dropout or nn.Identity (what the fused op applies), got "
                            f"{type(self.dropout).__name__}")
        seed = _seed.draw() if p > 0 else None
        packed_args = {} if packed is None else dict(cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen)
        out = disentangled_attention(q, k, v, pos_key, pos_query, attention_mask=attention_mask,
                                     position_buckets=buckets, max_relative_positions=max_rel, dropout_p=p,
                                     seed=seed, scale=1.0 / float(denom), **packed_args)
        if packed is not None:
            return out.reshape(out.shape[0], self.all_head_size)
        return out.transpose(1, 2).reshape(B, T, self.all_head_size)


DisentangledSelfAttention.__signature__ = _init_signature(DisentangledSelfAttention)
