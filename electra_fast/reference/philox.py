"""Philox4x32-10 in eager PyTorch: the one random stream every backend shares.

The stream (DESIGN.md, "randomness contract"). For a draw keyed by ``(seed, index, purpose)``:

  key      k0 = seed & 0xFFFFFFFF,  k1 = seed >> 32            (seed: int in [0, 2**63); DROPOUT: [0, 2**64))
  counter  c0 = index & 0xFFFFFFFF, c1 = index >> 32, c2 = purpose, c3 = 0 (DROPOUT: c3 = stream)
  output   four uint32 words (x0, x1, x2, x3) = Philox4x32-10(counter, key)

This is exactly ``tl.philox(seed, c0, c1, c2, c3)`` in Triton (constants and round order as in
``triton.language.random``), ``philox4x32_10`` in ``csrc/philox.h``, and :func:`philox` below,
so a mask or a Gumbel noise drawn on any backend is bit-identical.

uint32 -> float conversions (exact in fp32, so no backend can round differently):
  ``uniform(x)      = (x >> 8) * 2**-24``        in [0, 1)
  ``uniform_open(x) = ((x >> 9) + 0.5) * 2**-23`` in (0, 1)   (for -log(-log(u)))

Purposes and what each op reads (one Philox call per element):
  MASKING = 1       index = b * T + t:   x0 selection key, x1 replacement draw, x2 random-token draw
  GUMBEL = 2        element e = n * V + v: index = e // 4, word x[e % 4] -> uniform_open (:func:`element_words`)
  ATTN_DROPOUT = 3  element e = ((b * H + h) * T + i) * T + j: index = e // 4, word x[e % 4] -> uniform,
                    kept iff u >= p (one Philox call serves four elements: :func:`element_words`); packed
                    variable-length calls (cu_seqlens): b = the sequence, T = max_seqlen, i, j < its length
  DROPOUT = 4       element e of the contiguous tensor: index = e // 4, c3 = stream (int in [0, 2**32), one
                    per dropout site; seed in [0, 2**64)): word x[e % 4] -> uniform, kept iff u >= p

Tensors here hold uint32 values in int64 (torch has no general uint32 arithmetic).
"""
from __future__ import annotations

import torch

from .. import _seed

MASKING = 1
GUMBEL = 2
ATTN_DROPOUT = 3
DROPOUT = 4

_M32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
SEED_LIMIT = _seed.SEED_LIMIT
check_seed = _seed.check  # the seeds' one check lives in electra_fast/_seed.py; this name stays for callers


def _mulhilo(a: int, b: torch.Tensor):
    """(hi32, lo32) of the 64-bit product of the constant ``a`` and uint32 values ``b``."""
    lo = (b * a) & _M32  # int64 wraps, its low 32 bits are still exact
    b_hi, b_lo = b >> 16, b & 0xFFFF
    hi = ((b_hi * a) + ((b_lo * a) >> 16)) >> 16  # both products < 2**48: no overflow
    return hi & _M32, lo


def philox(seed: int, index: torch.Tensor, purpose: int, stream: int = 0):
    """Four uint32 words (as int64 tensors shaped like ``index``) for each element of ``index``.

    ``index``: int64 tensor of non-negative element indices (< 2**63). ``seed``: the full 64-bit key
    (ops validate their own, narrower ranges). ``stream``: the counter's fourth word (0 but for DROPOUT).
    """
    seed = _seed.check(seed, limit=_seed.KEY_LIMIT)
    index = index.to(torch.int64)
    c0 = index & _M32
    c1 = (index >> 32) & _M32
    c2 = torch.full_like(index, purpose & _M32)
    c3 = torch.full_like(index, stream & _M32)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def element_words(seed: int, element: torch.Tensor, purpose: int, stream: int = 0) -> torch.Tensor:
    """int64 (uint32 values) shaped like ``element``: word ``e % 4`` of the Philox call at index ``e // 4``
    (the layout of the purposes whose one call serves four consecutive elements)."""
    element = element.to(torch.int64)
    words = torch.stack(philox(seed, element // 4, purpose, stream), dim=-1)
    return words.gather(-1, (element % 4).unsqueeze(-1)).squeeze(-1)


def uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> fp32 in [0, 1), exactly ``(x >> 8) * 2**-24``."""
    return (x >> 8).to(torch.float32) * (2.0 ** -24)


def uniform_open(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> fp32 in (0, 1), exactly ``((x >> 9) + 0.5) * 2**-23``."""
    return ((x >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)
