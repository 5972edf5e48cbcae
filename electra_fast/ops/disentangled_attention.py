"""electra_fast.disentangled_attention: DeBERTa-v2/v3 attention (c2p + p2c relative terms), fused.

Ops: ``electra_fast::disentangled_attention_fwd`` / ``_bwd`` (torch.library custom ops with fake kernels),
each routed to triton (``kernels/disentangled_attention.py``), cpp (``csrc/disentangled_attention.cpp``) or
the reference. The backend contract is in ``electra_fast/reference/disentangled_attention.py``.

Memory: the fused backends hold O(B*H*T*D + H*k*D) beyond inputs and outputs (lse is [B, H, T] fp32)
plus per-thread block scratch; no [T, T] tensor exists (the reference materialises [B, H, T, T]).

Packed variable-length calls (``cu_seqlens``) go through the same ops with a [N, H, D] layout: the C++ kernels
walk (sequence, head) tasks of each sequence's own length, the Triton programs stop at their sequence's end (cost
sum of L_i^2 on both; Triton's grid is still sized by max_seqlen).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from .. import _backend, _seed, _validate
from ..reference import disentangled_attention as ref
from ._autograd import AutogradOp, no_autocast
from ._cached import constant_tensors

SPEC = _backend.register(_backend.OpSpec(
    "disentangled_attention", reference=ref, triton="disentangled_attention",
    cpp={"forward": "disentangled_attention_fwd", "backward": "disentangled_attention_bwd"}))


__getattr__ = SPEC.moved_to_kernels(__name__, TRITON_HEAD_DIMS="HEAD_DIMS")  # deprecated names


_CPU = torch.device("cpu")


def _impl(stage: str, q: torch.Tensor, rel_slots: torch.Tensor, position_buckets: int, max_relative_positions: int,
          cu_seqlens: Optional[torch.Tensor]):
    """(backend name, callable) serving ``stage``."""
    # the slot table the kernels' limits read: a cached CPU table (no device sync per call; the limits are
    # computed once per table)
    cpu_slots = _slots((rel_slots.shape[0] + 1) // 2, position_buckets, max_relative_positions, _CPU)
    return SPEC.serving(stage, q.device, head_dim=q.shape[-1], dtype=q.dtype, rel_slots=cpu_slots,
                        varlen=cu_seqlens is not None)


def _packed(cu_seqlens: Optional[torch.Tensor]) -> tuple:
    # the backends' trailing cu_seqlens argument, passed only to packed calls: padded calls keep the contract's
    # original signature
    return () if cu_seqlens is None else (cu_seqlens,)


def _takes_strided(fn) -> bool:
    # The C++ kernels read q / k / v / grad_out through strides and allocate outputs with _empty_in_dim_order
    # (the layout the fake kernels promise); the reference and Triton get contiguous tensors.
    return isinstance(fn, torch._ops.OpOverloadPacket)


def _token_major(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) < t.stride(2)


def _empty_in_dim_order(t: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, T, D] tensor in t's dim order (csrc/disentangled_attention.h's empty_in_dim_order):
    token-major memory when t is a token-major view (H, T > 1 and stride(1) < stride(2): heads of a projection,
    or q / k / v sliced from one fused [B, T, 3, H, D] projection), so the transpose back to tokens is free and
    gradients stack into the projection in one copy; contiguous otherwise (and for packed [N, H, D] tensors)."""
    if _token_major(t):
        b, h, n, d = t.shape
        return t.new_empty((b, n, h, d)).transpose(1, 2)
    return t.new_empty(t.shape)


def _like(t: torch.Tensor, layout_of: torch.Tensor) -> torch.Tensor:
    """t (a contiguous kernel output) with the strides of _empty_in_dim_order(layout_of), what the fake kernels
    promise: a copy only for token-major layout_of."""
    if not _token_major(layout_of):
        return t if t.is_contiguous() else t.contiguous()
    return _empty_in_dim_order(layout_of).copy_(t)


@constant_tensors
def _slots(T: int, position_buckets: int, max_relative_positions: int, device: torch.device) -> torch.Tensor:
    """ref.relative_slots, built once per (T, buckets, device) in eager mode (a dozen small torch ops per call
    otherwise); nothing writes to it."""
    return ref.relative_slots(T, position_buckets, max_relative_positions, device)


def _detached(*tensors):
    # The C++ kernels call ATen ops (mm, narrow, to) on views of their inputs; detached inputs keep those
    # views out of autograd even when a dispatch mode (opcheck's fake-tensor cross-check) re-runs them.
    return [None if t is None else t.detach() for t in tensors]


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_key: Optional[torch.Tensor],
             pos_query: Optional[torch.Tensor], mask: Optional[torch.Tensor], rel_slots: torch.Tensor,
             scale: float, dropout_p: float, seed: int, position_buckets: int,
             max_relative_positions: int, cu_seqlens: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """[out, lse] from the backend that serves the call. position_buckets / max_relative_positions describe
    rel_slots (for backend routing only). Packed (cu_seqlens): q / k / v / out [N, H, D], lse [H, N]."""
    q, k, v, pos_key, pos_query = _detached(q, k, v, pos_key, pos_query)
    backend, fn = _impl("forward", q, rel_slots, position_buckets, max_relative_positions, cu_seqlens)
    if cu_seqlens is not None and backend == "triton":
        _offsets_on_device(cu_seqlens, q.shape[0], (rel_slots.numel() + 1) // 2)
    with no_autocast(q):
        if _takes_strided(fn):
            return list(fn(q, k, v, pos_key, pos_query, mask, rel_slots, scale, dropout_p, seed,
                           *_packed(cu_seqlens)))
        out, lse = fn(q.contiguous(), k.contiguous(), v.contiguous(), pos_key, pos_query, mask, rel_slots, scale,
                      dropout_p, seed, *_packed(cu_seqlens))
    return [_like(out, q), lse]


def _offsets_on_device(cu_seqlens: torch.Tensor, n: int, T: int) -> None:
    """The Triton kernels trust the offsets (rows no sequence covers stayed uninitialised memory), and under
    torch.compile the op's own checks cannot read them; the C++ kernel and the reference check them in place. Here
    an asynchronous device assert: no host sync per layer, a failed check raises at a later CUDA call (and ends the
    process's CUDA context, as any device-side assert does), at once on CPU tensors."""
    torch._assert_async(ref.offsets_hold(cu_seqlens, n, T), ref.OFFSETS_RULE.format(n=n, T=T))


def _lse_shape(q: torch.Tensor) -> tuple:
    return tuple(q.shape[:-1]) if q.dim() == 4 else (q.shape[1], q.shape[0])  # [B, H, T] / packed [H, N]


def _fake(q, k, v, pos_key, pos_query, mask, rel_slots, scale, dropout_p, seed, position_buckets,
          max_relative_positions, cu_seqlens):
    return [_empty_in_dim_order(q), q.new_empty(_lse_shape(q), dtype=torch.float32)]


def _backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              pos_key: Optional[torch.Tensor], pos_query: Optional[torch.Tensor], mask: Optional[torch.Tensor],
              rel_slots: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float, dropout_p: float,
              seed: int, position_buckets: int, max_relative_positions: int,
              cu_seqlens: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """[dq, dk, dv, dpos_key, dpos_query]; an absent position gradient is an empty tensor (custom ops cannot
    return None)."""
    grad_out, q, k, v, pos_key, pos_query = _detached(grad_out, q, k, v, pos_key, pos_query)
    _, fn = _impl("backward", q, rel_slots, position_buckets, max_relative_positions, cu_seqlens)
    with no_autocast(q):
        if _takes_strided(fn):
            grads = fn(grad_out, q, k, v, pos_key, pos_query, mask, rel_slots, out, lse, scale, dropout_p, seed,
                       *_packed(cu_seqlens))
        else:
            grads = fn(*(t.contiguous() for t in (grad_out, q, k, v)), pos_key, pos_query, mask, rel_slots,
                       out.contiguous(), lse, scale, dropout_p, seed, *_packed(cu_seqlens))
            grads = [_like(g, x) for g, x in zip(grads[:3], (q, k, v))] + list(grads[3:])
    return [g if g is not None else q.new_empty(0) for g in grads]


def _backward_fake(grad_out, q, k, v, pos_key, pos_query, mask, rel_slots, out, lse, scale, dropout_p, seed,
                   position_buckets, max_relative_positions, cu_seqlens):
    return [_empty_in_dim_order(q), _empty_in_dim_order(k), _empty_in_dim_order(v),
            q.new_empty(0) if pos_key is None else torch.empty_like(pos_key),
            q.new_empty(0) if pos_query is None else torch.empty_like(pos_query)]


def _setup(ctx, inputs, output):
    q, k, v, pos_key, pos_query, mask, rel_slots, scale, dropout_p, seed, buckets, max_rel, cu_seqlens = inputs
    ctx.scale, ctx.dropout_p, ctx.seed, ctx.buckets = scale, dropout_p, seed, (buckets, max_rel)
    ctx.has_pos = (pos_key is not None, pos_query is not None)
    ctx.save_for_backward(q, k, v, pos_key, pos_query, mask, rel_slots, output[0], output[1], cu_seqlens)


def _grads(ctx, grad_outputs, backward):
    q, k, v, pos_key, pos_query, mask, rel_slots, out, lse, cu_seqlens = ctx.saved_tensors
    grad_out = grad_outputs[0]
    if grad_out is None:  # the eager path does not materialise zero gradients (AutogradOp): none reached out
        return (None,) * 13
    g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()  # e.g. expanded: stride 0
    dq, dk, dv, dpk, dpq = backward(g, q, k, v, pos_key, pos_query, mask, rel_slots, out, lse,
                                    ctx.scale, ctx.dropout_p, ctx.seed, *ctx.buckets, cu_seqlens)
    return (dq, dk, dv, dpk if ctx.has_pos[0] else None, dpq if ctx.has_pos[1] else None,
            None, None, None, None, None, None, None, None)


# eager calls skip the custom ops' dispatch (~0.1 ms per forward + backward, a few % of a small model's CPU step)
_OP = AutogradOp("disentangled_attention_fwd", _forward, _fake, setup=_setup, grads=_grads, backward=_backward,
                 backward_fake=_backward_fake, backward_name="disentangled_attention_bwd", non_differentiable=(1,))


def _check_pos(name: str, pos: Optional[torch.Tensor], q: torch.Tensor, span: int) -> Optional[torch.Tensor]:
    if pos is None:
        return None
    _validate.floating(name, pos)
    _validate.rank(name, pos, 3, "[H, 2k, D]")
    H, D = q.shape[1], q.shape[-1]  # [B, H, T, D] or packed [N, H, D]
    _validate.same_dtype(name, pos, "query", q)
    _validate.same_device(name, pos, "query", q)
    if pos.shape[0] != H or pos.shape[2] != D:
        raise ValueError(f"{name}: expected shape [H={H}, 2k, D={D}] (heads and head dim of query), "
                         f"got {tuple(pos.shape)}")
    if pos.shape[1] != 2 * span:
        raise ValueError(f"{name}: expected 2k = {2 * span} rows (k = position_buckets if > 0 else "
                         f"max_relative_positions), got {pos.shape[1]}; position_buckets / "
                         f"max_relative_positions do not match the position tensors")
    return pos.contiguous()


def disentangled_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           pos_key: Optional[torch.Tensor] = None, pos_query: Optional[torch.Tensor] = None, *,
                           attention_mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                           max_seqlen: Optional[int] = None, position_buckets: int = 256,
                           max_relative_positions: int = 512, dropout_p: float = 0.0, seed: Optional[int] = None,
                           scale: Optional[float] = None) -> torch.Tensor:
    """DeBERTa-v2/v3 disentangled self-attention, flash-style (no [T, T] tensor on the fused backends).

    ``score(i, j) = scale * (q_i.k_j + q_i.pos_key[s(i, j)] + k_j.pos_query[s(i, j)])`` with the relative
    slot ``s(i, j) = clamp(bucket(i - j) + k, 0, 2k - 1)`` (transformers' log buckets when
    ``position_buckets > 0``, else ``bucket(r) = r``), softmax in fp32 over real keys, then ``P @ V``.

    Args:
        query, key, value: [B, H, T, D], one floating dtype (fp32 / fp16 / bf16; fp64 on CPU) and device.
        pos_key: [H, 2k, D] projected relative embeddings K_r (the c2p term is present iff given).
        pos_query: [H, 2k, D] Q_r (the p2c term iff given).
        attention_mask: [B, T] bool / int, 1 = real token. Padded keys get no weight; padded query rows
            output zeros (transformers returns the mean of V there; only real positions are comparable).
        cu_seqlens: the packed (unpadded) layout instead: query, key, value are [N, H, D] (N tokens of n
            sequences back to back) and cu_seqlens is int32 [n + 1] on their device, flash-attention's
            convention: sequence b is tokens cu_seqlens[b] .. cu_seqlens[b + 1] - 1, 0 = cu_seqlens[0] <
            cu_seqlens[1] < ... < cu_seqlens[n] = N. Each sequence is attended exactly as if it ran alone
            (relative positions count from its first token; nothing attends across a boundary);
            attention_mask must be None.
        max_seqlen: with cu_seqlens, an int >= every sequence length (the slot table's length; part of the
            dropout element index below).
        position_buckets, max_relative_positions: as in ``DebertaV2Config``; k = position_buckets if > 0
            else max_relative_positions.
        dropout_p: attention-probability dropout in [0, 1] (1 drops every probability: zeros, as torch's
            attention gives, with zero gradients); needs ``seed`` (Philox keyed by (seed, b, h, i, j),
            bit-identical on every backend; the backward regenerates the mask). Packed: sequence b is batch row b
            of the padded [n, H, max_seqlen, D] problem, so a token's mask is the one it gets in that padded
            layout (electra_fast/reference/disentangled_attention.py).
        seed: int in [0, 2**63) or None (only when dropout_p == 0).
        scale: defaults to 1 / sqrt(D * (1 + number of position terms)).

    Returns:
        [B, H, T, D] ([N, H, D] packed) in the dtype of query; differentiable w.r.t. query, key, value, pos_key,
        pos_query.
        NaN in, NaN out on every backend: a query row with a NaN or infinite score among its real keys outputs
        NaN; padded query rows stay 0 (electra_fast/reference/disentangled_attention.py). Meta / fake tensors
        are answered by the op's fake kernel.
    """
    packed = cu_seqlens is not None
    for name, x in (("query", query), ("key", key), ("value", value)):
        _validate.floating(name, x)
        _validate.rank(name, x, *((3, "[N, H, D] (packed: cu_seqlens given)") if packed else (4, "[B, H, T, D]")))
    for name, x in (("key", key), ("value", value)):
        _validate.same_shape(name, x, "query", query)
        _validate.same_device(name, x, "query", query)
        _validate.same_dtype(name, x, "query", query)
    if 0 in query.shape:
        raise ValueError(f"query: expected {'N, H, D' if packed else 'B, H, T, D'} >= 1, got shape "
                         f"{tuple(query.shape)}")
    if packed:
        if attention_mask is not None:
            raise ValueError("attention_mask: expected None with cu_seqlens (the packed sequences are the mask)")
        cu_seqlens, T = _validate.cu_seqlens("cu_seqlens", cu_seqlens, query.shape[0], "query", query, "max_seqlen",
                                             max_seqlen)
    elif max_seqlen is not None:
        raise ValueError("max_seqlen: only with cu_seqlens (the packed layout); a padded call's length is T")
    else:
        T = query.shape[2]
    position_buckets = _validate.integer_arg("position_buckets", position_buckets)
    max_relative_positions = _validate.integer_arg("max_relative_positions", max_relative_positions)
    if pos_key is not None or pos_query is not None:
        if max_relative_positions < 1:
            raise ValueError(f"max_relative_positions: expected >= 1, got {max_relative_positions}")
        _validate.log_buckets(position_buckets, max_relative_positions)
    else:  # they index position tables this call has none of: any values do (position_buckets=1 divided by 0)
        position_buckets, max_relative_positions = 0, 1
    span = ref.attention_span(position_buckets, max_relative_positions)
    pos_key = _check_pos("pos_key", pos_key, query, span)
    pos_query = _check_pos("pos_query", pos_query, query, span)
    D = query.shape[-1]
    mask = None if packed else _validate.mask_as_uint8("attention_mask", attention_mask,
                                                       "[B, T] (batch and length of query)", query[:, 0, :, 0])
    dropout_p = _validate.probability("dropout_p", dropout_p, one=True)
    if dropout_p > 0.0 and seed is None:
        raise ValueError("seed: dropout_p > 0 needs a seed (an int in [0, 2**63)); pass dropout_p=0.0 for evaluation")
    seed = 0 if seed is None else _seed.check(seed)
    if dropout_p == 0.0:
        seed = 0  # the contract: seed is 0 without dropout (nothing is drawn)
    dropped = dropout_p == 1.0  # every probability dropped (the kept scale 1 / (1 - p) is infinite): torch's zeros
    if dropped:
        dropout_p, seed = 0.0, 0
    n_terms = (pos_key is not None) + (pos_query is not None)
    if scale is None:
        scale = 1.0 / math.sqrt(D * (1 + n_terms))
    else:
        scale = _validate.real("scale", scale, 0.0, math.inf, lo_open=True)
    rel_slots = (ref.relative_slots(T, position_buckets, max_relative_positions, query.device)
                 if _validate.capturing() else _slots(T, position_buckets, max_relative_positions, query.device))
    # CPU: q / k / v go in as given when their last dim is dense (the C++ kernels read strided [B, H, T, D]
    # views, e.g. the module's [B, T, H, D] projections, without a permute copy; out takes that layout too).
    # CUDA: contiguous, the Triton kernels' contract.
    qkv = [x if x.device.type == "cpu" and x.stride(-1) == 1 else x.contiguous() for x in (query, key, value)]
    out, _lse = _OP(*qkv, pos_key, pos_query, mask, rel_slots, float(scale), dropout_p, seed, position_buckets,
                   max_relative_positions, cu_seqlens)
    return out * 0 if dropped else out
