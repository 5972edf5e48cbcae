"""DeBERTa disentangled attention in eager PyTorch: the semantic truth (materialises [B, H, T, T]).

Backend contract (shared with ``torch.ops.electra_fast_cpp.disentangled_attention_*`` and
``electra_fast.kernels.disentangled_attention``):

  forward(q, k, v, pos_key, pos_query, mask, rel_slots, scale, dropout_p, seed) -> (out, lse)
  backward(grad_out, q, k, v, pos_key, pos_query, mask, rel_slots, out, lse, scale, dropout_p, seed)
      -> (dq, dk, dv, dpos_key, dpos_query)

  q, k, v      [B, H, T, D] contiguous, one dtype (fp32 / fp16 / bf16 / fp64)
  pos_key      [H, 2k, D] (K_r, c2p term) or None;  pos_query [H, 2k, D] (Q_r, p2c term) or None
  mask         uint8 [B, T], 1 = real token, or None. Masks keys; padded query rows output zeros.
  rel_slots    int32 [2T - 1]: rel_slots[i - j + T - 1] = s(i, j) = clamp(bucket(i - j) + k, 0, 2k - 1)
  score(i, j) = scale * (q_i.k_j + q_i.pos_key[s(i, j)] + k_j.pos_query[s(i, j)])
  softmax in fp32 (fp64 for fp64 inputs) over valid keys; lse fp32 [B, H, T] (+inf for padded queries
  and rows without a valid key: dead rows, whose output is exactly 0 and whose probabilities and score
  gradients are 0, whatever their q holds).
  NaN in, NaN out, identically on every backend: a live row with a NaN or infinite score among its valid
  keys (a NaN in q, k or a position tensor, or an overflow) is invalid: lse NaN, output NaN (as the eager
  softmax gives), and its probabilities NaN except at -inf scores (masked keys), which stay exactly 0; the
  gradients follow from those probabilities (products: 0 * NaN is NaN, so a NaN in V reaches every live row
  of its head through P @ V, even at a padded key). Dropout multiplies P (and dP) by keep / (1 - p), so a
  dropped NaN stays NaN. Dropout: Philox purpose ATTN_DROPOUT, element
  e = ((b * H + h) * T + i) * T + j reads word e % 4 of the call at index e // 4 (one call, four elements),
  keep iff uniform(word) >= dropout_p, kept scaled by 1 / (1 - p).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import philox

Tensor = torch.Tensor


def make_log_bucket_position(relative_pos: Tensor, bucket_size: int, max_position: int) -> Tensor:
    """transformers' DeBERTa-v2 log buckets, op for op (the float rounding must match exactly:
    |r| = 511 with bucket_size 256 lands on an integer before the ``ceil``)."""
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    abs_pos = torch.where(
        (relative_pos < mid) & (relative_pos > -mid),
        torch.tensor(mid - 1).type_as(relative_pos),
        torch.abs(relative_pos),
    )
    log_pos = (
        torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    )
    return torch.where(abs_pos <= mid, relative_pos.type_as(log_pos), log_pos * sign)


def attention_span(position_buckets: int, max_relative_positions: int) -> int:
    """k: the number of relative slots on each side (pos tensors hold 2k rows)."""
    return position_buckets if position_buckets > 0 else max_relative_positions


def relative_slots(seq_len: int, position_buckets: int, max_relative_positions: int,
                   device: "torch.device | str" = "cpu") -> Tensor:
    """int32 [2T - 1]: entry ``i - j + T - 1`` is the slot s(i, j) (the Toeplitz diagonal of the table)."""
    rel = torch.arange(-(seq_len - 1), seq_len, dtype=torch.long, device=device)
    if position_buckets > 0 and max_relative_positions > 0:
        rel = make_log_bucket_position(rel, position_buckets, max_relative_positions).to(torch.long)
    span = attention_span(position_buckets, max_relative_positions)
    return torch.clamp(rel + span, 0, 2 * span - 1).to(torch.int32)


def _slot_table(rel_slots: Tensor, T: int) -> Tensor:
    """int64 [T, T] slot table s(i, j) from its Toeplitz diagonal."""
    i = torch.arange(T, device=rel_slots.device)
    return rel_slots.long()[i[:, None] - i[None, :] + T - 1]


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scores(q, k, pos_key, pos_query, slots, scale):
    """Unmasked scores [B, H, T, T] in the accumulation dtype."""
    B, H, T, _ = q.shape
    s = q @ k.transpose(-1, -2)
    idx = slots.expand(B, H, T, T)
    if pos_key is not None:
        s = s + torch.gather(q @ pos_key.transpose(-1, -2).unsqueeze(0), -1, idx)  # [b,h,i,s(i,j)]
    if pos_query is not None:
        p2c = k @ pos_query.transpose(-1, -2).unsqueeze(0)  # [b, h, j, slot]
        s = s + torch.gather(p2c, -1, idx.transpose(-1, -2)).transpose(-1, -2)
    return s * scale


def _valid(mask: Optional[Tensor], B: int, T: int, device) -> Tuple[Tensor, Tensor]:
    """(key_valid [B, 1, 1, T], query_valid [B, 1, T, 1]) booleans."""
    m = torch.ones(B, T, dtype=torch.bool, device=device) if mask is None else mask.bool()
    return m[:, None, None, :], m[:, None, :, None]


def dropout_keep(seed: int, shape, dropout_p: float, device) -> Tensor:
    """bool [B, H, T, T]: the kept attention probabilities (same Philox draws on every backend)."""
    element = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.int64, device=device).view(shape)
    return philox.uniform(philox.element_words(seed, element, philox.ATTN_DROPOUT)) >= dropout_p


def _probs(q, k, pos_key, pos_query, mask, rel_slots, scale, lse=None):
    """(probabilities [B, H, T, T], lse fp32 [B, H, T]) in the accumulation dtype, zero rows where lse = inf."""
    B, H, T, _ = q.shape
    acc = _acc_dtype(q)
    q, k = q.to(acc), k.to(acc)
    pk = None if pos_key is None else pos_key.to(acc)
    pq = None if pos_query is None else pos_query.to(acc)
    s = _scores(q, k, pk, pq, _slot_table(rel_slots, T), scale)
    key_ok, query_ok = _valid(mask, B, T, q.device)
    s = s.masked_fill(~key_ok, float("-inf"))
    if lse is None or acc == torch.float64:  # fp64 (gradcheck) renormalises exactly, not from the fp32 lse
        row = torch.logsumexp(s, dim=-1, keepdim=True)  # non-finite only for NaN / infinite scores (or no key)
        dead = ~query_ok | (~key_ok).all(-1, keepdim=True)
        row = row.masked_fill(~torch.isfinite(row), float("nan")).masked_fill(dead, float("inf"))
        lse = row.squeeze(-1).float() if lse is None else lse
    else:
        row = lse.to(acc).unsqueeze(-1)
    # A -inf score (a masked key, or -inf itself) has probability exactly 0, also in an invalid (NaN) row, and a
    # dead row (row = +inf) is 0 even where its scores are NaN: NaN never reaches padded positions' gradients.
    p = torch.exp(s - row).masked_fill((s == float("-inf")) | (row == float("inf")), 0.0)
    return p, lse


def forward(q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor], pos_query: Optional[Tensor],
            mask: Optional[Tensor], rel_slots: Tensor, scale: float, dropout_p: float,
            seed: int) -> Tuple[Tensor, Tensor]:
    """(out [B, H, T, D] in q's dtype, lse fp32 [B, H, T])."""
    p, lse = _probs(q, k, pos_key, pos_query, mask, rel_slots, scale)
    if dropout_p > 0:
        p = p * dropout_keep(seed, p.shape, dropout_p, p.device) / (1.0 - dropout_p)
    out = (p @ v.to(p.dtype)).masked_fill(torch.isposinf(lse)[..., None], 0.0)  # 0 * NaN in V stays out of dead rows
    return out.to(q.dtype), lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor],
             pos_query: Optional[Tensor], mask: Optional[Tensor], rel_slots: Tensor, out: Tensor, lse: Tensor,
             scale: float, dropout_p: float, seed: int):
    """(dq, dk, dv, dpos_key or None, dpos_query or None), each in the dtype of its input."""
    B, H, T, _ = q.shape
    acc = _acc_dtype(q)
    p, _ = _probs(q, k, pos_key, pos_query, mask, rel_slots, scale, lse=lse)
    do = grad_out.to(acc)
    dp = do @ v.to(acc).transpose(-1, -2)
    if dropout_p > 0:
        keep = dropout_keep(seed, p.shape, dropout_p, p.device).to(acc) / (1.0 - dropout_p)
        pd, dp = p * keep, dp * keep
    else:
        pd = p
    dv = pd.transpose(-1, -2) @ do
    g = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale  # d loss / d (unscaled score)
    g = g.masked_fill(torch.isposinf(lse)[..., None], 0.0)  # dead rows: none, even where dP holds a NaN
    qa, ka = q.to(acc), k.to(acc)
    dq, dk = g @ ka, g.transpose(-1, -2) @ qa
    slots = _slot_table(rel_slots, T).expand(B, H, T, T)
    dpk = dpq = None
    if pos_key is not None:
        two_k = pos_key.shape[1]
        g_c2p = g.new_zeros(B, H, T, two_k).scatter_add_(-1, slots, g)  # [b, h, i, slot]
        dq = dq + g_c2p @ pos_key.to(acc)
        dpk = (g_c2p.transpose(-1, -2) @ qa).sum(0).to(pos_key.dtype)
    if pos_query is not None:
        two_k = pos_query.shape[1]
        g_p2c = g.new_zeros(B, H, T, two_k).scatter_add_(-1, slots.transpose(-1, -2), g.transpose(-1, -2))
        dk = dk + g_p2c @ pos_query.to(acc)
        dpq = (g_p2c.transpose(-1, -2) @ ka).sum(0).to(pos_query.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk, dpq
