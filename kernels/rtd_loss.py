"""Triton RTD loss: one pass computes the per-token loss, per-block partial sums, the metric counts
and d loss_token / d logit (the op's backward is then one scale). Semantics and shapes:
electra_fast/reference/rtd_loss.py.

Determinism: each program writes its partial sums to its own slot; the launcher reduces the
[n_blocks] partials with torch (fixed order) - no float atomics.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .spec import COMPILE_OPTIONS, Spec, ptr

BLOCK = 2048
NUM_WARPS = 8
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)
N_COUNTS = 5


@triton.jit
def _log1p_small(t):
    # log1p(t) for t in [0, 1], accurate for tiny t: log(u) * t / (u - 1), u = 1 + t (Goldberg).
    u = 1.0 + t
    d = u - 1.0
    return tl.where(d == 0.0, t, tl.log(u) * (t / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def rtd_loss_fwd_kernel(logits_ptr, corrupted_ptr, original_ptr, mask_ptr, loss_ptr, dlogits_ptr, partial_loss_ptr,
                        partial_counts_ptr, n, HAS_MASK: tl.constexpr, WRITE_LOSS: tl.constexpr,
                        NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(logits_ptr + offs, mask=inb, other=0.0)
    if x.dtype != tl.float64:  # fp64 logits keep fp64 (gradcheck); everything else computes in fp32
        x = x.to(tl.float32)
    y = tl.load(corrupted_ptr + offs, mask=inb, other=0) != tl.load(original_ptr + offs, mask=inb, other=0)
    valid = inb
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + offs, mask=inb, other=0) != 0)
    yf = y.to(x.dtype)
    e = tl.exp(-tl.abs(x))  # shared by the softplus and the sigmoid
    loss = tl.where(valid, tl.maximum(tl.where(y, -x, x), 0.0) + _log1p_small(e), 0.0)  # no inf - inf
    if WRITE_LOSS:
        tl.store(loss_ptr + offs, loss, mask=inb)
    if NEED_GRAD:
        inv = 1.0 / (1.0 + e)
        sig = tl.where(x >= 0.0, inv, e * inv)
        tl.store(dlogits_ptr + offs, tl.where(valid, sig - yf, 0.0), mask=inb)
    pred = x > 0.0
    tl.store(partial_loss_ptr + pid, tl.sum(loss, axis=0))
    base = partial_counts_ptr + pid * 5
    tl.store(base + 0, tl.sum(valid.to(tl.int32), axis=0))
    tl.store(base + 1, tl.sum((valid & y).to(tl.int32), axis=0))
    tl.store(base + 2, tl.sum((valid & pred).to(tl.int32), axis=0))
    tl.store(base + 3, tl.sum((valid & y & pred).to(tl.int32), axis=0))
    tl.store(base + 4, tl.sum((valid & (y == pred)).to(tl.int32), axis=0))


def forward(logits, corrupted, original, mask, reduction: int, need_grad: bool):
    """``mask``: uint8, or int32 / int64 (converted here: the kernels are specialised for uint8 masks)."""
    if mask is not None and mask.dtype != torch.uint8:
        mask = (mask != 0).view(torch.uint8)
    n = logits.numel()
    n_blocks = max(triton.cdiv(n, BLOCK), 1)
    f32 = dict(device=logits.device, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    per_token = torch.empty(logits.shape, **f32) if reduction == 0 else None
    dlogits = torch.empty(logits.shape if need_grad else (0,), **f32)
    partial_loss = torch.empty(n_blocks, **f32)
    partial_counts = torch.empty((n_blocks, N_COUNTS), device=logits.device, dtype=torch.int32)
    # Pointers a specialisation never touches get a valid dummy (logits / partial_loss).
    rtd_loss_fwd_kernel[(n_blocks,)](
        logits, corrupted, original, mask if mask is not None else logits,
        per_token if per_token is not None else partial_loss, dlogits if need_grad else partial_loss,
        partial_loss, partial_counts, n, HAS_MASK=mask is not None, WRITE_LOSS=reduction == 0,
        NEED_GRAD=need_grad, BLOCK=BLOCK, **COMPILE_OPTIONS, num_warps=NUM_WARPS)
    counts = partial_counts.sum(0, dtype=torch.int64)
    if reduction == 0:
        return per_token, counts, dlogits
    total = partial_loss.sum()
    if reduction == 1:
        return total, counts, dlogits
    n = counts[0].clamp(min=1).to(total.dtype)
    return total / n, counts, dlogits.div_(n) if need_grad else dlogits


def compile_specs():
    specs = []
    for xd, idd, has_mask, write, grad in itertools.product(LOGIT_DTYPES, ID_DTYPES, (False, True), (False, True),
                                                           (False, True)):
        f32 = ptr(torch.float64 if xd == torch.float64 else torch.float32)
        specs.append(Spec(rtd_loss_fwd_kernel, {
            "logits_ptr": ptr(xd), "corrupted_ptr": ptr(idd), "original_ptr": ptr(idd),
            "mask_ptr": ptr(torch.uint8) if has_mask else ptr(xd), "loss_ptr": f32, "dlogits_ptr": f32,
            "partial_loss_ptr": f32, "partial_counts_ptr": ptr(torch.int32), "n": "i32"},
            {"HAS_MASK": has_mask, "WRITE_LOSS": write, "NEED_GRAD": grad, "BLOCK": BLOCK}, num_warps=NUM_WARPS))
    return specs
