"""Triton side of the shared Philox stream (see electra_fast/reference/philox.py for the layout).

``tl.philox(seed, c0, c1, c2, c3)`` is Philox4x32-10 keyed by the 64-bit seed split into
(lo, hi) words: exactly the stream the reference and C++ backends implement.
"""
import triton
import triton.language as tl


@triton.jit
def philox4(seed, index, purpose: tl.constexpr):
    """Four uint32 blocks for int64 element indices ``index`` (seed: i64 scalar)."""
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = ((index >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = lo * 0
    return tl.philox(seed, lo, hi, zero + purpose, zero)


@triton.jit
def philox4_stream(seed, index, purpose: tl.constexpr, stream):
    """``philox4`` with the counter's fourth word set to ``stream`` (u32 / i64 scalar; DROPOUT's site key)."""
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = ((index >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = lo * 0
    return tl.philox(seed, lo, hi, zero + purpose, (zero.to(tl.int64) + stream).to(tl.uint32))


@triton.jit
def element_word(seed, element, purpose: tl.constexpr, stream=0):
    """uint32 word ``element % 4`` of the call at ``element // 4`` (int64 element indices; ``stream``: the
    counter's fourth word): the layout of the purposes whose one call serves four elements (reference
    ``philox.element_words``). Each element computes its own call here: tiles whose element indices do not start
    at a multiple of 4 in every row cannot interleave."""
    x0, x1, x2, x3 = philox4_stream(seed, element // 4, purpose, stream)
    w = element % 4
    return tl.where(w == 0, x0, tl.where(w == 1, x1, tl.where(w == 2, x2, x3)))


@triton.jit
def uniform(x):
    """uint32 -> fp32 in [0, 1): (x >> 8) * 2**-24."""
    return (x >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def uniform_open(x):
    """uint32 -> fp32 in (0, 1): ((x >> 9) + 0.5) * 2**-23."""
    return ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
