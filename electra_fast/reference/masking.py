"""Eager PyTorch token masking: the semantic truth for electra_fast.mask_tokens.

Shapes and dtypes (every backend takes the same, already validated and contiguous):
  input_ids       int32 / int64 [B, T]
  attention_mask  uint8 [B, T] (1 = real token) or None (all real)
  word_starts     uint8 [B, T] (1 = a word begins here) or None (every token is its own unit)
  specials        int64 [S], sorted ascending, no duplicates, all in [0, vocab_size)
  count_table     int32 [T + 1] from :func:`count_table` ("count" strategy; ignored for "bernoulli")
  seed            int in [0, 2**63)
  mask_token_id   int in [0, vocab_size)
  n_random        vocab_size - S: how many ids a random replacement can take
  sel_thr, mask_thr, rand_thr   integer thresholds from :func:`prob_threshold`
  count           True: "count" strategy, False: "bernoulli"
forward -> (input_ids' [B, T] same dtype, labels int64 [B, T] (-100 where not selected), masked bool [B, T])

The stream (purpose MASKING, index = b * T + t, ONE Philox call per position, see reference/philox.py):
  x0  selection key (uint32). Whole-word: a word's key is x0 at its start token.
  x1  replacement draw: u = uniform(x1) = (x1 >> 8) * 2**-24;
        u < mask_token_frac                     -> mask_token_id
        u < mask_token_frac + random_token_frac -> a random token
        else                                    -> the original id
      compared exactly as integers: u < p  <=>  (x1 >> 8) < ceil(p * 2**24) (the sum taken in float64).
  x2  random token: r = (x2 * M) >> 32 (64-bit product), M = vocab_size - S, then r is stepped past
      the sorted specials (for s in specials: r += r >= s), giving an id uniform over [0, vocab_size)
      minus the specials, up to a relative bias of at most M / 2**32 per id (each id gets floor or
      ceil of 2**32 / M of the x2 values: 7e-6 for M = 30522, 3e-5 for M = 128k).

Selection. Candidates: real (attention_mask == 1) positions whose id is not special.
  Units: a single token, or with ``word_starts`` a word = a start token plus the following non-start
  tokens. Padding never joins a word (each padding position is its own unit) and position 0 always
  starts a unit. A unit holding any non-candidate (special, padding) is never selected.
  "bernoulli": a unit is selected iff uniform(key) < mask_prob, exactly (key >> 8) < ceil(mask_prob * 2**24).
  "count": n = min(n_candidates, max(1, min(N, round_half_even(fl32(fl32(n_real) * fl32(mask_prob)))))) with
      N = int((mask_prob + 0.005) * T) (float64, truncated): google-research/electra pretrain_helpers.py
      ``mask()``, ``num_to_predict = tf.maximum(1, tf.minimum(N, tf.cast(tf.round(num_tokens * mask_prob),
      tf.int32)))`` (tf.round rounds half to even; num_tokens, the real tokens, is fp32), with N its
      ``max_predictions_per_seq`` as configure_pretraining.py sets it (``int((mask_prob + 0.005) *
      max_seq_length)``; T here). Precomputed per n_real in :func:`count_table`; a row without candidates
      masks nothing (ELECTRA masks none there either: it draws only among candidates). Units longer than n are not eligible. The eligible units are ordered by
      (key, start position) and the longest prefix of that order whose total length stays <= n is
      selected: exactly n tokens without words, at least one word when any is eligible with words.
      The order is a total order, so the choice never depends on tiling or thread count.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .philox import MASKING, philox

IGNORE_INDEX = -100
_ONE = 1 << 24  # uniform() has 24 bits


def prob_threshold(p: float) -> int:
    """The integer k with  uniform(x) < p  <=>  (x >> 8) < k  (exact: p * 2**24 is exact in float64)."""
    return min(_ONE, max(0, math.ceil(p * _ONE)))


def count_table(mask_prob: float, T: int) -> torch.Tensor:
    """int32 [T + 1]: min(N, round_half_even(fl32(fl32(k) * fl32(mask_prob)))) for k = n_real in 0..T, with
    N = int((mask_prob + 0.005) * T) (ELECTRA's count and cap, see the module docstring; the max(1, .) and the
    n_candidates bound are applied per row by every backend).

    Computed once on the CPU with one fp32 product rounded half to even (torch.round, as tf.round), so every
    backend reads the same counts.
    """
    k = torch.arange(T + 1, dtype=torch.float32)
    n = torch.round(k * torch.tensor(mask_prob, dtype=torch.float32))
    return n.clamp(max=int((mask_prob + 0.005) * T)).to(torch.int32)


def random_tokens(x2: torch.Tensor, n_random: int, specials: torch.Tensor) -> torch.Tensor:
    """Random ids (int64) from x2 words: uniform over [0, vocab_size) minus the sorted specials."""
    r = (x2 * n_random) >> 32  # x2 < 2**32, n_random < 2**31: the product fits in int64
    for s in specials.tolist():
        r = r + (r >= s).to(r.dtype)
    return r


def units(real: torch.Tensor, cand: torch.Tensor, x0: torch.Tensor, word_starts: Optional[torch.Tensor]):
    """Per-token view of each token's unit: (key, length, ok, start position, is_unit_start)."""
    B, T = real.shape
    t = torch.arange(T, device=real.device).expand(B, T)
    if word_starts is None:
        return x0, torch.ones_like(t), cand, t, torch.ones_like(cand)
    es = word_starts.bool() | ~real
    es[:, :1] = True
    ws = torch.where(es, t, 0).cummax(1).values  # the start of each token's unit
    length = torch.zeros_like(t).scatter_add_(1, ws, torch.ones_like(t)).gather(1, ws)
    n_bad = torch.zeros_like(t).scatter_add_(1, ws, (~cand).long()).gather(1, ws)
    return x0.gather(1, ws), length, n_bad == 0, ws, es


def forward(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], word_starts: Optional[torch.Tensor],
            specials: torch.Tensor, count_table: torch.Tensor, seed: int, mask_token_id: int, n_random: int,
            sel_thr: int, mask_thr: int, rand_thr: int, count: bool):
    B, T = input_ids.shape
    dev = input_ids.device
    ids = input_ids.to(torch.int64)
    t = torch.arange(T, device=dev)
    x0, x1, x2, _ = philox(seed, torch.arange(B, device=dev)[:, None] * T + t, MASKING)
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    cand = real & ~torch.isin(ids, specials.to(dev))
    key, length, ok, ws, is_start = units(real, cand, x0, word_starts)

    if count:
        n_real, n_cand = real.sum(1), cand.sum(1)
        n = torch.minimum(n_cand, count_table.to(dev).long()[n_real].clamp(min=1))[:, None]
        unit = is_start & ok & (length <= n)
        packed = torch.where(unit, ((key - 2 ** 31) << 32) + t, torch.iinfo(torch.int64).max)
        ordered, order = packed.sort(1)
        taken = (torch.where(unit, length, T + 1).gather(1, order).cumsum(1) <= n).sum(1, keepdim=True)
        last = ordered.gather(1, (taken - 1).clamp(min=0))
        sel = (unit & (packed <= last) & (taken > 0)).gather(1, ws)
    else:
        sel = ok & ((key >> 8) < sel_thr)

    u = x1 >> 8
    rand_ids = random_tokens(x2, n_random, specials)
    repl = torch.where(u < mask_thr, mask_token_id, torch.where(u < rand_thr, rand_ids, ids))
    out = torch.where(sel, repl, ids).to(input_ids.dtype)
    labels = torch.where(sel, ids, IGNORE_INDEX)
    return out, labels, sel
