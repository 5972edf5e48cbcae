"""Post-LayerNorm transformer encoder (BERT / ELECTRA / DeBERTa-v2) with transformers' parameter names.

A layer is ``attention.self`` (standard: query / key / value; disentangled: query_proj / key_proj /
value_proj [+ pos_key_proj / pos_query_proj]), ``attention.output`` (dense, LayerNorm), ``intermediate.dense``
and ``output`` (dense, LayerNorm) -- key for key what ``ElectraLayer`` and ``DebertaV2Layer`` hold, so
checkpoints map one to one. ``DisentangledEncoder`` adds ``rel_embeddings`` and its ``LayerNorm``
(``DebertaV2Encoder``).

Masks: ``key_mask`` is bool [B, T] (True = real token) or None; padded keys get no attention weight.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _fused

_ACTS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "swish": F.silu,
         "tanh": torch.tanh}


def activation(name: str):
    if name not in _ACTS:
        raise ValueError(f"hidden_act: expected one of {tuple(_ACTS)}, got {name!r}")
    return _ACTS[name]


class StandardSelfAttention(nn.Module):
    """[B, T, H] -> [B, T, H] with ``scaled_dot_product_attention`` (transformers ElectraSelfAttention)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout_p = dropout

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], seed: Optional[int] = None) -> torch.Tensor:
        B, T, H = x.shape
        # one [H, 3H] projection instead of three: a single larger GEMM is faster on CPU
        w = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        b = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        q, k, v = F.linear(x, w, b).view(B, T, 3, self.num_heads, H // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, T, H)


class DisentangledSelfAttention(nn.Module):
    """DeBERTa-v2 attention through ``electra_fast.disentangled_attention`` (transformers parameter names).

    ``rel_embeddings`` [2k, H] (already LayerNorm-ed by the encoder) are projected by the key / query
    projections (``share_att_key``) or by ``pos_key_proj`` / ``pos_query_proj``.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, hidden_dropout: float,
                 pos_att_type: Sequence[str], share_att_key: bool, position_buckets: int,
                 max_relative_positions: int):
        super().__init__()
        self.num_heads = num_heads
        self.query_proj = nn.Linear(hidden_size, hidden_size)
        self.key_proj = nn.Linear(hidden_size, hidden_size)
        self.value_proj = nn.Linear(hidden_size, hidden_size)
        self.pos_att_type = tuple(pos_att_type)
        self.share_att_key = share_att_key
        if not share_att_key:
            if "c2p" in self.pos_att_type:
                self.pos_key_proj = nn.Linear(hidden_size, hidden_size)
            if "p2c" in self.pos_att_type:
                self.pos_query_proj = nn.Linear(hidden_size, hidden_size)
        self.position_buckets = position_buckets
        self.max_relative_positions = max_relative_positions
        self.pos_dropout = nn.Dropout(hidden_dropout)
        self.dropout_p = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [..., T, H] -> [..., heads, T, D]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(-2, -3)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], rel_embeddings: torch.Tensor,
                seed: Optional[int] = None) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = (self._heads(lin(x)) for lin in (self.query_proj, self.key_proj, self.value_proj))
        rel = self.pos_dropout(rel_embeddings)
        pos_key = pos_query = None
        if "c2p" in self.pos_att_type:
            pos_key = self._heads((self.key_proj if self.share_att_key else self.pos_key_proj)(rel))
        if "p2c" in self.pos_att_type:
            pos_query = self._heads((self.query_proj if self.share_att_key else self.pos_query_proj)(rel))
        p = self.dropout_p if self.training else 0.0
        out = _fused.disentangled_attention(
            q, k, v, pos_key, pos_query, attention_mask=key_mask, position_buckets=self.position_buckets,
            max_relative_positions=self.max_relative_positions, dropout_p=p, seed=seed if p > 0 else None)
        return out.transpose(1, 2).reshape(B, T, H)


class _AddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual) (transformers *SelfOutput / *Output)."""

    def __init__(self, d_in: int, d_out: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, self_attention: nn.Module, hidden_size: int, eps: float, dropout: float):
        super().__init__()
        self.self = self_attention
        self.output = _AddNorm(hidden_size, hidden_size, eps, dropout)


class _Intermediate(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class EncoderLayer(nn.Module):
    """One post-LN transformer layer; ``attention.self`` is standard or disentangled."""

    def __init__(self, self_attention: nn.Module, hidden_size: int, intermediate_size: int, act: str,
                 eps: float, dropout: float):
        super().__init__()
        self.attention = _Attention(self_attention, hidden_size, eps, dropout)
        self.intermediate = _Intermediate(hidden_size, intermediate_size, act)
        self.output = _AddNorm(intermediate_size, hidden_size, eps, dropout)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], seed: Optional[int] = None,
                **attn_kw) -> torch.Tensor:
        a = self.attention.output(self.attention.self(x, key_mask, seed=seed, **attn_kw), x)
        return self.output(self.intermediate(a), a)


def _layer_seed(seed: Optional[int], i: int) -> Optional[int]:
    return None if seed is None else (seed + i) % (2 ** 63)


class Encoder(nn.Module):
    """``layer`` ModuleList of standard-attention layers (transformers ElectraEncoder)."""

    def __init__(self, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int, act: str,
                 eps: float, dropout: float, attention_dropout: float):
        super().__init__()
        self.layer = nn.ModuleList(
            EncoderLayer(StandardSelfAttention(hidden_size, num_heads, attention_dropout), hidden_size,
                         intermediate_size, act, eps, dropout) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], seed: Optional[int] = None) -> torch.Tensor:
        for i, layer in enumerate(self.layer):
            x = layer(x, key_mask, seed=_layer_seed(seed, i))
        return x


class DisentangledEncoder(nn.Module):
    """``layer`` + ``rel_embeddings`` [2k, H] + ``LayerNorm`` on them (transformers DebertaV2Encoder)."""

    def __init__(self, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int, act: str,
                 eps: float, dropout: float, attention_dropout: float, pos_att_type: Sequence[str],
                 share_att_key: bool, position_buckets: int, max_relative_positions: int, span: int,
                 norm_rel_ebd: str):
        super().__init__()
        self.layer = nn.ModuleList(
            EncoderLayer(DisentangledSelfAttention(hidden_size, num_heads, attention_dropout, dropout, pos_att_type,
                                                   share_att_key, position_buckets, max_relative_positions),
                         hidden_size, intermediate_size, act, eps, dropout) for _ in range(num_layers))
        self.rel_embeddings = nn.Embedding(2 * span, hidden_size)
        norms = [s.strip() for s in norm_rel_ebd.lower().split("|")]
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps) if "layer_norm" in norms else None

    def rel_embedding(self) -> torch.Tensor:
        rel = self.rel_embeddings.weight
        return rel if self.LayerNorm is None else self.LayerNorm(rel)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], seed: Optional[int] = None) -> torch.Tensor:
        rel = self.rel_embedding()
        for i, layer in enumerate(self.layer):
            x = layer(x, key_mask, seed=_layer_seed(seed, i), rel_embeddings=rel)
        return x
