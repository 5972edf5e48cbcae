"""Triton RTD loss: one pass forward (per-token loss, per-block partial sums and metric counts) and
one pass backward. Semantics and shapes: electra_fast/reference/rtd_loss.py.

Determinism: each program writes its partial sums to its own slot; the launcher reduces the
[n_blocks] partials with torch (fixed order) - no float atomics.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .spec import Spec, ptr

BLOCK = 2048
NUM_WARPS = 8
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)
N_COUNTS = 5


@triton.jit
def _softplus_neg_abs(x):
    # log1p(exp(-|x|)) accurate for tiny exp(-|x|): log(u) * t / (u - 1), u = 1 + t (Goldberg).
    t = tl.exp(-tl.abs(x))
    u = 1.0 + t
    d = u - 1.0
    return tl.where(d == 0.0, t, tl.log(u) * (t / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def rtd_loss_fwd_kernel(logits_ptr, corrupted_ptr, original_ptr, mask_ptr, loss_ptr, partial_loss_ptr,
                        partial_counts_ptr, n, HAS_MASK: tl.constexpr, WRITE_LOSS: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(logits_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    y = tl.load(corrupted_ptr + offs, mask=inb, other=0) != tl.load(original_ptr + offs, mask=inb, other=0)
    valid = inb
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + offs, mask=inb, other=0) != 0)
    loss = tl.maximum(x, 0.0) - tl.where(y, x, 0.0) + _softplus_neg_abs(x)
    loss = tl.where(valid, loss, 0.0)
    if WRITE_LOSS:
        tl.store(loss_ptr + offs, loss, mask=inb)
    pred = x > 0.0
    tl.store(partial_loss_ptr + pid, tl.sum(loss, axis=0))
    base = partial_counts_ptr + pid * 5
    tl.store(base + 0, tl.sum(valid.to(tl.int32), axis=0))
    tl.store(base + 1, tl.sum((valid & y).to(tl.int32), axis=0))
    tl.store(base + 2, tl.sum((valid & pred).to(tl.int32), axis=0))
    tl.store(base + 3, tl.sum((valid & y & pred).to(tl.int32), axis=0))
    tl.store(base + 4, tl.sum((valid & (y == pred)).to(tl.int32), axis=0))


@triton.jit
def rtd_loss_bwd_kernel(grad_scale_ptr, logits_ptr, corrupted_ptr, original_ptr, mask_ptr, grad_ptr, n,
                        HAS_MASK: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(logits_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    y = tl.load(corrupted_ptr + offs, mask=inb, other=0) != tl.load(original_ptr + offs, mask=inb, other=0)
    if PER_TOKEN:
        scale = tl.load(grad_scale_ptr + offs, mask=inb, other=0.0)
    else:
        scale = tl.load(grad_scale_ptr)
    g = (tl.sigmoid(x) - tl.where(y, 1.0, 0.0)) * scale
    if HAS_MASK:
        g = tl.where(tl.load(mask_ptr + offs, mask=inb, other=0) != 0, g, 0.0)
    tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=inb)


def forward(logits, corrupted, original, mask, reduction: int):
    n = logits.numel()
    n_blocks = max(triton.cdiv(n, BLOCK), 1)
    per_token = torch.empty_like(logits, dtype=torch.float32) if reduction == 0 else None
    partial_loss = torch.empty(n_blocks, device=logits.device, dtype=torch.float32)
    partial_counts = torch.empty((n_blocks, N_COUNTS), device=logits.device, dtype=torch.int32)
    rtd_loss_fwd_kernel[(n_blocks,)](
        logits, corrupted, original, mask if mask is not None else logits, per_token if per_token is not None else
        partial_loss, partial_loss, partial_counts, n, HAS_MASK=mask is not None, WRITE_LOSS=reduction == 0,
        BLOCK=BLOCK, num_warps=NUM_WARPS)
    counts = partial_counts.sum(0, dtype=torch.int64)
    if reduction == 0:
        return per_token, counts
    total = partial_loss.sum()
    return (total if reduction == 1 else total / counts[0].clamp(min=1).float()), counts


def backward(grad_scale, logits, corrupted, original, mask):
    n = logits.numel()
    grad = torch.empty_like(logits)
    rtd_loss_bwd_kernel[(max(triton.cdiv(n, BLOCK), 1),)](
        grad_scale, logits, corrupted, original, mask if mask is not None else logits, grad, n,
        HAS_MASK=mask is not None, PER_TOKEN=grad_scale.numel() != 1, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return grad


def compile_specs():
    specs = []
    for xd, idd, has_mask in itertools.product(LOGIT_DTYPES, ID_DTYPES, (False, True)):
        mask_t = ptr(torch.uint8) if has_mask else ptr(xd)  # the launcher passes logits when there is no mask
        for write in (False, True):
            specs.append(Spec(rtd_loss_fwd_kernel, {
                "logits_ptr": ptr(xd), "corrupted_ptr": ptr(idd), "original_ptr": ptr(idd), "mask_ptr": mask_t,
                "loss_ptr": ptr(torch.float32), "partial_loss_ptr": ptr(torch.float32),
                "partial_counts_ptr": ptr(torch.int32), "n": "i32"},
                {"HAS_MASK": has_mask, "WRITE_LOSS": write, "BLOCK": BLOCK}, num_warps=NUM_WARPS))
        for per_token in (False, True):
            specs.append(Spec(rtd_loss_bwd_kernel, {
                "grad_scale_ptr": ptr(torch.float32), "logits_ptr": ptr(xd), "corrupted_ptr": ptr(idd),
                "original_ptr": ptr(idd), "mask_ptr": mask_t, "grad_ptr": ptr(xd), "n": "i32"},
                {"HAS_MASK": has_mask, "PER_TOKEN": per_token, "BLOCK": BLOCK}, num_warps=NUM_WARPS))
    return specs
