"""DOC-SENTENCES rows (RoBERTa's packing that never crosses a document), document-masked: ``--packing doc-sentences``.

The token cache's documents (each ends with [SEP] in the stream, see :mod:`.data`) are laid into rows of ``seq_len``
tokens in stream order. Each document becomes one or more segments ``[CLS] piece [SEP]``; a row is filled with
segments back to back, a document that does not fit is cut and continues in the next row, so rows carry no padding
except where fewer than 3 slots (one [CLS] piece [SEP] segment) are left at a row's end: those 1-2 slots are
padding (``attention_mask`` 0). The model attends inside each segment only and restarts positions at each
(``document_ids``, electra_fast.nn.packing), so every segment is computed exactly as if it were a sequence of its own,
without the padding that a row per document would need. The last row, when not full, is dropped (as the last partial
chunk of FULL-SENTENCES packing is). The layout is a pure function of the cache and ``seq_len``; row ``i`` is what
the sampler's index ``i`` names, as for :class:`~.data.PackedSequences`.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch

from .data import ID_BITS, WORD_START, token_stream
from .errors import PretrainError

MIN_SEGMENT = 3  # [CLS] + one token + [SEP]
_SCAN = 1 << 24  # tokens read per pass over the memory-mapped stream while finding the document ends


def document_bodies(tokens: np.ndarray, sep_id: int):
    """(start, length) int64 arrays of every non-empty document body (the tokens before each [SEP]) of a stream."""
    ends = [np.flatnonzero((tokens[a:a + _SCAN] & ID_BITS) == sep_id) + a for a in range(0, len(tokens), _SCAN)]
    ends = np.concatenate(ends) if ends else np.empty(0, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    lengths = ends.astype(np.int64) - starts
    keep = lengths > 0  # a Unigram vocabulary's "[SEP]" piece written in a text splits it; two in a row leave nothing
    return starts[keep], lengths[keep]


def layout(starts: np.ndarray, lengths: np.ndarray, seq_len: int):
    """Segments of the rows: (row, offset in the row, stream start, body length) int64 arrays, rows in order;
    only complete rows (the last, partial one is left out)."""
    row = used = 0
    seg_row, seg_off, seg_start, seg_len = [], [], [], []
    for a, n in zip(starts.tolist(), lengths.tolist()):
        while n > 0:
            if seq_len - used < MIN_SEGMENT:
                row, used = row + 1, 0
            take = min(n, seq_len - used - 2)
            seg_row.append(row)
            seg_off.append(used)
            seg_start.append(a)
            seg_len.append(take)
            used += take + 2
            a, n = a + take, n - take
    complete = row + 1 if seq_len - used < MIN_SEGMENT else row
    out = [np.asarray(x, dtype=np.int64) for x in (seg_row, seg_off, seg_start, seg_len)]
    keep = out[0] < complete
    return complete, [x[keep] for x in out]


class DocumentRows:
    """Rows of ``seq_len`` tokens packed from whole documents (see the module docstring), over a memory-mapped token
    stream; the same interface as :class:`~.data.PackedSequences` plus the rows' layout."""

    def __init__(self, stream_path: str, seq_len: int, cls_id: int, sep_id: int, pad_id: int):
        if seq_len < MIN_SEGMENT:
            raise PretrainError(f"--seq-len: expected >= {MIN_SEGMENT}, got {seq_len}")
        self.tokens = token_stream(stream_path)
        self.seq_len, self.cls_id, self.sep_id, self.pad_id = seq_len, cls_id, sep_id, pad_id
        self.body = seq_len  # tokens per row (the unigram baseline's budget; every [CLS] / [SEP] is special anyway)
        self.n, (self._row, self._off, self._start, self._len) = layout(*document_bodies(self.tokens, sep_id), seq_len)
        if self.n == 0:
            raise PretrainError(f"--data: the corpus has {len(self.tokens)} tokens, fewer than one row of "
                                f"--seq-len {seq_len}")
        self._first = np.searchsorted(self._row, np.arange(self.n + 1))  # CSR: row r's segments

    def __len__(self) -> int:
        return self.n

    def _segments(self, r: int):
        a, b = self._first[r], self._first[r + 1]
        return zip(self._off[a:b].tolist(), self._start[a:b].tolist(), self._len[a:b].tolist())

    def _fill(self, indices: Sequence[int], dtype, cls, sep, pad, body):
        out = np.full((len(indices), self.seq_len), pad, dtype=dtype)
        for i, r in enumerate(indices):
            for off, start, n in self._segments(r):
                out[i, off], out[i, off + n + 1] = cls, sep
                out[i, off + 1:off + n + 1] = body(self.tokens[start:start + n])
        return out

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """input ids, int64 [len(indices), seq_len] ([PAD] in a row's 1-2 unfilled end slots)."""
        return torch.from_numpy(self._fill(indices, np.int64, self.cls_id, self.sep_id, self.pad_id,
                                           lambda t: t & ID_BITS))

    def word_starts(self, indices: Sequence[int]) -> torch.Tensor:
        """bool [len(indices), seq_len]: True where a word starts (every [CLS] and [SEP] starts one; a piece that
        begins inside a word continues its [CLS]'s unit, as in :meth:`~.data.PackedSequences.word_starts`)."""
        return torch.from_numpy(self._fill(indices, bool, True, True, True, lambda t: (t & WORD_START) != 0))

    def layout(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        """The model's keyword arguments for these rows: ``document_ids`` int32 [B, T] (the segment's number in its
        row; the unfilled end slots continue the last number), and ``attention_mask`` int64 [B, T] when a row has
        unfilled end slots."""
        docs = np.zeros((len(indices), self.seq_len), dtype=np.int32)
        filled = np.zeros(len(indices), dtype=np.int64)
        for i, r in enumerate(indices):
            for k, (off, _, n) in enumerate(self._segments(r)):
                docs[i, off:] = k
                filled[i] = off + n + 2
        out = {"document_ids": torch.from_numpy(docs)}
        if (filled < self.seq_len).any():
            out["attention_mask"] = torch.from_numpy((np.arange(self.seq_len) < filled[:, None]).astype(np.int64))
        return out
