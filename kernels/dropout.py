"""Triton counter-based dropout: y = x * keep * scale, one elementwise kernel for the forward (on the
input) and the backward (on the gradient). Semantics and the random stream: electra_fast/reference/dropout.py.

Each program takes BLOCK contiguous elements: BLOCK // 4 Philox calls (counter = element index // 4,
purpose DROPOUT, fourth word = stream) whose four words are interleaved so word i % 4 lands on element i.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox import philox4_stream
from .spec import COMPILE_OPTIONS, Spec, ptr

DROPOUT = tl.constexpr(4)  # electra_fast.reference.philox.DROPOUT (kernels import nothing from electra_fast)
BLOCK = 1024
NUM_WARPS = 4
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@triton.jit(do_not_specialize=["seed", "stream", "threshold"])  # one compiled kernel for every seed / site / p
def dropout_kernel(x_ptr, y_ptr, n, seed, stream, threshold, scale, ACC64: tl.constexpr, BLOCK: tl.constexpr):
    """x, y: [n] contiguous; kept iff (word >> 8) >= threshold; y = kept ? x * scale : 0 (fp32 / fp64)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    groups = start // 4 + tl.arange(0, BLOCK // 4)
    w0, w1, w2, w3 = philox4_stream(seed, groups, DROPOUT, stream)
    # [w0_0, w1_0, w2_0, w3_0, w0_1, ...]: element start + 4g + k takes word k of group g.
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    keep = (words >> 8).to(tl.int32) >= threshold  # both in [0, 2**24]
    offs = start + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    if ACC64:
        v = x.to(tl.float64) * scale  # the fp32 scale widens exactly
    else:
        v = x.to(tl.float32) * scale
    y = tl.where(keep, v, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inb)


def apply(x, threshold: int, scale: float, seed: int, stream: int):
    """``x``: floating tensor of any shape (made contiguous); ``seed``: int64 (the 64-bit key's bits)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    dropout_kernel[(triton.cdiv(n, BLOCK),)](x, y, n, seed, stream, threshold, scale,
                                             ACC64=x.dtype == torch.float64, BLOCK=BLOCK, **COMPILE_OPTIONS,
                                             num_warps=NUM_WARPS)
    return y


def compile_specs():
    return [Spec(dropout_kernel, {"x_ptr": ptr(dt), "y_ptr": ptr(dt), "n": "i32", "seed": "i64", "stream": "i64",
                                  "threshold": "i32", "scale": "fp32"},
                 {"ACC64": dt == torch.float64, "BLOCK": BLOCK}, num_warps=NUM_WARPS) for dt in DTYPES]
