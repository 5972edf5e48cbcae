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
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import _backend, _cpu


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

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, length, ...] -> [N, ...]."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [batch, length, ...], zeros at the padded positions."""
        out = x.new_zeros(self.batch * self.length, *x.shape[1:])
        return out.index_copy(0, self.index, x).view(self.batch, self.length, *x.shape[1:])


def packing(key_mask: Optional[torch.Tensor]) -> Optional[Packed]:
    """The :class:`Packed` layout of a bool key mask [B, T] (True = real token), or None where the padded path
    serves: no mask or no padding, a mask that is not a prefix of every row, a row without tokens, CUDA / meta
    tensors, graph capture, the eager twin, a forced Triton backend (the interpreter lane on CPU tensors), and
    ``ELECTRA_FAST_NO_UNPAD=1``."""
    if (key_mask is None or key_mask.device.type != "cpu" or torch.compiler.is_compiling() or _backend.eager_twin()
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
