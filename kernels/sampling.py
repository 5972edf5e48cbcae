"""Triton Gumbel sampling and fused vocabulary projection + MLM loss + sampling.
Semantics, noise layout and shapes: electra_fast/reference/sampling.py.

Forward (``mlm_fwd_kernel``): programs tile rows (BLOCK_N) x a span of the vocabulary; each computes
[BLOCK_N, BLOCK_V] logits tiles with ``tl.dot`` over E and keeps, per row, an online log-sum-exp, the
target logit, the plain argmax and the Gumbel argmax. The vocabulary is split across programs (grid
axis 1) so small N still fills the GPU; each split writes its per-row state to its own slot and the
launcher combines the [splits, N] states in a fixed order (no atomics). Nothing [N, V] exists.

Backward, per vocabulary chunk of ``chunk`` columns (host loop): ``mlm_dlogits_kernel`` recomputes the
logits tile and writes dlogits = (softmax - onehot) * grad into a [N, chunk] buffer;
``mlm_dhidden_kernel`` adds dlogits @ W_chunk into an fp32 dhidden (each program owns an [N, E] tile);
``mlm_dweight_kernel`` writes dW_chunk = dlogits^T @ hidden and dbias_chunk (each program owns a
[BLOCK_V, BLOCK_E] tile of dW). Deterministic: every output element is written by one program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox import element_word, uniform_open
from .spec import COMPILE_OPTIONS, Spec, ptr

GUMBEL = tl.constexpr(2)  # electra_fast.reference.philox.GUMBEL (kernels import nothing from electra_fast)
BLOCK_N, BLOCK_V, BLOCK_E = 64, 64, 32
BW_BLOCK_E, BW_BLOCK_K = 64, 32            # dhidden / dweight tiles: output E columns, reduction step
SAMPLE_BLOCK_N, SAMPLE_BLOCK_V = 16, 256   # standalone sampler
NUM_WARPS = 4
FWD_NUM_WARPS = 8                           # the fused forward's 64 x 64 tile + Philox spilled at 4 warps
TARGET_PROGRAMS = 512                       # vocabulary splits fill about this many programs
MIN_CHUNK = 4096                            # backward chunk floor on the GPU (fills the dW grid)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@triton.jit
def _gumbel_scores(x, rows, cols, cmask, V, seed, inv_t, dis_ptr):
    """(fp32 scores x * inv_t + g for a [R, C] tile, -inf at disallowed or out-of-range columns; allowed [C])."""
    idx = rows.to(tl.int64)[:, None] * V + cols.to(tl.int64)[None, :]
    u = uniform_open(element_word(seed, idx, GUMBEL))
    sc = x.to(tl.float32) * inv_t + (-tl.log(-tl.log(u)))
    ok = tl.load(dis_ptr + cols, mask=cmask, other=1) == 0
    return tl.where(ok[None, :], sc, float("-inf")), ok


@triton.jit
def _argmax_update(vals, cols, ok, best, best_id, V):
    """Running argmax per row in torch.argmax's order over the columns where ok ([C]; vals is -inf elsewhere):
    the first NaN beats everything, else strict > keeps the smaller id on ties. best_id starts at -1 and takes
    the first ok column even at -inf (a row of -inf then gives its first ok id). NaN is handled explicitly:
    tl.max's NaN behaviour differs between the GPU and the interpreter."""
    nan = vals != vals
    has_nan = tl.max(nan.to(tl.int32), 1) > 0
    clean = tl.where(nan, float("-inf"), vals)
    tmax = tl.max(clean, 1)
    first_max = tl.min(tl.where((clean == tmax[:, None]) & ok[None, :], cols[None, :], V), 1)
    first_nan = tl.min(tl.where(nan, cols[None, :], V), 1)
    tmax = tl.where(has_nan, float("nan"), tmax)
    tidx = tl.where(has_nan, first_nan, first_max).to(tl.int64)
    upd = tl.where(has_nan, best == best, (tmax > best) | ((best_id < 0) & (tidx < V)))
    return tl.where(upd, tmax, best), tl.where(upd, tidx, best_id)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, E, ACC64: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr):
    """[BLOCK_N, BLOCK_V] logits hidden[rows] @ weight[cols].T + bias[cols] in the accumulation dtype."""
    if ACC64:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        ks = e0 + tl.arange(0, BLOCK_E)
        kmask = ks < E
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * E + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * E + ks[None, :], mask=cmask[:, None] & kmask[None, :],
                    other=0.0)
        if IEEE:  # out_dtype: Triton 3.6 defaults it to fp32 and then rejects an fp64 acc
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee", out_dtype=acc.dtype)
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    return acc + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(acc.dtype)[None, :]


@triton.jit
def mlm_fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, dis_ptr, m_ptr, s_ptr, tgt_ptr, amax_ptr, amax_id_ptr, best_ptr,
                   best_id_ptr, N, V, E, span, seed, inv_t, ACC64: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    tgt_ids = tl.load(t_ptr + rows, mask=rmask, other=-1)
    v_begin = split * span
    v_end = tl.minimum(V, v_begin + span)
    if ACC64:
        zero = tl.zeros((BLOCK_N,), dtype=tl.float64)
    else:
        zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m, s, tgt, amax = zero - float("inf"), zero, zero, zero - float("inf")
    best = tl.zeros((BLOCK_N,), dtype=tl.float32) - float("inf")
    amax_id = tl.zeros((BLOCK_N,), dtype=tl.int64) - 1
    best_id = tl.zeros((BLOCK_N,), dtype=tl.int64) - 1
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_end
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, E, ACC64, IEEE, BLOCK_N, BLOCK_V, BLOCK_E)
        x = tl.where(cmask[None, :], x, float("-inf"))
        amax, amax_id = _argmax_update(x, cols, cmask, amax, amax_id, V)
        # running max with torch.logsumexp's non-finite results: NaN sticks; s only matters under a finite max
        # (the launcher takes a non-finite max as the lse)
        x_nan = tl.max((x != x).to(tl.int32), 1) > 0
        m_new = tl.maximum(m, tl.max(tl.where(x != x, float("-inf"), x), 1))
        m_new = tl.where(x_nan | (m != m), float("nan"), m_new)
        m_safe = tl.where((m_new == float("-inf")) | (m_new != m_new), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
        m = m_new
        tgt += tl.sum(tl.where(cols[None, :] == tgt_ids[:, None], x, 0.0), 1)
        sc, ok = _gumbel_scores(x, rows, cols, cmask, V, seed, inv_t, dis_ptr)
        best, best_id = _argmax_update(sc, cols, ok, best, best_id, V)
    out = split.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(tgt_ptr + out, tgt, mask=rmask)
    tl.store(amax_ptr + out, amax, mask=rmask)
    tl.store(amax_id_ptr + out, amax_id, mask=rmask)
    tl.store(best_ptr + out, best, mask=rmask)
    tl.store(best_id_ptr + out, best_id, mask=rmask)


@triton.jit
def gumbel_sample_kernel(x_ptr, dis_ptr, best_ptr, best_id_ptr, N, V, span, seed, inv_t, BLOCK_N: tl.constexpr,
                         BLOCK_V: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    v_begin = split * span
    v_end = tl.minimum(V, v_begin + span)
    best = tl.zeros((BLOCK_N,), dtype=tl.float32) - float("inf")
    best_id = tl.zeros((BLOCK_N,), dtype=tl.int64) - 1
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_end
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * V + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0)
        sc, ok = _gumbel_scores(x, rows, cols, cmask, V, seed, inv_t, dis_ptr)
        best, best_id = _argmax_update(sc, cols, ok, best, best_id, V)
    out = split.to(tl.int64) * N + rows
    tl.store(best_ptr + out, best, mask=rmask)
    tl.store(best_id_ptr + out, best_id, mask=rmask)


@triton.jit
def mlm_dlogits_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dl_ptr, N, V, E, v0, vc, ignore_index,
                       ACC64: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v0 + local
    rmask = rows < N
    cmask = local < vc
    x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, E, ACC64, IEEE, BLOCK_N, BLOCK_V, BLOCK_E)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    t = tl.load(t_ptr + rows, mask=rmask, other=-1)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    # where, not tl.minimum (which drops a NaN operand): a NaN logit gives NaN here as in the reference
    d = x - lse[:, None]
    p = tl.exp(tl.where(d > 0.0, 0.0, d))
    dl = (p - tl.where(cols[None, :] == t[:, None], 1.0, 0.0)) * g[:, None]
    dl = tl.where((t == ignore_index)[:, None], 0.0, dl)  # an ignored row: exactly 0, even at a NaN / inf logit
    tl.store(dl_ptr + rows.to(tl.int64)[:, None] * vc + local[None, :], dl.to(dl_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def mlm_dhidden_kernel(dl_ptr, w_ptr, dh_ptr, N, E, v0, vc, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """dh[rows, es] += dl[rows, :vc] @ W[v0:v0+vc, es] (dh: accumulation dtype)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    es = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask = rows < N
    emask = es < E
    dh_offs = rows.to(tl.int64)[:, None] * E + es[None, :]
    acc = tl.load(dh_ptr + dh_offs, mask=rmask[:, None] & emask[None, :], other=0.0)
    for k0 in range(0, vc, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < vc
        dl = tl.load(dl_ptr + rows.to(tl.int64)[:, None] * vc + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                     other=0.0)
        w = tl.load(w_ptr + (v0 + ks).to(tl.int64)[:, None] * E + es[None, :], mask=kmask[:, None] & emask[None, :],
                    other=0.0).to(dl.dtype)
        if IEEE:
            acc = tl.dot(dl, w, acc, input_precision="ieee", out_dtype=acc.dtype)
        else:
            acc = tl.dot(dl, w, acc)
    tl.store(dh_ptr + dh_offs, acc, mask=rmask[:, None] & emask[None, :])


@triton.jit
def mlm_dweight_kernel(dl_ptr, h_ptr, dw_ptr, db_ptr, N, E, v0, vc, IEEE: tl.constexpr, ACC64: tl.constexpr,
                       BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW[v0 + vs, es] = dl[:, vs]^T @ hidden[:, es]; the e-block-0 programs also write dbias[v0 + vs]."""
    vs = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    es = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    vmask = vs < vc
    emask = es < E
    if ACC64:
        acc = tl.zeros((BLOCK_V, BLOCK_E), dtype=tl.float64)
        dbias = tl.zeros((BLOCK_V,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_V, BLOCK_E), dtype=tl.float32)
        dbias = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        nmask = ns < N
        dl = tl.load(dl_ptr + ns.to(tl.int64)[:, None] * vc + vs[None, :], mask=nmask[:, None] & vmask[None, :],
                     other=0.0)
        h = tl.load(h_ptr + ns.to(tl.int64)[:, None] * E + es[None, :], mask=nmask[:, None] & emask[None, :],
                    other=0.0).to(dl.dtype)
        if IEEE:
            acc = tl.dot(tl.trans(dl), h, acc, input_precision="ieee", out_dtype=acc.dtype)
        else:
            acc = tl.dot(tl.trans(dl), h, acc)
        dbias += tl.sum(dl.to(dbias.dtype), 0)
    tl.store(dw_ptr + (v0 + vs).to(tl.int64)[:, None] * E + es[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=vmask[:, None] & emask[None, :])
    if tl.program_id(1) == 0:
        tl.store(db_ptr + v0 + vs, dbias.to(db_ptr.dtype.element_ty), mask=vmask)


# ------------------------------------------------------------------------------------ launchers
def _flags(dtype):
    return dict(ACC64=dtype == torch.float64, IEEE=dtype in (torch.float32, torch.float64))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dl_dtype(dtype):
    # bf16 dlogits keep tensor-core dots (bf16 has fp32's range); fp16 would flush small probabilities.
    return torch.bfloat16 if dtype == torch.bfloat16 else _acc(dtype)


def _splits(n_rows, vocab, block_n, block_v):
    """Vocabulary splits (and the span of each, a multiple of block_v) so the grid has ~TARGET_PROGRAMS."""
    row_blocks = max(triton.cdiv(n_rows, block_n), 1)
    v_blocks = max(triton.cdiv(vocab, block_v), 1)
    splits = max(1, min(v_blocks, TARGET_PROGRAMS // row_blocks))
    span = triton.cdiv(v_blocks, splits) * block_v
    return row_blocks, triton.cdiv(vocab, span), span


def _mask_or_zeros(disallowed, vocab, device):
    return disallowed if disallowed is not None else torch.zeros(vocab, dtype=torch.uint8, device=device)


def _first_max(vals, ids):
    """Across splits (dim 0, in vocabulary order), torch.argmax's order as in the kernels: the first NaN, else the
    first maximum (the smallest id); when every split is at -inf, the first split with an allowed column (id -1
    marks a split without one)."""
    if not vals.shape[1]:
        return ids[0]
    k = vals.argmax(0, keepdim=True)
    first_ok = (ids >= 0).to(torch.int32).argmax(0, keepdim=True)
    k = torch.where(vals.gather(0, k) == float("-inf"), first_ok, k)
    return ids.gather(0, k)[0]


def sample(logits, disallowed, seed: int, inv_temperature: float):
    n, vocab = logits.shape
    rb, splits, span = _splits(n, vocab, SAMPLE_BLOCK_N, SAMPLE_BLOCK_V)
    best = torch.empty((splits, n), device=logits.device, dtype=torch.float32)
    best_id = torch.empty((splits, n), device=logits.device, dtype=torch.int64)
    if n:
        gumbel_sample_kernel[(rb, splits)](logits, _mask_or_zeros(disallowed, vocab, logits.device), best, best_id, n,
                                           vocab, span, seed, inv_temperature, BLOCK_N=SAMPLE_BLOCK_N,
                                           BLOCK_V=SAMPLE_BLOCK_V, **COMPILE_OPTIONS, num_warps=NUM_WARPS)
    return _first_max(best, best_id)


def _bias_or_zeros(bias, weight):
    return bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)


def forward(hidden, weight, bias, targets, disallowed, seed: int, inv_temperature: float, ignore_index: int,
            chunk: int):
    n, e = hidden.shape
    vocab = weight.shape[0]
    acc = _acc(hidden.dtype)
    rb, splits, span = _splits(n, vocab, BLOCK_N, BLOCK_V)
    f = dict(device=hidden.device, dtype=acc)
    m, s, tgt, amax = (torch.empty((splits, n), **f) for _ in range(4))
    best = torch.empty((splits, n), device=hidden.device, dtype=torch.float32)
    amax_id, best_id = (torch.empty((splits, n), device=hidden.device, dtype=torch.int64) for _ in range(2))
    if n:
        mlm_fwd_kernel[(rb, splits)](
            hidden, weight, _bias_or_zeros(bias, weight), targets.to(torch.int64),
            _mask_or_zeros(disallowed, vocab, hidden.device), m, s, tgt, amax, amax_id, best, best_id, n, vocab, e,
            span, seed, inv_temperature, **_flags(hidden.dtype), BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_E=BLOCK_E,
            **COMPILE_OPTIONS, num_warps=FWD_NUM_WARPS)
    big = m.max(0).values  # NaN when a split saw a NaN, +inf when one saw +inf: the lse as it is
    safe = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    lse = torch.where(torch.isfinite(big), big + torch.log((s * torch.exp(m - safe)).sum(0)), big)
    valid = targets != ignore_index
    loss = torch.where(valid, lse - tgt.sum(0), torch.zeros_like(lse))  # one split holds the target, others 0
    return loss, lse, _first_max(best, best_id), _first_max(amax, amax_id)


def backward(grad_rows, hidden, weight, bias, targets, lse, ignore_index: int, chunk: int):
    n, e = hidden.shape
    vocab = weight.shape[0]
    acc, flags = _acc(hidden.dtype), _flags(hidden.dtype)
    if hidden.is_cuda:
        chunk = max(chunk, MIN_CHUNK)
    chunk = max(1, min(vocab, chunk))
    dh = torch.zeros((n, e), device=hidden.device, dtype=acc)
    dw = torch.empty_like(weight)
    db = torch.empty(vocab, device=weight.device, dtype=weight.dtype)
    dl = torch.empty((n * chunk,), device=hidden.device, dtype=_dl_dtype(hidden.dtype))
    b = _bias_or_zeros(bias, weight)
    t = targets.to(torch.int64)
    ieee = _dl_dtype(hidden.dtype) != torch.bfloat16
    for v0 in range(0, vocab, chunk):
        vc = min(chunk, vocab - v0)
        if n:
            mlm_dlogits_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(vc, BLOCK_V))](
                hidden, weight, b, t, lse, grad_rows, dl, n, vocab, e, v0, vc, ignore_index, **flags,
                BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_E=BLOCK_E, **COMPILE_OPTIONS, num_warps=NUM_WARPS)
            mlm_dhidden_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(e, BW_BLOCK_E))](
                dl, weight, dh, n, e, v0, vc, IEEE=ieee, BLOCK_N=BLOCK_N, BLOCK_E=BW_BLOCK_E, BLOCK_K=BW_BLOCK_K,
                **COMPILE_OPTIONS, num_warps=NUM_WARPS)
        # at least one e-block: its programs write dbias, which an empty hidden (E = 0) still has
        mlm_dweight_kernel[(triton.cdiv(vc, BLOCK_V), max(1, triton.cdiv(e, BW_BLOCK_E)))](
            dl, hidden, dw, db, n, e, v0, vc, IEEE=ieee, ACC64=flags["ACC64"], BLOCK_V=BLOCK_V, BLOCK_E=BW_BLOCK_E,
            BLOCK_K=BW_BLOCK_K, **COMPILE_OPTIONS, num_warps=NUM_WARPS)
    return dh.to(hidden.dtype), dw, db


def compile_specs():
    specs = []
    i32, i64, f32, u8 = "i32", "i64", ptr(torch.float32), ptr(torch.uint8)
    for dt in DTYPES:
        x, a, d = ptr(dt), ptr(_acc(dt)), ptr(_dl_dtype(dt))
        flags = _flags(dt)
        ieee_bw = _dl_dtype(dt) != torch.bfloat16
        specs.append(Spec(mlm_fwd_kernel, {
            "h_ptr": x, "w_ptr": x, "b_ptr": x, "t_ptr": ptr(torch.int64), "dis_ptr": u8, "m_ptr": a, "s_ptr": a,
            "tgt_ptr": a, "amax_ptr": a, "amax_id_ptr": ptr(torch.int64), "best_ptr": f32,
            "best_id_ptr": ptr(torch.int64), "N": i32, "V": i32, "E": i32, "span": i32, "seed": i64, "inv_t": "fp32"},
            dict(flags, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_E=BLOCK_E), num_warps=FWD_NUM_WARPS))
        specs.append(Spec(gumbel_sample_kernel, {
            "x_ptr": x, "dis_ptr": u8, "best_ptr": f32, "best_id_ptr": ptr(torch.int64), "N": i32, "V": i32,
            "span": i32, "seed": i64, "inv_t": "fp32"},
            dict(BLOCK_N=SAMPLE_BLOCK_N, BLOCK_V=SAMPLE_BLOCK_V), num_warps=NUM_WARPS))
        specs.append(Spec(mlm_dlogits_kernel, {
            "h_ptr": x, "w_ptr": x, "b_ptr": x, "t_ptr": ptr(torch.int64), "lse_ptr": a, "g_ptr": a, "dl_ptr": d,
            "N": i32, "V": i32, "E": i32, "v0": i32, "vc": i32, "ignore_index": i64},
            dict(flags, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_E=BLOCK_E), num_warps=NUM_WARPS))
        specs.append(Spec(mlm_dhidden_kernel, {
            "dl_ptr": d, "w_ptr": x, "dh_ptr": a, "N": i32, "E": i32, "v0": i32, "vc": i32},
            dict(IEEE=ieee_bw, BLOCK_N=BLOCK_N, BLOCK_E=BW_BLOCK_E, BLOCK_K=BW_BLOCK_K), num_warps=NUM_WARPS))
        specs.append(Spec(mlm_dweight_kernel, {
            "dl_ptr": d, "h_ptr": x, "dw_ptr": x, "db_ptr": x, "N": i32, "E": i32, "v0": i32, "vc": i32},
            dict(IEEE=ieee_bw, ACC64=flags["ACC64"], BLOCK_V=BLOCK_V, BLOCK_E=BW_BLOCK_E, BLOCK_K=BW_BLOCK_K),
            num_warps=NUM_WARPS))
    return specs
