"""Unpadded encoder batches: the real tokens of a right-padded [B, T] batch as one [N, ...] tensor, and back.

A padded batch spends every layer's projections, feed-forward block, norms and attention on its padding (GLUE-like
batches are more than half padding). The encoders unpad once after the embeddings, run every layer on the
N = sum of lengths real tokens (attention as packed sequences: ``disentangled_attention(..., cu_seqlens=...)``,
cost ~ sum L_i^2), and pad the output back with zeros at the padded positions (whose values a padded run leaves
meaningless anyway: nothing reads them).

Only for masks that are a prefix per row (right padding): a sequence's relative positions are then those it has in
the padded row. Left padding or holes keep the padded path. Eager CPU only (C++ / reference attention): torch.compile
traces the padded path (the unpadded one reads the lengths on the host), and the packed Triton kernels have not run on
a GPU yet.

Document-masked rows (``document_ids``, the pretraining job's ``--packing doc-sentences``): a row holds several
documents back to back; each maximal run of equal ids is its own packed sequence, so attention never crosses a
document boundary, relative positions count from the document's first token and :func:`document_positions` restarts
the absolute ones. This layout has no padded equivalent (the attention ops take key-padding masks only), so it is
packed on every device and backend, also under torch.compile (a graph break: the offsets are read on the host).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import _backend, _cpu, _validate


@dataclasses.dataclass(frozen=True)
class Packed:
    """Where the real tokens of a [batch, length] batch are.

    index       int64 [N]: flat positions ``b * length + t`` of the real tokens, row by row
    cu_seqlens  int32 [batch + 1]: offsets of each row's tokens in the packed [N, ...] layout
    max_seqlen  the longest row
    """
    index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    length: int

    @property
    def dense(self) -> bool:
        """No padding (document-masked rows filled to the end): unpad / pad are reshapes."""
        return self.index.numel() == self.batch * self.length

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, length, ...] -> [N, ...]."""
        flat = x.reshape(self.batch * self.length, *x.shape[2:])
        return flat if self.dense else flat.index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [batch, length, ...], zeros at the padded positions."""
        if self.dense:
            return x.view(self.batch, self.length, *x.shape[1:])
        out = x.new_zeros(self.batch * self.length, *x.shape[1:])
        return out.index_copy(0, self.index, x).view(self.batch, self.length, *x.shape[1:])


@dataclasses.dataclass(frozen=True)
class Documents:
    """Document-masked rows, laid out once per batch (:func:`document_layout`) for every encoder that reads them
    (a pretraining step's generator and discriminator: one set of host syncs, not two).

    positions  int64 [B, T]: :func:`document_positions`
    packed     the :class:`Packed` layout of :func:`documents`
    """
    positions: torch.Tensor
    packed: Packed


def document_layout(document_ids, key_mask: Optional[torch.Tensor] = None) -> Optional[Documents]:
    """``document_ids`` int [B, T] (or an already built :class:`Documents`, returned as is; or None -> None) and
    the bool key mask [B, T] or None -> :class:`Documents`."""
    if document_ids is None or isinstance(document_ids, Documents):
        return document_ids
    return Documents(positions=document_positions(document_ids), packed=documents(document_ids, key_mask))


def packing(key_mask: Optional[torch.Tensor], document_ids=None) -> Optional[Packed]:
    """The :class:`Packed` layout of a bool key mask [B, T] (True = real token), or None where the padded path
    serves: no mask or no padding, a mask that is not a prefix of every row, a row without tokens, CUDA / meta
    tensors, graph capture, the eager twin, a forced Triton backend (the interpreter lane on CPU tensors), and
    ``ELECTRA_FAST_NO_UNPAD=1``. With ``document_ids`` (int [B, T] or :class:`Documents`) always the layout (see
    :func:`documents`)."""
    if isinstance(document_ids, Documents):
        return document_ids.packed
    if document_ids is not None:
        return documents(document_ids, key_mask)
    if (key_mask is None or key_mask.device.type != "cpu" or _validate.capturing() or _backend.eager_twin()
            or _backend.forced_backend() == "triton" or _cpu.switch("ELECTRA_FAST_NO_UNPAD")):
        return None
    B, T = key_mask.shape
    lengths = key_mask.sum(1, dtype=torch.int32)
    if bool((lengths == T).all()) or not bool((lengths > 0).all()):
        return None
    prefix = torch.arange(T, device=key_mask.device) < lengths[:, None]
    if not torch.equal(prefix, key_mask):
        return None
    cu = torch.zeros(B + 1, dtype=torch.int32, device=key_mask.device)
    cu[1:] = lengths.cumsum(0)
    return Packed(index=key_mask.flatten().nonzero().squeeze(1), cu_seqlens=cu,
                  max_seqlen=int(lengths.max()), batch=B, length=T)


def _document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: True where a document begins (the first token of a row, and wherever the id changes)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def documents(document_ids: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> Packed:
    """The packed layout of document-masked rows: ``document_ids`` int [B, T] (each maximal run of equal ids in a
    row is one document), ``key_mask`` bool [B, T] (True = real token, a prefix of each row) or None (no padding).
    Packed sequence ``s`` is the ``s``-th document in row-major order; padding belongs to none."""
    B, T = document_ids.shape
    starts = _document_starts(document_ids)
    if key_mask is None:
        index = torch.arange(B * T, device=document_ids.device)
    else:
        lengths = key_mask.sum(1)
        if not torch.equal(torch.arange(T, device=key_mask.device) < lengths[:, None], key_mask):
            raise ValueError("attention_mask: with document_ids, the real tokens must come first in each row "
                             "(right padding only)")
        if not bool((lengths > 0).all()):
            raise ValueError("attention_mask: with document_ids, every row needs at least one real token")
        index = key_mask.flatten().nonzero().squeeze(1)
    first = starts.flatten().index_select(0, index).nonzero().squeeze(1)
    n = index.numel()
    cu = torch.cat([first, first.new_tensor([n])]).to(torch.int32)
    return Packed(index=index, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()), batch=B, length=T)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """int64 [B, T]: each token's position within its document (0 at every document's first token), the absolute
    position ids of document-masked rows."""
    T = document_ids.shape[1]
    t = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    return t - torch.where(_document_starts(document_ids), t, 0).cummax(1).values
