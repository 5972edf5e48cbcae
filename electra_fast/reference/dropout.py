"""Counter-based dropout in eager PyTorch: the truth the C++ and Triton backends match bit for bit.

Element ``i`` of the contiguous (row-major) input is kept iff ``uniform(w) >= p``, where ``w`` is word
``i % 4`` of Philox4x32-10 keyed by ``seed`` with counter ``(i // 4, DROPOUT, stream)`` (see
reference/philox.py): one Philox call serves four elements. Kept elements are ``x * scale`` with
``scale = fp32(1 / (1 - p))``, the product taken in fp32 (fp64 for fp64 input) and cast back to the
input's dtype; dropped elements are exactly 0. The backward is the same map applied to the gradient.

The comparison is exact: ``uniform(w) = (w >> 8) * 2**-24`` is a multiple of 2**-24, so
``uniform(w) >= p`` iff ``(w >> 8) >= ceil(p * 2**24)`` (:func:`keep_threshold`), which is what the
kernels compare.
"""
from __future__ import annotations

import math

import torch

from . import philox

P_WORD = 2 ** 24  # uniform() resolution: the kept test compares (w >> 8) with an integer threshold


def keep_threshold(p: float) -> int:
    """Kept iff ``(w >> 8) >= keep_threshold(p)``; exactly ``uniform(w) >= p`` (p * 2**24 is exact)."""
    return int(math.ceil(p * P_WORD))


def keep_scale(p: float) -> float:
    """``fp32(1 / (1 - p))`` as a Python float (exactly representable in fp32): the double rounded to 24 significant
    bits, ties to even, as the fp32 conversion does (the value is >= 1 and < 2**54, always normal). Pure Python:
    ``float(torch.tensor(...))`` was an ``.item()``, two graph breaks per fused layer under torch.compile."""
    m, e = math.frexp(1.0 / (1.0 - p))
    return math.ldexp(round(m * 2.0 ** 24) / 2.0 ** 24, e)


def words(numel: int, seed: int, stream: int, device="cpu") -> torch.Tensor:
    """int64 [numel] (uint32 values): the Philox word of each element (word i % 4 of group i // 4)."""
    element = torch.arange(numel, dtype=torch.int64, device=device)
    return philox.element_words(seed & (2 ** 64 - 1), element, philox.DROPOUT, stream)


def keep_mask(numel: int, seed: int, stream: int, p: float, device="cpu") -> torch.Tensor:
    """bool [numel]: element i kept, written literally as ``uniform(w) >= p`` (fp32 -> fp64 is exact)."""
    return philox.uniform(words(numel, seed, stream, device)).to(torch.float64) >= p


def apply(x: torch.Tensor, threshold: int, scale: float, seed: int, stream: int) -> torch.Tensor:
    """``x * keep * scale`` (forward on the input, backward on the gradient); any shape, contiguous.

    ``threshold``: :func:`keep_threshold` of p; ``scale``: :func:`keep_scale` of p; ``seed``: the 64-bit
    key (negative values are read as their two's complement, as the int64 op schema passes them).
    """
    x = x.contiguous()
    keep = (words(x.numel(), seed, stream, x.device) >> 8) >= threshold
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.where(keep.view(x.shape), x.to(acc) * torch.tensor(scale, dtype=acc, device=x.device),
                    torch.zeros((), dtype=acc, device=x.device))
    return y.to(x.dtype)
