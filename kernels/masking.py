"""Triton token masking: one program per row (T <= 8192). Semantics, the random stream and the
rounding rules: electra_fast/reference/masking.py; outputs are bit-identical to it.

"count" finds the selection threshold exactly: with units ordered by (key, start position), it
bisects on the 32-bit key threshold theta (33 masked sums over the row: the largest theta whose
units with key < theta still fit in n tokens), then takes the units with key == theta in position
order with a cumsum while the total stays <= n. Whole-word units come from scans (no gathers): a
forward max-scan carries (start position, key at start), a reverse min-scan carries (last
position, "holds a non-candidate") back from each word's last token.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .philox import philox4
from .spec import COMPILE_OPTIONS, Spec, ptr

PURPOSE_MASKING = tl.constexpr(1)  # reference/philox.py: MASKING
TILES = ((512, 4), (2048, 8), (8192, 16))  # (BLOCK_T, num_warps): the smallest BLOCK_T >= T
MAX_T = TILES[-1][0]
ID_DTYPES = (torch.int32, torch.int64)
IGNORE_INDEX = tl.constexpr(-100)
_SEED_TAG = 1 << 40  # Triton types int arguments by value: the tag keeps the seed words i64 for every seed
# has_mask / count are runtime flags (uniform branches): fewer compiled variants, same speed.
_SCALARS = ["T", "n_specials", "seed_lo", "seed_hi", "mask_token_id", "n_random", "sel_thr", "mask_thr", "rand_thr",
            "has_mask", "count"]


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit(do_not_specialize=_SCALARS)
def mask_tokens_kernel(ids_ptr, attn_ptr, starts_ptr, specials_ptr, table_ptr, out_ptr, labels_ptr, masked_ptr,
                       T, n_specials, seed_lo, seed_hi, mask_token_id, n_random, sel_thr, mask_thr, rand_thr,
                       has_mask, count, WORDS: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * T
    t = tl.arange(0, BLOCK_T)
    inb = t < T
    ids = tl.load(ids_ptr + row + t, mask=inb, other=0).to(tl.int64)
    if has_mask != 0:
        real = inb & (tl.load(attn_ptr + row + t, mask=inb, other=0) != 0)
    else:
        real = inb
    special = t < 0
    for k in range(n_specials):
        special = special | (ids == tl.load(specials_ptr + k))
    cand = real & ~special

    seed = ((tl.cast(seed_hi, tl.int64) & 0xFFFFFFFF) << 32) | (tl.cast(seed_lo, tl.int64) & 0xFFFFFFFF)
    x0, x1, x2, _x3 = philox4(seed, row + t, PURPOSE_MASKING)
    key = x0.to(tl.uint64).to(tl.int64)

    if WORDS:
        # A unit starts at a word start, at padding and at position 0; out-of-row lanes are padding.
        es = (tl.load(starts_ptr + row + t, mask=inb, other=1) != 0) | ~real | (t == 0)
        nxt = t + 1
        nin = nxt < T
        last = tl.load(starts_ptr + row + nxt, mask=nin, other=1) != 0
        if has_mask != 0:
            last = last | (tl.load(attn_ptr + row + nxt, mask=nin, other=0) == 0)
        last = last | ~nin
        start_key = tl.associative_scan(tl.where(es, (t.to(tl.int64) << 32) | key, -1), 0, _max_combine)
        ws = (start_key >> 32).to(tl.int32)
        key = start_key & 0xFFFFFFFF
        bad_before = tl.associative_scan(tl.where(cand, -1, t), 0, _max_combine) >= ws  # in [ws, t]
        end_bad = tl.associative_scan(tl.where(last, 2 * t + bad_before.to(tl.int32), 2 * BLOCK_T + 2), 0,
                                      _min_combine, reverse=True)
        length = (end_bad >> 1) - ws + 1
        ok = (end_bad & 1) == 0
        is_start = es
    else:
        length = tl.full((BLOCK_T,), 1, tl.int32)
        ok = cand
        is_start = inb

    if count != 0:
        n_real = tl.sum(real.to(tl.int32), 0)
        n_cand = tl.sum(cand.to(tl.int32), 0)
        n = tl.minimum(n_cand, tl.maximum(tl.load(table_ptr + n_real), 1))
        elig = ok & (length <= n)
        w = tl.where(is_start & elig, length, 0)
        lo = n.to(tl.int64) * 0
        hi = lo + 4294967297  # 2**32 + 1: theta = 2**32 means every unit fits
        for _ in range(33):
            mid = (lo + hi) >> 1
            fits = tl.sum(tl.where(key < mid, w, 0), 0) <= n
            lo = tl.where(fits, mid, lo)
            hi = tl.where(fits, hi, mid)
        below = tl.sum(tl.where(key < lo, w, 0), 0)
        ties = tl.cumsum(tl.where(key == lo, w, 0), 0)  # a word's tokens read the value at its start
        sel = elig & ((key < lo) | ((key == lo) & (below + ties <= n)))
    else:
        sel = ok & ((key >> 8) < sel_thr)

    u = (x1 >> 8).to(tl.int32)
    r = ((x2.to(tl.uint64) * tl.cast(n_random, tl.uint64)) >> 32).to(tl.int64)
    for k in range(n_specials):
        r = r + (r >= tl.load(specials_ptr + k)).to(tl.int64)
    repl = tl.where(u < mask_thr, tl.cast(mask_token_id, tl.int64), tl.where(u < rand_thr, r, ids))
    tl.store(out_ptr + row + t, tl.where(sel, repl, ids).to(out_ptr.dtype.element_ty), mask=inb)
    tl.store(labels_ptr + row + t, tl.where(sel, ids, IGNORE_INDEX), mask=inb)
    tl.store(masked_ptr + row + t, sel.to(tl.uint8), mask=inb)


def unsupported(T: int) -> list:
    """Every reason these kernels cannot serve rows of length ``T`` (the op spec asks before routing here)."""
    return [f"the Triton kernel holds a row in one program: T <= {MAX_T}, got T = {T}"] if T > MAX_T else []


def tile(T: int):
    """(BLOCK_T, num_warps) for rows of length T <= MAX_T."""
    return next(x for x in TILES if x[0] >= T)


def forward(input_ids, attention_mask, word_starts, specials, count_table, seed: int, mask_token_id: int,
            n_random: int, sel_thr: int, mask_thr: int, rand_thr: int, count: bool):
    B, T = input_ids.shape
    block, warps = tile(T)
    out = torch.empty_like(input_ids)
    labels = torch.empty((B, T), device=input_ids.device, dtype=torch.int64)
    masked = torch.empty((B, T), device=input_ids.device, dtype=torch.uint8)
    n_specials = specials.numel()
    if n_specials == 0:  # never read; a real allocation keeps the pointer valid
        specials = torch.zeros(1, device=input_ids.device, dtype=torch.int64)
    mask_tokens_kernel[(B,)](
        input_ids, attention_mask if attention_mask is not None else masked,
        word_starts if word_starts is not None else masked, specials, count_table, out, labels, masked,
        T, n_specials, (seed & 0xFFFFFFFF) | _SEED_TAG, (seed >> 32) | _SEED_TAG, mask_token_id, n_random, sel_thr,
        mask_thr, rand_thr, int(attention_mask is not None), int(count), WORDS=word_starts is not None,
        BLOCK_T=block, **COMPILE_OPTIONS, num_warps=warps)
    return out, labels, masked.view(torch.bool)


def compile_specs():
    specs = []
    for idd, words, (block, warps) in itertools.product(ID_DTYPES, (False, True), TILES):
        sig = {"ids_ptr": ptr(idd), "attn_ptr": ptr(torch.uint8), "starts_ptr": ptr(torch.uint8),
               "specials_ptr": ptr(torch.int64), "table_ptr": ptr(torch.int32), "out_ptr": ptr(idd),
               "labels_ptr": ptr(torch.int64), "masked_ptr": ptr(torch.uint8)}
        sig.update({name: "i32" for name in _SCALARS})
        sig.update(seed_lo="i64", seed_hi="i64")
        specs.append(Spec(mask_tokens_kernel, sig, {"WORDS": words, "BLOCK_T": block}, num_warps=warps))
    return specs
