"""DeBERTa disentangled attention in eager PyTorch: the semantic truth (materialises [B, H, T, T]).

Backend contract (shared with ``torch.ops.electra_fast_cpp.disentangled_attention_*`` and
``electra_fast.kernels.disentangled_attention``):

  forward(q, k, v, pos_key, pos_query, mask, rel_slots, scale, dropout_p, seed, cu_seqlens) -> (out, lse)
  backward(grad_out, q, k, v, pos_key, pos_query, mask, rel_slots, out, lse, scale, dropout_p, seed, cu_seqlens)
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

Variable-length (packed) layout, when cu_seqlens is given (mask is then None; the Triton kernels do not serve it):
  q, k, v      [N, H, D], N = total tokens: sequence b holds tokens cu_seqlens[b] .. cu_seqlens[b + 1] - 1
  cu_seqlens   int32 [n + 1], 0 = cu_seqlens[0] < cu_seqlens[1] < ... < cu_seqlens[n] = N (lengths >= 1)
  rel_slots    int32 [2T - 1] with T = max_seqlen >= every length (the slots depend on i - j only, so a sequence
               of length L reads the middle 2L - 1 entries)
  lse          fp32 [H, N]
  Each sequence is computed exactly as if it ran alone as a [1, H, L, D] call without a mask (positions i, j
  count from its first token; nothing attends across a boundary). Position gradients are summed over sequences.
  Dropout: sequence b is batch row b of the padded problem [n, H, T = max_seqlen, D], so the element of
  (b, h, i, j) is e = ((b * H + h) * T + i) * T + j with i, j < L_b: a packed token's mask is the one it gets in
  the padded layout whose rows are the sequences (right-padded to max_seqlen), whatever the other lengths are.
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


def dropout_keep(seed: int, shape, dropout_p: float, device, row: int = 0, row_len: Optional[int] = None) -> Tensor:
    """bool [B, H, L, L]: the kept attention probabilities (same Philox draws on every backend), element
    ((b + row) * H + h) * T + i) * T + j with T = row_len (default L): ``row`` / ``row_len`` place a packed
    sequence in its padded row (module docstring)."""
    B, H, L, _ = shape
    T = L if row_len is None else row_len

    def index(n, dim):
        return torch.arange(n, dtype=torch.int64, device=device).view([n if d == dim else 1 for d in range(4)])

    element = (((index(B, 0) + row) * H + index(H, 1)) * T + index(L, 2)) * T + index(L, 3)
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
        # normalised by the sum, not by exp(-lse): an fp32 lse is |s| * 2^-24 off, a relative error in every
        # probability that grew with the scores (0.7 % at |s| ~ 2e5); NaN / infinite rows give NaN either way
        p = torch.softmax(s, dim=-1)
    else:
        row = lse.to(acc).unsqueeze(-1)
        p = torch.exp(s - row)
    # A -inf score (a masked key, or -inf itself) has probability exactly 0, also in an invalid (NaN) row, and a
    # dead row (row = +inf) is 0 even where its scores are NaN: NaN never reaches padded positions' gradients.
    p = p.masked_fill((s == float("-inf")) | (row == float("inf")), 0.0)
    return p, lse


def forward(q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor], pos_query: Optional[Tensor],
            mask: Optional[Tensor], rel_slots: Tensor, scale: float, dropout_p: float, seed: int,
            cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(out [B, H, T, D] in q's dtype, lse fp32 [B, H, T]); packed: (out [N, H, D], lse fp32 [H, N])."""
    if cu_seqlens is None:
        return _forward(q, k, v, pos_key, pos_query, mask, rel_slots, scale, dropout_p, seed)
    outs, lses = [], []
    for b, rows, slots, T in _sequences(cu_seqlens, rel_slots, q.shape[0]):
        out, lse = _forward(*(_alone(x, rows) for x in (q, k, v)), pos_key, pos_query, None, slots, scale,
                            dropout_p, seed, row=b, row_len=T)
        outs.append(_packed(out))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


# what packed offsets must be (the C++ kernel's message says the same)
OFFSETS_RULE = "cu_seqlens: expected offsets rising from 0 to N={n} (rows of query) in steps of 1 .. max_seqlen={T}"


def offsets_hold(cu_seqlens: Tensor, n: int, T: int) -> Tensor:
    """bool []: whether int32 [n_seqs + 1] ``cu_seqlens`` rise from 0 to ``n`` in steps of 1 .. ``T``, computed on
    its device (no host sync)."""
    steps = cu_seqlens[1:] - cu_seqlens[:-1]
    return (cu_seqlens[0] == 0) & (cu_seqlens[-1] == n) & (steps >= 1).all() & (steps <= T).all()


def _sequences(cu_seqlens: Tensor, rel_slots: Tensor, n: int):
    """(b, token slice, the slot table of its length, T = max_seqlen) per packed sequence of ``n`` tokens. The
    offsets are checked here too, as the C++ kernel checks them: under torch.compile the op's own checks cannot read
    values, and bad offsets gave a silently short output."""
    T = (rel_slots.numel() + 1) // 2
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != n or any(not 0 < b - a <= T for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{OFFSETS_RULE.format(n=n, T=T)}, got {bounds[:8]}{' ...' if len(bounds) > 8 else ''}")
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        n = end - start
        yield b, slice(start, end), rel_slots[T - n: T + n - 1], T


def _alone(x: Tensor, rows: slice) -> Tensor:
    """[1, H, L, D]: one packed sequence of x [N, H, D] as a batch of its own."""
    return x[rows].transpose(0, 1).unsqueeze(0)


def _packed(x: Tensor) -> Tensor:
    """[L, H, D] from [1, H, L, D] (the inverse of _alone)."""
    return x[0].transpose(0, 1)


def _forward(q, k, v, pos_key, pos_query, mask, rel_slots, scale, dropout_p, seed, row=0, row_len=None):
    p, lse = _probs(q, k, pos_key, pos_query, mask, rel_slots, scale)
    if dropout_p > 0:
        p = p * dropout_keep(seed, p.shape, dropout_p, p.device, row, row_len) / (1.0 - dropout_p)
    out = (p @ v.to(p.dtype)).masked_fill(torch.isposinf(lse)[..., None], 0.0)  # 0 * NaN in V stays out of dead rows
    return out.to(q.dtype), lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor],
             pos_query: Optional[Tensor], mask: Optional[Tensor], rel_slots: Tensor, out: Tensor, lse: Tensor,
             scale: float, dropout_p: float, seed: int, cu_seqlens: Optional[Tensor] = None):
    """(dq, dk, dv, dpos_key or None, dpos_query or None), each in the dtype of its input."""
    if cu_seqlens is None:
        return _backward(grad_out, q, k, v, pos_key, pos_query, mask, rel_slots, lse, scale, dropout_p, seed)
    acc = _acc_dtype(q)
    # position gradients summed over sequences in the accumulation dtype (the products are the same with the
    # position tensors upcast first), rounded once
    pk = None if pos_key is None else pos_key.to(acc)
    pq = None if pos_query is None else pos_query.to(acc)
    dqkv, dpk, dpq = [], None, None
    for b, rows, slots, T in _sequences(cu_seqlens, rel_slots, q.shape[0]):
        dq, dk, dv, dpk_b, dpq_b = _backward(*(_alone(x, rows) for x in (grad_out, q, k, v)), pk, pq, None, slots,
                                             lse[None, :, rows], scale, dropout_p, seed, row=b, row_len=T)
        dqkv.append([_packed(dq), _packed(dk), _packed(dv)])
        dpk = dpk_b if dpk is None else dpk + dpk_b
        dpq = dpq_b if dpq is None else dpq + dpq_b
    dq, dk, dv = (torch.cat(g) for g in zip(*dqkv))
    return (dq, dk, dv, None if dpk is None else dpk.to(pos_key.dtype),
            None if dpq is None else dpq.to(pos_query.dtype))


def _backward(grad_out, q, k, v, pos_key, pos_query, mask, rel_slots, lse, scale, dropout_p, seed, row=0,
              row_len=None):
    B, H, T, _ = q.shape
    acc = _acc_dtype(q)
    p, _ = _probs(q, k, pos_key, pos_query, mask, rel_slots, scale, lse=lse)
    do = grad_out.to(acc)
    dp = do @ v.to(acc).transpose(-1, -2)
    if dropout_p > 0:
        keep = dropout_keep(seed, p.shape, dropout_p, p.device, row, row_len).to(acc) / (1.0 - dropout_p)
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
