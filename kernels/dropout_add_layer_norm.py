"""Triton dropout + residual add + LayerNorm (the post-LN ``LayerNorm(dropout(x) + residual)``), forward and
backward. Semantics, shapes and the random stream: electra_fast/reference/dropout_add_layer_norm.py.

Each program owns BLOCK_M whole rows; the columns are one BLOCK_H >= H power-of-two tile (masked beyond H),
so the row statistics are taken in registers. The keep mask is the dropout op's: element e = r * H + c is kept
iff (word >> 8) >= threshold, word e % 4 of Philox call e // 4 (purpose DROPOUT, fourth counter word stream).
When H % 4 == 0 every row starts a call and one call serves four columns (interleaved, as kernels/dropout.py);
otherwise each element computes its own call (element_word). Both are runtime branches of one kernel, as is
skipping Philox at threshold 0, so only x's dtype and BLOCK_H specialise: weight and bias are read in the acc
dtype (the launchers widen bf16 / fp16 parameters exactly, an [H] copy) to halve the compiled variants.

The backward kernel also writes per-program column partial sums of go * xhat and go ([programs, H], acc dtype);
the launcher reduces them with torch in a fixed order: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox import element_word, philox4_stream
from .spec import COMPILE_OPTIONS, Spec, ptr

DROPOUT = tl.constexpr(4)  # electra_fast.reference.philox.DROPOUT (kernels import nothing from electra_fast)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# (BLOCK_H, BLOCK_M, num_warps): the first row with BLOCK_H >= H serves H. 8 elements a thread: 16 took ~200
# registers (the per-element Philox calls), 8 take ~110 (forward) / ~150 (backward) at sm_90, no spills.
# H <= 2048 covers every ELECTRA / DeBERTa(-v3) size up to xxlarge (1536).
CONFIGS = ((64, 16, 4), (128, 8, 4), (256, 4, 4), (512, 2, 4), (1024, 2, 8), (2048, 1, 8))
MAX_H = CONFIGS[-1][0]
MAX_BWD_PROGRAMS = 1024  # bounds the [programs, H] partials; each program then loops over several row blocks


@triton.jit
def _acc(v, ACC64: tl.constexpr):
    if ACC64:
        r = v.to(tl.float64)
    else:
        r = v.to(tl.float32)
    return r


@triton.jit
def _rsqrt(v, ACC64: tl.constexpr):
    # Correctly rounded: fp32 tl.sqrt and / are approximate on the GPU (the _rn functions take fp32 only).
    if ACC64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = tl.math.div_rn(tl.full(v.shape, 1.0, tl.float32), tl.math.sqrt_rn(v))
    return r


SCALED_EXP = tl.constexpr(20)  # electra_fast.reference.dropout_add_layer_norm.SCALED_EXP


@triton.jit
def _scaled_moments(hf, mask, H, eps, mean, rstd, redo, ACC64: tl.constexpr):
    """The reference's moments of rows whose sum of squares overflowed (redo, [BLOCK_M]; rows holding inf / NaN
    keep theirs): from the row scaled by an exact power of two s (built from max |h|'s exponent bits), max |s h|
    in [2^20, 2^21): mean = mean(s h) / s, rstd = min(s / sqrt(var(s h) + eps s^2), 1 / sqrt(eps))."""
    ah = tl.where(mask, tl.abs(hf), 0.0)
    redo = redo & (tl.max(tl.where(ah < float("inf"), 0, 1), 1) == 0)  # NaN compares false too
    mx = tl.max(ah, 1)
    if ACC64:
        e = ((mx.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023
        e = tl.minimum(tl.maximum(e, 0), 1023)
        s = ((-e + (1023 + SCALED_EXP)) << 52).to(tl.float64, bitcast=True)  # tensor first: constexpr - tensor
    else:
        e = ((mx.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.minimum(tl.maximum(e, 0), 127)
        s = ((-e + (127 + SCALED_EXP)) << 23).to(tl.float32, bitcast=True)
    hs = tl.where(mask, hf * s[:, None], 0.0)
    mean_s = tl.sum(hs, axis=1) / H
    d = tl.where(mask, hs - mean_s[:, None], 0.0)
    eps_v = tl.zeros_like(mean_s) + eps
    rstd_s = tl.minimum(s * _rsqrt(tl.sum(d * d, axis=1) / H + eps_v * s * s, ACC64), _rsqrt(eps_v, ACC64))
    return tl.where(redo, mean_s / s, mean), tl.where(redo, rstd_s, rstd)


@triton.jit
def _keep(seed, stream, threshold, rows, cols, H, BLOCK_H: tl.constexpr):
    """bool [BLOCK_M, BLOCK_H]: element rows * H + cols kept (rows int64 [BLOCK_M], cols [BLOCK_H])."""
    if H % 4 == 0:
        # Rows start at call boundaries: call (r * H) // 4 + j serves columns 4j .. 4j + 3.
        groups = (rows * H // 4)[:, None] + tl.arange(0, BLOCK_H // 4)[None, :]
        w0, w1, w2, w3 = philox4_stream(seed, groups, DROPOUT, stream)
        words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    else:
        words = element_word(seed, rows[:, None] * H + cols[None, :], DROPOUT, stream)
    return (words >> 8).to(tl.int32) >= threshold  # both in [0, 2**24]


@triton.jit(do_not_specialize=["seed", "stream", "threshold"])  # one compiled kernel for every seed / site / p
def dropout_add_layer_norm_fwd_kernel(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, h_ptr, mean_ptr, rstd_ptr, N, H, seed,
                                      stream, threshold, scale, eps, has_bias, ACC64: tl.constexpr,
                                      BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """x, res, out, h [N, H] (one dtype); w, b [H], mean, rstd [N] (acc); b read only when has_bias (0 / 1) is 1."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < N
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * H + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    res = tl.load(res_ptr + offs, mask=mask, other=0.0)
    keep = mask
    if threshold > 0:  # threshold 0 keeps everything (scale 1): no Philox
        keep = _keep(seed, stream, threshold, rows, cols, H, BLOCK_H)
    # The dropout op's output, rounded to the dtype, then torch's add rounded again: h matches bit for bit. In fp32
    # the select between product and sum keeps ptxas from fusing them into one FMA (checked in the sm_90 SASS).
    d = tl.where(keep, (_acc(x, ACC64) * scale).to(x.dtype), 0.0)
    h = (_acc(d, ACC64) + _acc(res, ACC64)).to(x.dtype)
    tl.store(h_ptr + offs, h, mask=mask)
    hf = _acc(h, ACC64)
    mean = tl.sum(hf, axis=1) / H
    xc = tl.where(mask, hf - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / H  # two passes in registers: no cancellation
    rstd = _rsqrt(var + eps, ACC64)
    overflow = (tl.abs(var) == float("inf")) | (var != var)
    if tl.max(overflow.to(tl.int32), 0) != 0:  # rare: |h| beyond ~1e19 in fp32
        mean, rstd = _scaled_moments(hf, mask, H, eps, mean, rstd, overflow, ACC64)
        xc = tl.where(mask, hf - mean[:, None], 0.0)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)
    w = _acc(tl.load(w_ptr + cols, mask=cmask, other=0.0), ACC64)
    b = _acc(tl.load(b_ptr + cols, mask=cols < H * has_bias, other=0.0), ACC64)  # has_bias: 0 or 1
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "stream", "threshold"])
def dropout_add_layer_norm_bwd_kernel(go_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dres_ptr, dw_ptr, db_ptr, N,
                                      H, rows_per_program, seed, stream, threshold, scale, has_bias,
                                      ACC64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """go, h, dx, dres [N, H] (one dtype); w [H], mean, rstd [N] (acc); dw, db [programs, H] (acc) partial
    column sums of go * xhat and go over this program's rows_per_program (a multiple of BLOCK_M) rows."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = _acc(tl.load(w_ptr + cols, mask=cmask, other=0.0), ACC64)
    # Column sums stay [BLOCK_M, BLOCK_H] across the loop: one cross-row reduction per program.
    dw = tl.zeros([BLOCK_M, BLOCK_H], dtype=w.dtype)
    db = tl.zeros([BLOCK_M, BLOCK_H], dtype=w.dtype)
    first = pid.to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M)
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * H + cols[None, :]
        go = _acc(tl.load(go_ptr + offs, mask=mask, other=0.0), ACC64)
        hf = _acc(tl.load(h_ptr + offs, mask=mask, other=0.0), ACC64)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)  # 0 on padded rows: their terms vanish
        xhat = tl.where(mask, (hf - mean[:, None]) * rstd[:, None], 0.0)
        g = go * w[None, :]
        mean_g = tl.sum(g, axis=1) / H
        mean_gx = tl.sum(g * xhat, axis=1) / H
        dres = (rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])).to(dres_ptr.dtype.element_ty)
        tl.store(dres_ptr + offs, dres, mask=mask)
        keep = mask
        if threshold > 0:
            keep = _keep(seed, stream, threshold, rows, cols, H, BLOCK_H)
        # The dropout op applied to the rounded dresidual.
        dx = tl.where(keep, _acc(dres, ACC64) * scale, 0.0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += go * xhat
        db += go
    out = pid.to(tl.int64) * H + cols
    tl.store(dw_ptr + out, tl.sum(dw, axis=0), mask=cmask)
    tl.store(db_ptr + out, tl.sum(db, axis=0), mask=cols < H * has_bias)  # has_bias: 0 or 1


# ------------------------------------------------------------------------------------ launchers
def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def unsupported(hidden: int) -> list:
    """Every reason these kernels cannot serve rows of ``hidden`` elements (the op spec asks before routing here)."""
    return [f"the Triton kernels hold a row in registers, up to H = {MAX_H}; got {hidden}"] if hidden > MAX_H else []


def config(hidden: int):
    """(BLOCK_H, BLOCK_M, num_warps) serving rows of ``hidden`` elements."""
    for cfg in CONFIGS:
        if hidden <= cfg[0]:
            return cfg
    raise ValueError(f"dropout_add_layer_norm (triton): hidden size {hidden} > {MAX_H} is not supported")


def forward(x, residual, weight, bias, threshold: int, scale: float, seed: int, stream: int, eps: float):
    """x, residual [N, H] contiguous (one dtype); weight [H], bias [H] or None (fp32 or x's dtype); seed int64
    -> (out, h [N, H] x's dtype, mean, rstd [N] acc)."""
    n, hidden = x.shape
    acc = _acc_dtype(x.dtype)
    out, h = torch.empty_like(x), torch.empty_like(x)
    mean = torch.empty(n, device=x.device, dtype=acc)
    rstd = torch.empty(n, device=x.device, dtype=acc)
    if n == 0:
        return out, h, mean, rstd
    weight = weight.to(acc)
    bias_arg = bias.to(acc) if bias is not None else weight  # a valid dummy, never read
    block_h, block_m, warps = config(hidden)
    dropout_add_layer_norm_fwd_kernel[(triton.cdiv(n, block_m),)](
        x, residual, weight, bias_arg, out, h, mean, rstd, n, hidden, seed, stream, threshold, scale, eps,
        int(bias is not None), ACC64=x.dtype == torch.float64, BLOCK_M=block_m, BLOCK_H=block_h, **COMPILE_OPTIONS,
        num_warps=warps)
    return out, h, mean, rstd


def backward(grad_out, h, weight, mean, rstd, threshold: int, scale: float, seed: int, stream: int, has_bias: bool):
    """grad_out, h [N, H] (one dtype); weight [H]; mean, rstd [N] acc -> (dx, dresidual [N, H] h's dtype,
    dweight [H], dbias [H] or None (weight's dtype))."""
    n, hidden = h.shape
    acc = _acc_dtype(h.dtype)
    dx, dres = torch.empty_like(h), torch.empty_like(h)
    if n == 0:
        zeros = torch.zeros(hidden, device=h.device, dtype=weight.dtype)
        return dx, dres, zeros, zeros.clone() if has_bias else None
    block_h, block_m, warps = config(hidden)
    row_blocks = triton.cdiv(n, block_m)
    rows_per_program = triton.cdiv(row_blocks, min(row_blocks, MAX_BWD_PROGRAMS)) * block_m
    programs = triton.cdiv(n, rows_per_program)
    dw = torch.empty((programs, hidden), device=h.device, dtype=acc)
    db = torch.empty((programs, hidden), device=h.device, dtype=acc) if has_bias else dw  # dummy: never written
    dropout_add_layer_norm_bwd_kernel[(programs,)](
        grad_out, h, weight.to(acc), mean, rstd, dx, dres, dw, db, n, hidden,
        rows_per_program, seed, stream, threshold, scale, int(has_bias), ACC64=h.dtype == torch.float64,
        BLOCK_M=block_m, BLOCK_H=block_h, **COMPILE_OPTIONS, num_warps=warps)
    dweight = dw.sum(0).to(weight.dtype)
    return dx, dres, dweight, db.sum(0).to(weight.dtype) if has_bias else None


def compile_specs():
    specs = []
    scalars = {"seed": "i64", "stream": "i64", "threshold": "i32", "scale": "fp32"}
    for dt in DTYPES:
        acc = ptr(_acc_dtype(dt))
        for block_h, block_m, warps in CONFIGS:
            consts = {"ACC64": dt == torch.float64, "BLOCK_M": block_m, "BLOCK_H": block_h}
            specs.append(Spec(dropout_add_layer_norm_fwd_kernel, {
                "x_ptr": ptr(dt), "res_ptr": ptr(dt), "w_ptr": acc, "b_ptr": acc, "out_ptr": ptr(dt), "h_ptr": ptr(dt),
                "mean_ptr": acc, "rstd_ptr": acc, "N": "i32", "H": "i32", **scalars, "eps": "fp32", "has_bias": "i32"},
                consts, num_warps=warps))
            specs.append(Spec(dropout_add_layer_norm_bwd_kernel, {
                "go_ptr": ptr(dt), "h_ptr": ptr(dt), "w_ptr": acc, "mean_ptr": acc, "rstd_ptr": acc, "dx_ptr": ptr(dt),
                "dres_ptr": ptr(dt), "dw_ptr": acc, "db_ptr": acc, "N": "i32", "H": "i32", "rows_per_program": "i32",
                **scalars, "has_bias": "i32"}, consts, num_warps=warps))
    return specs
