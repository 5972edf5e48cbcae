"""Triton DeBERTa disentangled attention: flash-style forward and backward, no [T, T] tensor anywhere.

Contract (shapes, masking, dropout, lse): electra_fast/reference/disentangled_attention.py.
    forward(q, k, v, pos_key, pos_query, mask, rel_slots, scale, dropout_p, seed) -> (out, lse)
    backward(grad_out, q, k, v, pos_key, pos_query, mask, rel_slots, out, lse, scale, dropout_p, seed)
        -> (dq, dk, dv, dpos_key, dpos_query)
q, k, v [B, H, T, D] (D in 32 / 64 / 128; fp32 / fp16 / bf16), pos_* [H, 2k, D] or None, mask uint8 [B, T] or
None, rel_slots int32 [2T - 1] with rel_slots[i - j + T - 1] = s(i, j).
Packed (a trailing cu_seqlens, int32 [B + 1]): q, k, v [N, H, D], no mask, T = max_seqlen (the slot table's and the
dropout index's length), lse [H, N]. The grid stays (blocks of T) x (B * H); a program reads its sequence's offset
and length L from cu_seqlens (_rows), addresses rows with stride H * D and stops at L, so blocks past a sequence's
end cost a launch only, and every (b, h) is the padded computation of a row of length L without a mask.

Design (for H100; performance is unmeasured so far - no GPU was available while writing this):

* Toeplitz position terms. A BM x BN tile (query rows i0.., key columns j0..) touches only the BM + BN - 1
  consecutive distances r = i - j in [d - BN + 1, d + BM - 1], d = i0 - j0. Band row c <-> distance
  d - BN + 1 + c, and element (a, b) of the tile sits on band row c = a - b + BN - 1. The c2p term is one
  tensor-core product q_blk @ pos_key[slots(band)]^T ([BM, BR], BR = BM + BN) followed by a register gather
  of the diagonal band (tl.gather along the band axis); p2c is pos_query[slots(band)] @ k_blk^T ([BR, BN])
  gathered along the other axis. That is 2x the c2c product per term instead of a per-element gather from
  an HBM-resident [T, 2k] table (what the public peers do), and nothing [T, 2k] is ever materialised.
* Saturated tiles. When every distance of a tile maps to one slot (all |i - j| beyond the log buckets,
  i.e. most tiles once T >> k), the position terms are a row vector q_blk @ pos_key[s] plus a column vector
  k_blk @ pos_query[s]: the band products and gathers are skipped (forward and backward), a tile-uniform
  branch taken after loading BR slot ids.
* Forward: program per (query block, batch * head), online softmax in fp32 with exp2, lse saved (+inf for
  padded queries and rows without a valid key, whose output is 0; NaN, with a NaN output, for a row with a NaN or
  infinite score). Dropout regenerates Philox words
  (purpose ATTN_DROPOUT, element e = ((b * H + h) * T + i) * T + j: word e % 4 of the call at e // 4) per
  tile; nothing is stored.
* Backward: delta = rowsum(dO * O) (one small kernel); a dK/dV pass (program per key block, looping over
  query blocks) that also produces dpos_query, and a dQ pass (program per query block, looping over key
  blocks) that also produces dpos_key; both recompute P from lse. The two passes do the same amount of work.
* Deterministic position gradients without atomics. Within one program successive tiles walk the distances
  upwards (the dQ pass loops over key blocks backwards for that), so - slots being monotone in the distance
  with steps of at most 1 (see slots_supported below) - the slots a tile touches form a window
  [lo, lo + BR) that only slides up. Each program keeps that window of slot rows in registers: a tile's
  band contributions [BR, D] are summed per slot (segmented scan over runs of equal slots, then a gather),
  added to the window, and the slot rows the window leaves are final for this block and added once into the
  program's own fp32 workspace row block (the window is a ring buffer: slot s lives in row s % BR, so
  sliding it moves nothing). A fixed-order torch sum over (batch, program) then reduces
  the workspace: no atomics, results independent of scheduling.
  Grouping keeps that workspace O(T) per (b, h): a backward program handles G consecutive blocks (query
  blocks in the dQ pass, key blocks in the dK/dV pass) one after another, each with a fresh window, and
  ACCUMULATES its finished slot rows into the program's workspace (load + add + store: the program is its
  rows' only writer and walks its blocks in a fixed order, so results stay deterministic; a barrier after
  each block's last flush orders the stores before the next block's loads). The rows cover only the slots
  reachable at this T: W0 = max(0, k - T + 1) .. min(2k - 1, k + T - 1), NW <= min(2k, 2T - 1) of them.
  G = max(1, ceil(NW / (4 * BLOCK))) (GROUP_SLOTS_PER_BLOCK = 4), grid ceil(ceil(T / BLOCK) / G) x B * H.
  Workspace (fp32, per position term present; workspace_layout() proves it):
      4 * B * H * D * ceil(ceil(T / BLOCK) / G) * NW <= 4 * B * H * D * (4T + 4 * BLOCK + NW)
                                                     <= 4 * B * H * D * (6T + 4 * BLOCK) bytes,
  i.e. <= 4 * B * H * D * (12T + 256) for both terms (BLOCK = 32), independent of k. Total extra memory of
  the op beyond inputs and outputs: lse fp32 [B, H, T] (saved by the forward), delta fp32 [B, H, T], that
  workspace, and the dpos_key / dpos_query reductions (fp32 [H, 2k, D] each): O(B * H * T * D + H * k * D).
* Block sizes per head dim live in one table (CONFIGS) that the launchers and compile_specs() share;
  BM = BN so that BR = BM + BN is a power of two. Which position terms exist, the key mask and dropout are
  runtime arguments (Triton's JIT still folds the flags equal to 1), so the AOT lane compiles one kernel per
  (pass, dtype, head dim). fp32 inputs use tf32x3 products (fp32-level accuracy on tensor cores).
* Slot tables: the backward needs slots monotone in i - j with steps of 0 or 1 (every transformers table with
  position_buckets <= max_relative_positions / 2, and the bucket-free one). slots_supported() tells the op;
  a table that breaks the rule turns dpos_key / dpos_query into NaN instead of silently wrong values.
* Known: the AOT build shows register spills (ptxas stack 0.3-2 KB/thread) from the band gathers
  (tl.gather) on top of the flash state, and the 72 specialisations take minutes to compile; tile sizes
  are untuned. Tuning on an H100 is the next step.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from .philox import element_word, uniform
from .spec import COMPILE_OPTIONS, Spec, ptr

ATTN_DROPOUT = 3  # Philox purpose (electra_fast/reference/philox.py); literal in _keep (jit code)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (32, 64, 128)
DELTA_ROWS = 64

# head dim -> pass -> (BM, BN, num_warps, num_stages). BM == BN (the band is BM + BN rows, a power of two).
CONFIGS = {
    32: {"fwd": (64, 64, 4, 2), "dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)},
    64: {"fwd": (64, 64, 8, 2), "dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)},
    128: {"fwd": (64, 64, 8, 2), "dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)},
}
# fp32 tiles are twice the bytes: the 64 x 64 forward at D = 128 needs 229 KB of shared memory (sm_80 has 163).
FP32_CONFIGS = {128: {"fwd": (32, 32, 4, 1)}}


def config(head_dim: int, dtype: torch.dtype, pas: str):
    """(BM, BN, num_warps, num_stages) of pass "fwd" | "dkdv" | "dq" - the launchers and compile_specs()."""
    if dtype == torch.float32 and pas in FP32_CONFIGS.get(head_dim, {}):
        return FP32_CONFIGS[head_dim][pas]
    return CONFIGS[head_dim][pas]


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _slots_at(slots_ptr, r, T):
    """Slot ids of distances r (any shape), clamped into the table (the slot map is monotone, so a clamped
    distance never breaks the windowing; clamped rows only ever meet zero contributions)."""
    idx = tl.minimum(tl.maximum(r + T - 1, 0), 2 * T - 2)
    return tl.load(slots_ptr + idx, mask=(idx >= 0) & (idx < 2 * T - 1), other=0)


@triton.jit
def _band(slots_ptr, d, T, BN: tl.constexpr, BR: tl.constexpr):
    """(slots [BR] of distances d - BN + 1 + c, smallest, largest slot of the real band rows c < BR - 1)."""
    c = tl.arange(0, BR)
    sl = _slots_at(slots_ptr, d - (BN - 1) + c, T)
    real = c < BR - 1
    return sl, tl.min(tl.where(real, sl, 2147483647), 0), tl.max(tl.where(real, sl, -1), 0)


@triton.jit
def _pos_rows(pos_ptr, sl, offs_d, NS, D: tl.constexpr):
    """pos[sl] rows [BR, D] of one head."""
    ok = (sl >= 0) & (sl < NS)
    return tl.load(pos_ptr + sl[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _pos_row(pos_ptr, s, offs_d, NS, D: tl.constexpr):
    """pos[s] as fp32 [D] (s: scalar slot)."""
    sv = offs_d * 0 + s  # a vector mask: the interpreter rejects scalar-tensor masks
    return tl.load(pos_ptr + sv * D + offs_d, mask=(sv >= 0) & (sv < NS), other=0.0).to(tl.float32)


@triton.jit
def _pos_scores(q, kT, posk_ptr, posq_ptr, sl, smin, smax, offs_d, NS, has_c2p, has_p2c, BM: tl.constexpr,
                BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    """c2p + p2c terms (unscaled, fp32 [BM, BN]) of one tile with band slots ``sl``."""
    pos = tl.zeros([BM, BN], dtype=tl.float32)
    if smin == smax:  # saturated tile: one slot for every (i, j)
        if has_c2p != 0:
            pk = _pos_row(posk_ptr, smin, offs_d, NS, D)
            pos += tl.sum(q.to(tl.float32) * pk[None, :], 1)[:, None]
        if has_p2c != 0:
            pq = _pos_row(posq_ptr, smin, offs_d, NS, D)
            pos += tl.sum(kT.to(tl.float32) * pq[:, None], 0)[None, :]
    else:
        band_idx = tl.arange(0, BM)[:, None] - tl.arange(0, BN)[None, :] + (BN - 1)  # [BM, BN] -> band row
        if has_c2p != 0:
            c2p = tl.dot(q, tl.trans(_pos_rows(posk_ptr, sl, offs_d, NS, D)), input_precision=PREC)  # [BM, BR]
            pos += tl.gather(c2p, band_idx, 1)
        if has_p2c != 0:
            p2c = tl.dot(_pos_rows(posq_ptr, sl, offs_d, NS, D), kT, input_precision=PREC)  # [BR, BN]
            pos += tl.gather(p2c, band_idx, 0)
    return pos


@triton.jit
def _rows(cu_ptr, b, h, T, H, N, varlen, D: tl.constexpr):
    """(L, base, ld, lse_off, delta_off, delta_step) of (b, h): its length, the offset of its first row and the row
    stride in q / k / v / out / grads, and where its lse and delta rows are. Padded: [B, H, T, D], lse and delta
    [B, H, T]. Packed (varlen): sequence b of [N, H, D] (tokens cu[b] .. cu[b + 1] - 1), lse [H, N], delta [N, H]
    (out's rows in memory order)."""
    if varlen != 0:
        start = tl.load(cu_ptr + b)
        L = tl.load(cu_ptr + b + 1) - start
        base = (start.to(tl.int64) * H + h) * D
        ld = H * D
        lse_off = h.to(tl.int64) * N + start
        delta_off = start.to(tl.int64) * H + h
        delta_step = H
    else:
        L = T + 0 * H
        base = (b * H + h).to(tl.int64) * T * D
        ld = 0 * H + D
        lse_off = (b * H + h).to(tl.int64) * T
        delta_off = lse_off
        delta_step = 0 * H + 1
    return L, base, ld, lse_off, delta_off, delta_step


# CUDA caps grid axes y and z at 65535 blocks (x at 2^31 - 1): the (b, h) index spans y and z, so B * H up to
# 65535^2 launches (many short packed sequences pass 65535 at H = 12 from 5462 of them); the block index stays on x.
GRID_YZ = 65535


def _heads_grid(blocks: int, bh: int) -> tuple:
    """Launch grid (blocks, y, z) covering bh = B * H (b, h) pairs, y * z >= bh with y, z <= GRID_YZ."""
    z = triton.cdiv(bh, GRID_YZ)
    return blocks, triton.cdiv(bh, z), z


@triton.jit
def _head():
    """This program's b * H + h from grid axes y and z (see _heads_grid); >= BH for the last z slice's spare ones."""
    return tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)


@triton.jit
def _keep(seed, bh, offs_m, offs_n, T):
    """Dropout keep-uniforms [BM, BN] of Philox purpose ATTN_DROPOUT: element e = ((b * H + h) * T + i) * T + j
    reads word e % 4 of the call at index e // 4 (a tile computes each call once per element it serves)."""
    e = (bh.to(tl.int64) * T + offs_m.to(tl.int64))[:, None] * T + offs_n.to(tl.int64)[None, :]
    return uniform(element_word(seed, e, 3))  # ATTN_DROPOUT


@triton.jit
def _seg_add(v1, f1, v2, f2):
    # segmented inclusive sum: f marks the first row of a run of equal slots
    return tl.where(f2 != 0, v2, v1 + v2), f1 | f2


@triton.jit
def _window_add(win, rows, sl, lo, BR: tl.constexpr, D: tl.constexpr):
    """Ring window of slot rows: win[p] holds slot s in [lo, lo + BR) with s % BR == p. Adds rows[c] (band row
    c, slot sl[c]; sl monotone with steps <= 1 and sl[0] == lo) to the slot rows.

    A slot table with other steps (see slots_supported) poisons the window with NaN: loud, never silently
    wrong gradients."""
    c = tl.arange(0, BR)
    prev = tl.gather(sl, tl.maximum(c - 1, 0), 0)
    step = sl - prev
    table_ok = (tl.max(step, 0) <= 1) & (tl.min(step, 0) >= 0)
    start = ((c == 0) | (step != 0)).to(tl.int32)
    run, _ = tl.associative_scan((rows, start[:, None] + tl.zeros([BR, D], dtype=tl.int32)), 0, _seg_add)
    count = tl.histogram(sl - lo, BR)  # band rows of slot lo + e
    end = tl.cumsum(count, 0) - 1  # last band row of slot lo + e's run
    e = (c + BR - lo % BR) % BR  # ring position p = c holds slot lo + e
    end_p = tl.maximum(tl.gather(end, e, 0), 0)
    present = tl.gather(count, e, 0) > 0
    add = tl.gather(run, end_p[:, None] + tl.zeros([BR, D], dtype=tl.int32), 0)
    return tl.where(table_ok, win + tl.where(present[:, None], add, 0.0), float("nan"))


@triton.jit
def _window_emit(win, ws_ptr, lo, lo_next, offs_d, W0, NW, BR: tl.constexpr, D: tl.constexpr):
    """Add the ring rows of slots [lo, lo_next) (final for this block: its later tiles only touch slots >=
    lo_next) into the program's workspace rows (slot s -> row s - W0 of NW) and clear them for the slots
    lo + BR... that reuse their positions. Accumulating (not storing) lets one program reduce several blocks
    into the same rows; each element's load and store are done by the same thread, and within one block a
    slot is emitted once, so only the switch to the next block needs a barrier (the caller's)."""
    e = (tl.arange(0, BR) + BR - lo % BR) % BR
    done = e < lo_next - lo
    w = lo + e - W0
    ok = (done & (w >= 0) & (w < NW))[:, None]
    ptrs = ws_ptr + w[:, None] * D + offs_d[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + win, mask=ok)
    return tl.where(done[:, None], 0.0, win)


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def da_fwd_kernel(q_ptr, k_ptr, v_ptr, posk_ptr, posq_ptr, mask_ptr, slots_ptr, cu_ptr, out_ptr, lse_ptr,
                  T, H, BH, NS, scale, dropout_p, inv_keep, seed, has_c2p, has_p2c, has_mask, N, varlen,
                  D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = _head()
    if bh >= BH:
        return
    b = bh // H
    h = bh % H
    i0 = pid_m * BM
    offs_m = i0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    L, base, ld, lse_off, _, _ = _rows(cu_ptr, b, h, T, H, N, varlen, D)
    row_ok = offs_m < L
    q = tl.load(q_ptr + base + offs_m[:, None] * ld + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    posk_ptr += h.to(tl.int64) * NS * D
    posq_ptr += h.to(tl.int64) * NS * D
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    any_key = tl.zeros([BM], dtype=tl.int32)  # 1 once a valid key was seen (the same for every row)
    for j0 in range(0, L, BN):
        offs_n = j0 + tl.arange(0, BN)
        col_ok = offs_n < L
        kT = tl.load(k_ptr + base + offs_n[None, :] * ld + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        v = tl.load(v_ptr + base + offs_n[:, None] * ld + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=PREC)
        if (has_c2p != 0) | (has_p2c != 0):
            sl, smin, smax = _band(slots_ptr, i0 - j0, T, BN, BM + BN)
            s += _pos_scores(q, kT, posk_ptr, posq_ptr, sl, smin, smax, offs_d, NS, has_c2p, has_p2c, BM, BN, D,
                             PREC)
        if has_mask != 0:
            col_ok = col_ok & (tl.load(mask_ptr + b * T + offs_n, mask=col_ok, other=0) != 0)
        any_key = tl.maximum(any_key, tl.max(col_ok.to(tl.int32), 0))
        s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf while a row has no valid key
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if dropout_p > 0.0:
            p = tl.where(_keep(seed, bh, offs_m, offs_n, T) >= dropout_p, p * inv_keep, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    dead = (any_key == 0) | (offs_m >= L)
    if has_mask != 0:
        dead = dead | (tl.load(mask_ptr + b * T + offs_m, mask=row_ok, other=0) == 0)
    # A live row with a NaN or infinite score (l_i NaN, or 0 when every score is -inf) is invalid: NaN out, lse NaN.
    l_safe = tl.where(dead, 1.0, l_i)
    out = tl.where(dead[:, None], 0.0, acc / l_safe[:, None])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    lse = tl.where(dead, float("inf"), tl.where(tl.abs(lse) < float("inf"), lse, float("nan")))
    tl.store(out_ptr + base + offs_m[:, None] * ld + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_ptr + lse_off + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------- backward
@triton.jit
def da_bwd_delta_kernel(out_ptr, dout_ptr, delta_ptr, n_rows, D: tl.constexpr, ROWS: tl.constexpr):
    """delta[r] = sum_d dO[r, d] * O[r, d] in fp32 over the B * H * T rows."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    ok = rows < n_rows
    o = tl.load(out_ptr + rows[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + rows[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(delta_ptr + rows, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _tile_ds(q, kT, v, do, lse2, delta, posk_ptr, posq_ptr, slots_ptr, mask_ptr, seed, bh, b, offs_m, offs_n,
             offs_d, d, T, L, NS, qk_scale, dropout_p, inv_keep, has_c2p, has_p2c, has_mask, D: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Recompute one tile: (dropped probabilities [BM, BN], dS [BM, BN] w.r.t. the unscaled score, band slots,
    smin, smax). lse2 = lse * log2(e) (+inf for dead rows -> P = 0). T: the slot table's and the dropout index's
    length, L: the (b, h) keys' (T but for packed sequences)."""
    s = tl.dot(q, kT, input_precision=PREC)
    sl, smin, smax = _band(slots_ptr, d, T, BN, BM + BN)
    if (has_c2p != 0) | (has_p2c != 0):
        s += _pos_scores(q, kT, posk_ptr, posq_ptr, sl, smin, smax, offs_d, NS, has_c2p, has_p2c, BM, BN, D,
                         PREC)
    col_ok = offs_n < L
    if has_mask != 0:
        col_ok = col_ok & (tl.load(mask_ptr + b * T + offs_n, mask=col_ok, other=0) != 0)
    s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))
    # Dead rows (padded queries, no valid key) have P = dS = 0 even at NaN scores, and a -inf score (a masked key)
    # P = 0 also in an invalid row (lse NaN): the reference's rule
    dead = (lse2 == float("inf"))[:, None]
    # clamped at 0 as the C++ kernel is: lse's round trip through ln 2 can put it one ulp below a huge top score, and
    # exp2 of that ulp (1024 at scores ~1e10) overflowed; a NaN difference stays NaN
    d = s - lse2[:, None]
    p = tl.where(dead | (s == float("-inf")), 0.0, tl.exp2(tl.where(d > 0.0, 0.0, d)))
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    pd = p
    if dropout_p > 0.0:
        kept = tl.where(_keep(seed, bh, offs_m, offs_n, T) >= dropout_p, inv_keep, 0.0)
        pd = p * kept  # products, not selects: a dropped NaN stays NaN, as in the reference
        dp = dp * kept
    ds = tl.where(dead, 0.0, p * (dp - delta[:, None]))
    return pd, ds, sl, smin, smax


@triton.jit
def da_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, posk_ptr, posq_ptr, mask_ptr, slots_ptr, cu_ptr, dout_ptr, lse_ptr,
                       delta_ptr, dk_ptr, dv_ptr, ws_ptr, T, H, BH, NS, scale, dropout_p, inv_keep, seed, has_c2p,
                       has_p2c, has_mask, N, varlen, G, W0, NW, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       PREC: tl.constexpr):
    """Program per (group of G consecutive key blocks, b * H + h): dK, dV of each block and (p2c) the group's
    dpos_query rows in ws [NW, D] (slots W0 .. W0 + NW - 1), accumulated over its blocks in order."""
    BR: tl.constexpr = BM + BN
    pid = tl.program_id(0)
    bh = _head()
    if bh >= BH:
        return
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    L, base, ld, lse_off, delta_off, delta_step = _rows(cu_ptr, b, h, T, H, N, varlen, D)
    posk_ptr += h.to(tl.int64) * NS * D
    posq_ptr += h.to(tl.int64) * NS * D
    ws_ptr += (bh.to(tl.int64) * tl.num_programs(0) + pid) * NW * D
    qk_scale = scale * 1.4426950408889634
    e = tl.arange(0, BR)
    # hb[c, b] = dS[c + b - BN + 1, b]: the tile's dS laid out by band row (distance) for the p2c gradients
    h_idx = e[:, None] + tl.arange(0, BN)[None, :] - (BN - 1)
    h_ok = (h_idx >= 0) & (h_idx < BM)
    h_idx = tl.minimum(tl.maximum(h_idx, 0), BM - 1)
    n_blocks = tl.cdiv(L, BN)
    for g in range(0, G):
        pid_n = pid * G + g
        if pid_n < n_blocks:
            j0 = pid_n * BN
            offs_n = j0 + tl.arange(0, BN)
            col_ok = offs_n < L
            k = tl.load(k_ptr + base + offs_n[:, None] * ld + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptr + base + offs_n[:, None] * ld + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            kT = tl.trans(k)
            dk = tl.zeros([BN, D], dtype=tl.float32)
            dv = tl.zeros([BN, D], dtype=tl.float32)
            win = tl.zeros([BR, D], dtype=tl.float32)  # a fresh slot window per block
            lo = _slots_at(slots_ptr, -j0 - (BN - 1), T)
            for i0 in range(0, L, BM):
                offs_m = i0 + tl.arange(0, BM)
                row_ok = offs_m < L
                q = tl.load(q_ptr + base + offs_m[:, None] * ld + offs_d[None, :], mask=row_ok[:, None], other=0.0)
                do = tl.load(dout_ptr + base + offs_m[:, None] * ld + offs_d[None, :], mask=row_ok[:, None],
                             other=0.0)
                lse2 = tl.load(lse_ptr + lse_off + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
                delta = tl.load(delta_ptr + delta_off + offs_m * delta_step, mask=row_ok, other=0.0)
                pd, ds, sl, smin, smax = _tile_ds(q, kT, v, do, lse2, delta, posk_ptr, posq_ptr, slots_ptr,
                                                  mask_ptr, seed, bh, b, offs_m, offs_n, offs_d, i0 - j0, T, L, NS,
                                                  qk_scale, dropout_p, inv_keep, has_c2p, has_p2c, has_mask, D,
                                                  BM, BN, PREC)
                dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PREC)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
                if has_p2c != 0:
                    if smin == smax:  # saturated: every (i, j) of the tile reads pos_query[smin]
                        col = tl.sum(ds, 0)
                        dk += col[:, None] * _pos_row(posq_ptr, smin, offs_d, NS, D)[None, :]
                        row = tl.sum(col[:, None] * k.to(tl.float32), 0)
                        win += tl.where((e == lo % BR)[:, None], row[None, :], 0.0)
                    else:
                        hb = tl.where(h_ok, tl.gather(ds, h_idx, 0), 0.0).to(q.dtype)  # [BR, BN]
                        dk += tl.dot(tl.trans(hb), _pos_rows(posq_ptr, sl, offs_d, NS, D), input_precision=PREC)
                        win = _window_add(win, tl.dot(hb, k, input_precision=PREC), sl, lo, BR, D)
                    lo_next = _slots_at(slots_ptr, i0 + BM - j0 - (BN - 1), T)
                    win = _window_emit(win, ws_ptr, lo, lo_next, offs_d, W0, NW, BR, D)
                    lo = lo_next
            if has_p2c != 0:
                _window_emit(win, ws_ptr, lo, lo + BR, offs_d, W0, NW, BR, D)
            tl.debug_barrier()  # the next block's workspace loads see this block's stores, whichever thread did them
            dk = dk * scale
            tl.store(dk_ptr + base + offs_n[:, None] * ld + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
                     mask=col_ok[:, None])
            tl.store(dv_ptr + base + offs_n[:, None] * ld + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty),
                     mask=col_ok[:, None])


@triton.jit
def da_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, posk_ptr, posq_ptr, mask_ptr, slots_ptr, cu_ptr, dout_ptr, lse_ptr,
                     delta_ptr, dq_ptr, ws_ptr, T, H, BH, NS, scale, dropout_p, inv_keep, seed, has_c2p,
                     has_p2c, has_mask, N, varlen, G, W0, NW, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     PREC: tl.constexpr):
    """Program per (group of G consecutive query blocks, b * H + h): dQ of each block and (c2p) the group's
    dpos_key rows in ws [NW, D] (slots W0 .. W0 + NW - 1), accumulated over its blocks in order.
    Key blocks are visited last to first so that the distance i0 - j0 (and the slot window) only grows."""
    BR: tl.constexpr = BM + BN
    pid = tl.program_id(0)
    bh = _head()
    if bh >= BH:
        return
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    L, base, ld, lse_off, delta_off, delta_step = _rows(cu_ptr, b, h, T, H, N, varlen, D)
    posk_ptr += h.to(tl.int64) * NS * D
    posq_ptr += h.to(tl.int64) * NS * D
    ws_ptr += (bh.to(tl.int64) * tl.num_programs(0) + pid) * NW * D
    qk_scale = scale * 1.4426950408889634
    e = tl.arange(0, BR)
    # gb[a, c] = dS[a, a - c + BN - 1]: the tile's dS laid out by band row (distance) for the c2p gradients
    g_idx = tl.arange(0, BM)[:, None] - e[None, :] + (BN - 1)
    g_ok = (g_idx >= 0) & (g_idx < BN)
    g_idx = tl.minimum(tl.maximum(g_idx, 0), BN - 1)
    n_blocks = tl.cdiv(L, BN)
    n_qblocks = tl.cdiv(L, BM)
    for g in range(0, G):
        pid_m = pid * G + g
        if pid_m < n_qblocks:
            i0 = pid_m * BM
            offs_m = i0 + tl.arange(0, BM)
            row_ok = offs_m < L
            q = tl.load(q_ptr + base + offs_m[:, None] * ld + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(dout_ptr + base + offs_m[:, None] * ld + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(lse_ptr + lse_off + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(delta_ptr + delta_off + offs_m * delta_step, mask=row_ok, other=0.0)
            dq = tl.zeros([BM, D], dtype=tl.float32)
            win = tl.zeros([BR, D], dtype=tl.float32)  # a fresh slot window per block
            lo = _slots_at(slots_ptr, i0 - (n_blocks - 1) * BN - (BN - 1), T)
            for jb in range(0, n_blocks):
                j0 = (n_blocks - 1 - jb) * BN
                offs_n = j0 + tl.arange(0, BN)
                col_ok = offs_n < L
                kT = tl.load(k_ptr + base + offs_n[None, :] * ld + offs_d[:, None], mask=col_ok[None, :], other=0.0)
                v = tl.load(v_ptr + base + offs_n[:, None] * ld + offs_d[None, :], mask=col_ok[:, None], other=0.0)
                pd, ds, sl, smin, smax = _tile_ds(q, kT, v, do, lse2, delta, posk_ptr, posq_ptr, slots_ptr,
                                                  mask_ptr, seed, bh, b, offs_m, offs_n, offs_d, i0 - j0, T, L, NS,
                                                  qk_scale, dropout_p, inv_keep, has_c2p, has_p2c, has_mask, D,
                                                  BM, BN, PREC)
                dq += tl.dot(ds.to(q.dtype), tl.trans(kT), input_precision=PREC)
                if has_c2p != 0:
                    if smin == smax:  # saturated: every (i, j) of the tile reads pos_key[smin]
                        rsum = tl.sum(ds, 1)
                        dq += rsum[:, None] * _pos_row(posk_ptr, smin, offs_d, NS, D)[None, :]
                        row = tl.sum(rsum[:, None] * q.to(tl.float32), 0)
                        win += tl.where((e == lo % BR)[:, None], row[None, :], 0.0)
                    else:
                        gb = tl.where(g_ok, tl.gather(ds, g_idx, 1), 0.0).to(q.dtype)  # [BM, BR]
                        dq += tl.dot(gb, _pos_rows(posk_ptr, sl, offs_d, NS, D), input_precision=PREC)
                        win = _window_add(win, tl.dot(tl.trans(gb), q, input_precision=PREC), sl, lo, BR, D)
                    lo_next = _slots_at(slots_ptr, i0 - j0 + 1, T)  # first distance of the next (lower) key block
                    win = _window_emit(win, ws_ptr, lo, lo_next, offs_d, W0, NW, BR, D)
                    lo = lo_next
            if has_c2p != 0:
                _window_emit(win, ws_ptr, lo, lo + BR, offs_d, W0, NW, BR, D)
            tl.debug_barrier()  # the next block's workspace loads see this block's stores, whichever thread did them
            dq = dq * scale
            tl.store(dq_ptr + base + offs_m[:, None] * ld + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
                     mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------- launchers
def _prec(dtype) -> str:
    # fp32 inputs: three tf32 products (~fp32 accuracy on tensor cores; "ieee" compiles to huge FMA loops).
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _common(q, pos_key, pos_query, mask, rel_slots, dropout_p):
    ns = pos_key.shape[1] if pos_key is not None else (pos_query.shape[1] if pos_query is not None else 1)
    return dict(posk=pos_key if pos_key is not None else q, posq=pos_query if pos_query is not None else q,
                mask=mask if mask is not None else rel_slots.view(torch.uint8), NS=ns,  # never read
                inv_keep=1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0)


def slots_supported(rel_slots: torch.Tensor):
    """None if the backward can reduce the position gradients for this slot table, else the reason.

    The windowed reduction needs slots monotone in i - j with steps of 0 or 1: true for transformers' tables
    with position_buckets <= max_relative_positions / 2 (DeBERTa-v3: 256 / 512) and without buckets, false for
    e.g. position_buckets == max_relative_positions (steps of 2). Call it on a CPU table (it reads values);
    a table that breaks the rule makes the kernels' position gradients NaN rather than wrong.
    """
    steps = rel_slots.to(torch.int64).diff()
    if steps.numel() and (int(steps.min()) < 0 or int(steps.max()) > 1):
        return "the slot table is not monotone with steps of 0 or 1 (position_buckets vs max_relative_positions)"
    return None


def unsupported(head_dim: int, dtype: torch.dtype, rel_slots: torch.Tensor, varlen: bool = False) -> list:
    """Every reason these kernels cannot serve a call (the op spec asks before routing here); ``rel_slots`` is the
    call's slot table on the CPU (see slots_supported); ``varlen``: a packed call (cu_seqlens), which they serve."""
    reasons = []
    if head_dim not in HEAD_DIMS:
        reasons.append(f"the Triton kernels support head dims {HEAD_DIMS}, got {head_dim}")
    if dtype not in DTYPES:
        reasons.append(f"the Triton kernels support fp32 / fp16 / bf16, got {dtype}")
    slots = slots_supported(rel_slots)
    if slots is not None:
        reasons.append(f"{slots}: this slot table is not supported by the Triton kernels")
    return reasons


def _flags(pos_key, pos_query, mask):
    # runtime flags, not constexprs: one compiled kernel per (dtype, head dim) keeps the AOT lane affordable
    return int(pos_key is not None), int(pos_query is not None), int(mask is not None)


def _geometry(q, rel_slots, cu_seqlens):
    """(B, H, T, D, N, lse shape): padded [B, H, T, D]; packed [N, H, D] with B sequences and T = max_seqlen
    (the slot table's length), lse [H, N]. N is 0 for padded calls (never read)."""
    if cu_seqlens is None:
        B, H, T, D = q.shape
        return B, H, T, D, 0, (B, H, T)
    N, H, D = q.shape
    return cu_seqlens.numel() - 1, H, (rel_slots.numel() + 1) // 2, D, N, (H, N)


def _packed_args(cu_seqlens, rel_slots, N):
    # (cu_ptr, ..., N, varlen): a padded call passes the slot table as a never-read cu_ptr
    return (rel_slots if cu_seqlens is None else cu_seqlens), (N, int(cu_seqlens is not None))


def forward(q, k, v, pos_key, pos_query, mask, rel_slots, scale: float, dropout_p: float, seed: int,
            cu_seqlens=None):
    """(out [B, H, T, D] in q's dtype, lse fp32 [B, H, T]); packed (cu_seqlens): out [N, H, D], lse [H, N]."""
    B, H, T, D, N, lse_shape = _geometry(q, rel_slots, cu_seqlens)
    cu, packed = _packed_args(cu_seqlens, rel_slots, N)
    bm, bn, warps, stages = config(D, q.dtype, "fwd")
    c = _common(q, pos_key, pos_query, mask, rel_slots, dropout_p)
    out = torch.empty_like(q)
    lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    da_fwd_kernel[_heads_grid(triton.cdiv(T, bm), B * H)](
        q, k, v, c["posk"], c["posq"], c["mask"], rel_slots, cu, out, lse, T, H, B * H, c["NS"], float(scale),
        float(dropout_p), c["inv_keep"], int(seed), *_flags(pos_key, pos_query, mask), *packed, D=D, BM=bm, BN=bn,
        PREC=_prec(q.dtype), **COMPILE_OPTIONS, num_warps=warps, num_stages=stages)
    return out, lse


# Blocks per backward program: G = max(1, ceil(slots / (GROUP_SLOTS_PER_BLOCK * block))), so that a program's
# workspace rows (one per slot) amortise over at least GROUP_SLOTS_PER_BLOCK * block / slots of its own blocks'
# rows: the workspace stays O(T) per (b, h) however large the span is (bound in workspace_layout()).
GROUP_SLOTS_PER_BLOCK = 4


def workspace_layout(T: int, D: int, span2: int, pas: str, dtype: torch.dtype):
    """(G, programs, W0, NW) of backward pass "dq" (c2p -> dpos_key) or "dkdv" (p2c -> dpos_query).

    The pass's grid is (programs, B * H); program p handles the G consecutive blocks p * G .. p * G + G - 1
    (BLOCK = BM_dq or BN_dkdv rows each, blocks >= n = ceil(T / BLOCK) skipped) and accumulates their position
    gradients into its own fp32 workspace rows [NW, D] for slots W0 .. W0 + NW - 1. Those are the slots any
    (i, j) can reach: s(0) = k and the slot map is monotone with steps <= 1 (slots_supported), so
    s(i - j) lies in [max(0, k - T + 1), min(2k - 1, k + T - 1)], NW <= min(2k, 2T - 1).

    Bound. programs = ceil(n / G). If G = 1, NW <= 4 * BLOCK and programs * NW <= n * 4 * BLOCK. If G > 1,
    G >= NW / (4 * BLOCK) and programs * NW <= (n / G + 1) * NW <= n * 4 * BLOCK + NW. With n * BLOCK <= T +
    BLOCK - 1 and NW <= 2T - 1: programs * NW <= 4T + 4 * BLOCK + NW <= 6T + 4 * BLOCK - 1 rows per (b, h).
    """
    blk = config(D, dtype, pas)[0 if pas == "dq" else 1]
    k = span2 // 2
    w0 = max(0, k - (T - 1))
    nw = min(span2 - 1, k + T - 1) - w0 + 1
    g = max(1, math.ceil(nw / (GROUP_SLOTS_PER_BLOCK * blk)))
    return g, triton.cdiv(triton.cdiv(T, blk), g), w0, nw


def workspace_shapes(B: int, H: int, T: int, D: int, span2: int, c2p: bool, p2c: bool,
                     dtype: torch.dtype = torch.bfloat16):
    """{"dq": fp32 workspace shape of the c2p gradients or None, "dkdv": same for p2c} - what backward()
    allocates (it calls this): [B, H, programs, NW, D] per pass present (workspace_layout)."""
    def shape(pas, present):
        if not present:
            return None
        _, programs, _, nw = workspace_layout(T, D, span2, pas, dtype)
        return (B, H, programs, nw, D)
    return {"dq": shape("dq", c2p), "dkdv": shape("dkdv", p2c)}


def workspace_bytes(B: int, H: int, T: int, D: int, span2: int, c2p: bool, p2c: bool,
                    dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of backward()'s fp32 position-gradient workspaces (2k = span2 slots).

    Per pass present, by workspace_layout(): <= 4 * B * H * D * (4T + 4 * BLOCK + min(2k, 2T - 1)) bytes
    <= 4 * B * H * D * (6T + 4 * BLOCK); both passes (BLOCK = 32 in every config):
    <= 4 * B * H * D * (12T + 256) = O(B * H * T * D), independent of k.
    """
    return sum(4 * math.prod(s) for s in workspace_shapes(B, H, T, D, span2, c2p, p2c, dtype).values() if s)


def backward(grad_out, q, k, v, pos_key, pos_query, mask, rel_slots, out, lse, scale: float, dropout_p: float,
             seed: int, cu_seqlens=None):
    """(dq, dk, dv, dpos_key or None, dpos_query or None), each in the dtype of its input."""
    B, H, T, D, N, _ = _geometry(q, rel_slots, cu_seqlens)
    cu, packed = _packed_args(cu_seqlens, rel_slots, N)
    c = _common(q, pos_key, pos_query, mask, rel_slots, dropout_p)
    ns = c["NS"]
    grad_out = grad_out.contiguous()
    rows = out.numel() // D  # delta per row of out in memory order: [B, H, T], packed [N, H]
    delta = torch.empty(rows, device=q.device, dtype=torch.float32)
    da_bwd_delta_kernel[(triton.cdiv(rows, DELTA_ROWS),)](out, grad_out, delta, rows, D=D, ROWS=DELTA_ROWS,
                                                         **COMPILE_OPTIONS, num_warps=4)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    flags = dict(D=D, PREC=_prec(q.dtype))
    args = (c["posk"], c["posq"], c["mask"], rel_slots, cu, grad_out, lse, delta)
    scalars = (T, H, B * H, ns, float(scale), float(dropout_p), c["inv_keep"], int(seed),
               *_flags(pos_key, pos_query, mask), *packed)
    shapes = workspace_shapes(B, H, T, D, ns, pos_key is not None, pos_query is not None, q.dtype)
    ws = {pas: torch.zeros(shape or (1,), device=q.device, dtype=torch.float32) for pas, shape in shapes.items()}

    bm, bn, warps, stages = config(D, q.dtype, "dkdv")
    g, programs, w0, nw = workspace_layout(T, D, ns, "dkdv", q.dtype)
    da_bwd_dkdv_kernel[_heads_grid(programs, B * H)](q, k, v, *args, dk, dv, ws["dkdv"], *scalars, g, w0, nw, BM=bm,
                                                     BN=bn, **flags, **COMPILE_OPTIONS, num_warps=warps,
                                                     num_stages=stages)
    bm, bn, warps, stages = config(D, q.dtype, "dq")
    g, programs, w0, nw = workspace_layout(T, D, ns, "dq", q.dtype)
    da_bwd_dq_kernel[_heads_grid(programs, B * H)](q, k, v, *args, dq, ws["dq"], *scalars, g, w0, nw, BM=bm, BN=bn,
                                                   **flags, **COMPILE_OPTIONS, num_warps=warps, num_stages=stages)
    # fixed-order reductions over (batch, program): deterministic; slots outside W0 .. W0 + NW - 1 get nothing
    dpos = []
    for pos, pas in ((pos_key, "dq"), (pos_query, "dkdv")):
        if pos is None:
            dpos.append(None)
            continue
        _, _, w0, nw = workspace_layout(T, D, ns, pas, q.dtype)
        grad = torch.zeros(pos.shape, device=pos.device, dtype=torch.float32)
        grad[:, w0:w0 + nw] = ws[pas].sum((0, 2)) * scale
        dpos.append(grad.to(pos.dtype))
    return dq, dk, dv, dpos[0], dpos[1]


# ---------------------------------------------------------------------------------------------- AOT specs
def compile_specs():
    i32, f32, i64 = "i32", "fp32", "i64"
    scalars = {"T": i32, "H": i32, "BH": i32, "NS": i32, "scale": f32, "dropout_p": f32, "inv_keep": f32, "seed": i64,
               "has_c2p": i32, "has_p2c": i32, "has_mask": i32, "N": i32, "varlen": i32}
    groups = {"G": i32, "W0": i32, "NW": i32}  # backward passes: blocks per program, workspace slot range
    specs = []
    for dt, D in itertools.product(DTYPES, HEAD_DIMS):
        specs.append(Spec(da_bwd_delta_kernel, {"out_ptr": ptr(dt), "dout_ptr": ptr(dt),
                                                "delta_ptr": ptr(torch.float32), "n_rows": i32},
                          {"D": D, "ROWS": DELTA_ROWS}, num_warps=4))
        common = {"q_ptr": ptr(dt), "k_ptr": ptr(dt), "v_ptr": ptr(dt), "posk_ptr": ptr(dt), "posq_ptr": ptr(dt),
                  "mask_ptr": ptr(torch.uint8), "slots_ptr": ptr(torch.int32), "cu_ptr": ptr(torch.int32)}
        bwd = {**common, "dout_ptr": ptr(dt), "lse_ptr": ptr(torch.float32), "delta_ptr": ptr(torch.float32)}
        for kernel, pas, sig in (
                (da_fwd_kernel, "fwd", {**common, "out_ptr": ptr(dt), "lse_ptr": ptr(torch.float32), **scalars}),
                (da_bwd_dkdv_kernel, "dkdv", {**bwd, "dk_ptr": ptr(dt), "dv_ptr": ptr(dt),
                                              "ws_ptr": ptr(torch.float32), **scalars, **groups}),
                (da_bwd_dq_kernel, "dq", {**bwd, "dq_ptr": ptr(dt), "ws_ptr": ptr(torch.float32), **scalars,
                                          **groups})):
            bm, bn, w, st = config(D, dt, pas)
            specs.append(Spec(kernel, sig, {"D": D, "BM": bm, "BN": bn, "PREC": _prec(dt)},
                              num_warps=w, num_stages=st))
    return specs
