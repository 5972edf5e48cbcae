"""Input embeddings with transformers' parameter names, and DeBERTa-v3's gradient-disentangled sharing.

``ElectraEmbeddings``   == transformers ``ElectraEmbeddings``: word + position + token type (size E)
                        -> LayerNorm(E) -> dropout.  (``embeddings_project`` E -> H lives in the backbone.)
``DebertaV2Embeddings`` == transformers ``DebertaV2Embeddings``: word (+ position if position_biased_input)
                        (+ token type if type_vocab_size > 0) -> embed_proj E -> H (no bias, if E != H)
                        -> LayerNorm(H) -> * attention_mask -> dropout.
``GDESEmbedding``       E_D = stop_grad(E_G) + E_delta (E_delta zero-initialised), a drop-in for nn.Embedding.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _validate
from ._plain import global_hooks, hooked
from .dropout import Dropout


class GDESEmbedding(nn.Module):
    """Gradient-disentangled embedding sharing (DeBERTa-v3): rows of ``base.weight.detach() + delta``.

    ``base`` (the generator's nn.Embedding) is held by reference, not registered, so it is neither a
    submodule nor saved twice; only ``delta`` [num_embeddings, embedding_dim] belongs to this module (so a GDES
    discriminator's own ``state_dict`` is not a whole discriminator: save the pair, or export it). The
    lookup gathers both tables (never materialising the sum), so the discriminator's loss reaches ``delta``
    only and the generator's table receives the MLM gradient only.
    """

    def __init__(self, base: nn.Embedding):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"base: expected the generator's nn.Embedding, got {type(base).__name__}")
        object.__setattr__(self, "_base", base)
        self.padding_idx = base.padding_idx
        self.delta = nn.Parameter(torch.zeros_like(base.weight, requires_grad=True))

    @property
    def base(self) -> nn.Embedding:
        return self._base

    def _base_weight(self) -> torch.Tensor:
        # E_G in delta's dtype and device: a discriminator moved on its own (.to(torch.bfloat16), .cuda()) leaves
        # the generator's table where it was (a no-op when the whole model moved)
        return self._base.weight.detach().to(self.delta)

    @property
    def weight(self) -> torch.Tensor:
        """The materialised discriminator table E_G + E_delta (what an export writes)."""
        return self._base_weight() + self.delta

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (F.embedding(ids, self._base_weight(), self.padding_idx)
                + F.embedding(ids, self.delta, self.padding_idx))


def positions(table: nn.Module, length: int, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The absolute position embeddings to add: rows 0 .. length-1 of ``table`` (an nn.Embedding or
    :class:`GDESEmbedding`) broadcast over the batch [length, E], or ``table(position_ids)`` [B, T, E]."""
    if position_ids is not None:
        return table(position_ids)
    _validate.seq_len_fits(length, table.weight.shape[0])  # a slice would be short, then fail to broadcast
    return first_rows(table, length)


def first_rows(table: nn.Module, n: int) -> torch.Tensor:
    """Rows 0 .. n-1 of an embedding ``table`` [n, E]: a slice of its weight (no gather) when the table is plain,
    else by calling it, so a wrapped (LoRA) or hooked table computes its own rows."""
    if type(table) in (nn.Embedding, GDESEmbedding) and not hooked(table) and global_hooks() is None:
        return table.weight[:n]
    return table(torch.arange(n, device=table.weight.device))  # a frozen table may hold its weight as a buffer


def word_table(vocab_size: int, embedding_size: int, pad_token_id: Optional[int]) -> nn.Embedding:
    """The word embeddings [vocab_size, embedding_size] with sizes and the padding id checked by name (torch's
    own errors named neither)."""
    _validate.integer_arg("vocab_size", vocab_size, 1)
    _validate.integer_arg("embedding_size", embedding_size, 1)
    if pad_token_id is not None and not 0 <= _validate.integer_arg("pad_token_id", pad_token_id) < vocab_size:
        raise ValueError(f"pad_token_id: expected an id in [0, vocab_size={vocab_size}), got {pad_token_id}")
    return nn.Embedding(vocab_size, embedding_size, padding_idx=pad_token_id)


def _check_table_sizes(max_position_embeddings: int, type_vocab_size: int) -> None:
    # a negative type_vocab_size became one row (ELECTRA) or no token types (DeBERTa) without a word
    _validate.integer_arg("max_position_embeddings", max_position_embeddings, 1)
    _validate.integer_arg("type_vocab_size", type_vocab_size, 0)


class ElectraEmbeddings(nn.Module):
    """ids int [B, T] -> float [B, T, E] (transformers ElectraEmbeddings): word + position + token-type tables
    [vocab_size / max_position_embeddings / max(type_vocab_size, 1), E], LayerNorm(``layer_norm_eps``), dropout."""

    def __init__(self, vocab_size: int, embedding_size: int, max_position_embeddings: int, type_vocab_size: int,
                 pad_token_id: int, layer_norm_eps: float, dropout: float):
        super().__init__()
        _check_table_sizes(max_position_embeddings, type_vocab_size)
        _validate.layer_norm_eps("layer_norm_eps", layer_norm_eps)
        self.word_embeddings = word_table(vocab_size, embedding_size, pad_token_id)
        self.position_embeddings = nn.Embedding(max_position_embeddings, embedding_size)
        self.token_type_embeddings = nn.Embedding(max(type_vocab_size, 1), embedding_size)
        self.LayerNorm = nn.LayerNorm(embedding_size, eps=layer_norm_eps)
        self.dropout = Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids int [B, T]; token_type_ids int [B, T] or None (type 0); ``position_ids`` int [B, T]
        (document-masked rows restart them) or None (0 .. T-1 in every row). ``attention_mask`` is not read (ELECTRA's
        embeddings do not mask; kept so both embeddings take one call). Returns [B, T, E] in the table's dtype."""
        x = self.word_embeddings(input_ids)
        if token_type_ids is None:  # type 0 everywhere: add one broadcast row instead of a [B, T] gather
            x = x + first_rows(self.token_type_embeddings, 1)[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        x = x + positions(self.position_embeddings, input_ids.shape[1], position_ids)
        return self.dropout(self.LayerNorm(x))


class DebertaV2Embeddings(nn.Module):
    """ids int [B, T] (+ attention_mask [B, T]) -> float [B, T, H] (transformers DebertaV2Embeddings): word table
    [vocab_size, E], absolute positions when ``position_biased_input``, token types when type_vocab_size > 0, a
    projection E -> H when they differ, LayerNorm(``layer_norm_eps``), the mask, dropout."""

    def __init__(self, vocab_size: int, embedding_size: int, hidden_size: int, max_position_embeddings: int,
                 type_vocab_size: int, position_biased_input: bool, pad_token_id: int, layer_norm_eps: float,
                 dropout: float, position_table: bool = False):
        """``position_table``: keep absolute position embeddings even when they are not added to the input
        (``position_biased_input=False``), for DeBERTa's Enhanced Mask Decoder (Microsoft's embeddings always
        hold them)."""
        super().__init__()
        _check_table_sizes(max_position_embeddings, type_vocab_size)
        _validate.layer_norm_eps("layer_norm_eps", layer_norm_eps)
        self.word_embeddings = word_table(vocab_size, embedding_size, pad_token_id)
        self.position_biased_input = position_biased_input
        self.position_embeddings = nn.Embedding(max_position_embeddings, embedding_size) \
            if position_biased_input or position_table else None
        self.token_type_embeddings = nn.Embedding(type_vocab_size, embedding_size) if type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(embedding_size, hidden_size, bias=False) if embedding_size != hidden_size else None
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As :class:`ElectraEmbeddings`, returning [B, T, H]; ``attention_mask`` bool / int [B, T] (nonzero = real
        token) or None zeroes the padded positions' vectors, as transformers does; ``position_ids`` are used where
        positions are added to the input."""
        x = self.word_embeddings(input_ids)
        if self.position_biased_input:
            x = x + positions(self.position_embeddings, input_ids.shape[1], position_ids)
        if self.token_type_embeddings is not None:
            x = x + (first_rows(self.token_type_embeddings, 1)[0] if token_type_ids is None
                     else self.token_type_embeddings(token_type_ids))
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.LayerNorm(x)
        if attention_mask is not None:  # transformers zeroes padded positions here
            # a float mask may be an additive 0 / -10000 bias, which as a factor zeroed every real token
            _validate.mask_dtype("attention_mask", attention_mask, "[B, T], 1 = real token, 0 = padding")
            _validate.same_shape("attention_mask", attention_mask, "input_ids", input_ids)
            x = x * (attention_mask != 0).unsqueeze(-1).to(x.dtype)
        return self.dropout(x)
