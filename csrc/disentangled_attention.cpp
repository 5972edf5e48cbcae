// DeBERTa disentangled attention on CPU, forward and backward, flash-style.
// Semantics and the backend contract: electra_fast/reference/disentangled_attention.py.
//
// Work is blocked over (batch, head, query block; no [B, H, T, T] tensor). One task owns one (b, h) in the
// forward and one (head, fixed batch partition) in the backward (tasks handed out dynamically over
// at::parallel_for's threads), walks its query blocks in order and never holds more than one block of scores:
// [kBlockM, T], or [T, T] for T <= kWholeT (one block: fewer, larger GEMM calls).
// Matrix products go through ATen (at::mm on blocks), in fp32 (fp64 for fp64 inputs). bf16 inputs take
// disentangled_attention_amx.cpp instead where torch's bf16 brgemm runs natively (AMX / AVX512-BF16): the same
// blocks and rows (disentangled_attention.h), with bf16 products accumulated in fp32.
//
// The relative slot s(i, j) = rel_slots[i - j + T - 1] is Toeplitz, so the position terms are matrix
// products over the slot range a block touches, then gathered:
//   c2p: C  = Q_block @ pos_key[lo..hi]^T  ([BM, hi - lo + 1], hi - lo <= 2k), score += C[i, s(i, j) - lo]
//   p2c: KP = K @ pos_query[s0..s1]^T     ([T, s1 - s0 + 1], once per (b, h)), score += KP[j, s(i, j) - s0]
// The backward scatters dScore into the same small matrices (in a fixed order) and turns them into
// dQ / dK / dpos with at::mm. Position gradients are accumulated per (fixed batch partition, head) and summed
// over partitions in order: results never depend on the thread count.
//
// Scratch per task: O(BM * T + T * 2k + T * D) in the accumulation dtype (fp32; fp64 for fp64 inputs).
//
// Packed variable-length calls ([N, H, D] with cu_seqlens): a task is one (sequence, head) run as a problem of the
// sequence's own length (sequence() in the header), so cost is sum over sequences of L^2 and a sequence's results
// are those of a padded call holding it alone; the dropout element index keeps the padded row length T = max_seqlen.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "disentangled_attention.h"
#include "dispatch.h"
#include "keep_bytes.h"

namespace electra_fast {
namespace da {

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& pos_key, const c10::optional<at::Tensor>& pos_query,
                     const c10::optional<at::Tensor>& mask, const at::Tensor& rel_slots, double scale,
                     double dropout_p, int64_t seed, const c10::optional<at::Tensor>& cu_seqlens) {
  // q, k, v may be strided views (e.g. [B, T, H, D] memory seen as [B, H, T, D]): every per-(b, h) slice is
  // a [T, D] matrix that at::mm reads through its row stride, so the caller's permute copies are not needed.
  const bool packed = cu_seqlens.has_value() && cu_seqlens->defined();
  TORCH_CHECK(q.dim() == (packed ? 3 : 4),
              packed ? "disentangled_attention: packed q, k, v must be [N, H, D]"
                     : "disentangled_attention: q, k, v must be [B, H, T, D]");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "disentangled_attention: q, k, v shapes differ");
  Problem p;
  if (packed) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.scalar_type() == at::kInt && cu.is_contiguous() && cu.dim() == 1 && cu.numel() >= 2 &&
                    cu.device().is_cpu(),
                "disentangled_attention: cu_seqlens must be a contiguous CPU int32 [n + 1], n >= 1");
    p.cu = cu.data_ptr<int32_t>();
    p.B = cu.numel() - 1, p.H = q.size(1), p.T = (rel_slots.numel() + 1) / 2, p.D = q.size(2);
    bool ok = p.cu[0] == 0 && p.cu[p.B] == q.size(0);
    for (int64_t b = 0; b < p.B && ok; ++b) ok = p.cu[b + 1] > p.cu[b] && p.cu[b + 1] - p.cu[b] <= p.T;
    // ValueError, in the op's terms: under torch.compile the Python checks cannot read the offsets, this one does
    TORCH_CHECK_VALUE(ok, "cu_seqlens: expected offsets rising from 0 to N=", q.size(0),
                      " (rows of query) in steps of 1 .. max_seqlen=", p.T);
  } else {
    p.B = q.size(0), p.H = q.size(1), p.T = q.size(2), p.D = q.size(3);
  }
  p.drop_T = p.T;
  p.has_pk = pos_key.has_value() && pos_key->defined();
  p.has_pq = pos_query.has_value() && pos_query->defined();
  p.has_mask = mask.has_value() && mask->defined();
  p.two_k = p.has_pk ? pos_key->size(1) : (p.has_pq ? pos_query->size(1) : 1);
  for (const auto* pos : {&pos_key, &pos_query}) {
    if (pos->has_value() && (*pos)->defined()) {
      TORCH_CHECK((*pos)->is_contiguous() && (*pos)->dim() == 3 && (*pos)->size(0) == p.H &&
                      (*pos)->size(1) == p.two_k && (*pos)->size(2) == p.D && (*pos)->scalar_type() == q.scalar_type(),
                  "disentangled_attention: pos tensors must be contiguous [H, 2k, D] in the dtype of q");
    }
  }
  TORCH_CHECK(rel_slots.scalar_type() == at::kInt && rel_slots.is_contiguous() && rel_slots.numel() == 2 * p.T - 1,
              "disentangled_attention: rel_slots must be contiguous int32 [2T - 1]");
  TORCH_CHECK(!(packed && p.has_mask), "disentangled_attention: a packed call (cu_seqlens) takes no mask");
  if (p.has_mask) {
    TORCH_CHECK(mask->scalar_type() == at::kByte && mask->is_contiguous() && mask->numel() == p.B * p.T,
                "disentangled_attention: mask must be contiguous uint8 [B, T]");
  }
  p.scale = scale;
  p.dropout_p = dropout_p;
  p.seed = static_cast<uint64_t>(seed);
  p.mask = p.has_mask ? mask->data_ptr<uint8_t>() : nullptr;
  p.slots = rel_slots.data_ptr<int32_t>();
  p.s0 = *std::min_element(p.slots, p.slots + 2 * p.T - 1);
  p.s1 = *std::max_element(p.slots, p.slots + 2 * p.T - 1);
  TORCH_CHECK(!(p.has_pk || p.has_pq) || (p.s0 >= 0 && p.s1 < p.two_k),
              "disentangled_attention: rel_slots out of [0, 2k)");
  p.acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return p;
}

// keep[j] = 1 iff element e = base + j (e = ((b * H + h) * T + i) * T + j, T = drop_T) survives dropout: word e % 4
// of the ATTN_DROPOUT call at index e // 4, the draw every backend makes; the bytes come from the dropout op's
// generator (csrc/keep_bytes.h: 16 calls per AVX-512 vector), 1024 elements at a time.
void keep_span(uint64_t seed, uint64_t base, int64_t n, float p, uint8_t* __restrict keep) {
  // uniform(w) >= p  <=>  (w >> 8) >= ceil(p * 2^24), exactly (uniform is a multiple of 2^-24)
  const uint32_t threshold = static_cast<uint32_t>(std::ceil(static_cast<double>(p) * 16777216.0));
  constexpr int64_t kGroups = 256;
  uint8_t bytes[4 * kGroups];
  const uint64_t g_begin = base >> 2, g_end = (base + static_cast<uint64_t>(n) + 3) >> 2;
  for (uint64_t g0 = g_begin; g0 < g_end; g0 += kGroups) {
    const int64_t m = static_cast<int64_t>(std::min<uint64_t>(kGroups, g_end - g0));
    keep_bytes(seed, kAttnDropout, 0, g0, m, threshold, bytes);
    const uint64_t e0 = std::max(g0 * 4, base), e1 = std::min((g0 + m) * 4, base + static_cast<uint64_t>(n));
    std::memcpy(keep + (e0 - base), bytes + (e0 - g0 * 4), e1 - e0);
  }
}

template <typename acc_t>
void forward_head(const Problem& p, int64_t b, int64_t h, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& pk, const at::Tensor& pq, at::Tensor& out, float* lse) {
  const int64_t T = p.T, bh = b * p.H + h;
  const at::Tensor qf = head_rows(p, q, b, h).to(p.acc), kf = head_rows(p, k, b, h).to(p.acc);
  const at::Tensor vf = head_rows(p, v, b, h).to(p.acc);
  const at::Tensor out_h = head_rows(p, out, b, h);
  lse += lse_offset(p, b, h);
  const int64_t ns = p.s1 - p.s0 + 1;
  at::Tensor kp;  // [T, ns]: k_j . pos_query[s0 + c]
  if (p.has_pq) kp = at::mm(kf, pq[h].narrow(0, p.s0, ns).t()).contiguous();
  std::vector<uint8_t> keep(p.dropout_p > 0 ? block_rows(T) * T : 0);
  const int64_t ld = block_ld(T);
  const int64_t rows = block_rows(T);
  at::Tensor sbuf = at::empty({rows, ld}, qf.options());
  for (int64_t i0 = 0; i0 < T; i0 += rows) {
    const int64_t bm = std::min(rows, T - i0);
    const at::Tensor qb = qf.narrow(0, i0, bm);
    at::Tensor s = sbuf.narrow(0, 0, bm).narrow(1, 0, T);  // [bm, T], row stride ld
    at::mm_out(s, qb, kf.t());
    at::Tensor c;
    int32_t clo = 0;
    if (p.has_pk) {
      auto [lo, hi] = block_slot_range(p, i0, bm);
      clo = lo;
      c = at::mm(qb, pk[h].narrow(0, lo, hi - lo + 1).t()).contiguous();
    }
    acc_t* sp = s.data_ptr<acc_t>();
    if (p.has_pq) add_p2c_block<acc_t>(p, i0, bm, sp, ld, kp.data_ptr<acc_t>(), ns);
    forward_rows<acc_t>(p, b, bh, i0, bm, sp, ld, p.has_pk ? c.data_ptr<acc_t>() : nullptr,
                        p.has_pk ? c.size(1) : 0, clo, lse, keep.data());
    at::Tensor dst = out_h.narrow(0, i0, bm);
    const float* block_lse = lse + i0;
    if (dst.scalar_type() == p.acc) {
      at::mm_out(dst, s, vf);  // straight into the (row-strided) output: no temporary, no copy
      zero_dead_rows<acc_t>(dst.data_ptr<acc_t>(), dst.stride(0), bm, p.D, block_lse);
    } else {
      at::Tensor pv = at::mm(s, vf);
      zero_dead_rows<acc_t>(pv.data_ptr<acc_t>(), pv.stride(0), bm, p.D, block_lse);
      dst.copy_(pv);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> disentangled_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& pos_key,
    const c10::optional<at::Tensor>& pos_query, const c10::optional<at::Tensor>& mask, const at::Tensor& rel_slots,
    double scale, double dropout_p, int64_t seed, const c10::optional<at::Tensor>& cu_seqlens) {
  // The internal at::mm calls work on acc-dtype (fp32) copies: under autocast they would be recast to
  // bf16 / fp16 and break the typed scratch. The kernel has its own precision policy, so skip autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Problem p = make_problem(q, k, v, pos_key, pos_query, mask, rel_slots, scale, dropout_p, seed, cu_seqlens);
  if (amx_usable(q, p)) {
    return forward_amx(p, q, k, v, p.has_pk ? *pos_key : at::Tensor(), p.has_pq ? *pos_query : at::Tensor());
  }
  at::Tensor out = empty_in_dim_order(q);
  at::Tensor lse = empty_lse(p, q);
  const at::Tensor pk = p.has_pk ? pos_key->to(p.acc) : at::Tensor();
  const at::Tensor pq = p.has_pq ? pos_query->to(p.acc) : at::Tensor();
  float* lp = lse.data_ptr<float>();
  parallel_tasks(p.B * p.H, [&](int64_t bh, int64_t) {
    const int64_t b = bh / p.H, h = bh % p.H;
    if (p.acc == at::kDouble) {
      forward_head<double>(sequence(p, b), b, h, q, k, v, pk, pq, out, lp);
    } else {
      forward_head<float>(sequence(p, b), b, h, q, k, v, pk, pq, out, lp);
    }
  });
  return {out, lse};
}

// Backward of one (b, h); accumulates the position gradients into dpk_part / dpq_part ([2k, D], acc dtype).
template <typename acc_t>
void backward_head(const Problem& p, int64_t b, int64_t h, const at::Tensor& dout, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk, const at::Tensor& pq,
                   const float* lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dpk_part,
                   at::Tensor& dpq_part) {
  const int64_t T = p.T, bh = b * p.H + h;
  const at::Tensor qf = head_rows(p, q, b, h).to(p.acc), kf = head_rows(p, k, b, h).to(p.acc);
  const at::Tensor vf = head_rows(p, v, b, h).to(p.acc), dof = head_rows(p, dout, b, h).to(p.acc);
  at::Tensor dq_h = head_rows(p, dq, b, h), dk_h = head_rows(p, dk, b, h), dv_h = head_rows(p, dv, b, h);
  lse += lse_offset(p, b, h);
  const auto opts = qf.options();
  // dK / dV accumulate over query blocks: straight in the outputs when they have the accumulation dtype
  const bool direct = dq.scalar_type() == p.acc;
  at::Tensor dkf = direct ? dk_h.zero_() : at::zeros({T, p.D}, opts);
  at::Tensor dvf = direct ? dv_h.zero_() : at::zeros({T, p.D}, opts);
  const int64_t ns = p.s1 - p.s0 + 1;
  at::Tensor kp, dkp;  // [T, ns]
  if (p.has_pq) {
    kp = at::mm(kf, pq[h].narrow(0, p.s0, ns).t()).contiguous();
    dkp = at::zeros({T, ns}, opts);
  }
  std::vector<uint8_t> keep(p.dropout_p > 0 ? block_rows(T) * T : 0);
  const int64_t ld = block_ld(T);
  const int64_t rows = block_rows(T);
  at::Tensor sbuf = at::empty({rows, ld}, opts), gbuf = at::empty({rows, ld}, opts);
  for (int64_t i0 = 0; i0 < T; i0 += rows) {
    const int64_t bm = std::min(rows, T - i0);
    const at::Tensor qb = qf.narrow(0, i0, bm), dob = dof.narrow(0, i0, bm);
    at::Tensor s = sbuf.narrow(0, 0, bm).narrow(1, 0, T);  // scores -> probabilities (with dropout)
    at::Tensor g = gbuf.narrow(0, 0, bm).narrow(1, 0, T);  // dP (before dropout) -> d score
    at::mm_out(s, qb, kf.t());
    at::mm_out(g, dob, vf.t());
    at::Tensor c, dc;
    int32_t clo = 0;
    if (p.has_pk) {
      auto [lo, hi] = block_slot_range(p, i0, bm);
      clo = lo;
      c = at::mm(qb, pk[h].narrow(0, lo, hi - lo + 1).t()).contiguous();
      dc = at::zeros_like(c);
    }
    acc_t* sp = s.data_ptr<acc_t>();
    acc_t* gp = g.data_ptr<acc_t>();
    if (p.has_pq) add_p2c_block<acc_t>(p, i0, bm, sp, ld, kp.data_ptr<acc_t>(), ns);
    backward_rows<acc_t>(p, b, bh, i0, bm, sp, gp, ld, p.has_pk ? c.data_ptr<acc_t>() : nullptr,
                         p.has_pk ? dc.data_ptr<acc_t>() : nullptr, p.has_pk ? c.size(1) : 0, clo, lse,
                         keep.data());
    if (p.has_pq) scatter_p2c_block<acc_t>(p, i0, bm, gp, ld, dkp.data_ptr<acc_t>(), ns);
    dvf.addmm_(s.t(), dob);
    dkf.addmm_(g.t(), qb);
    at::Tensor dq_dst = dq_h.narrow(0, i0, bm);
    at::Tensor dqb = direct ? at::mm_out(dq_dst, g, kf) : at::mm(g, kf);
    if (p.has_pk) {
      const at::Tensor pk_blk = pk[h].narrow(0, clo, c.size(1));
      dqb.addmm_(dc, pk_blk);
      dpk_part.narrow(0, clo, c.size(1)).addmm_(dc.t(), qb);
    }
    if (!direct) dq_dst.copy_(dqb);
  }
  if (p.has_pq) {
    const at::Tensor pq_rng = pq[h].narrow(0, p.s0, ns);
    dkf.addmm_(dkp, pq_rng);
    dpq_part.narrow(0, p.s0, ns).addmm_(dkp.t(), kf);
  }
  if (!direct) {
    dk_h.copy_(dkf);
    dv_h.copy_(dvf);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> disentangled_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& pos_key, const c10::optional<at::Tensor>& pos_query,
    const c10::optional<at::Tensor>& mask, const at::Tensor& rel_slots, const at::Tensor& out, const at::Tensor& lse,
    double scale, double dropout_p, int64_t seed, const c10::optional<at::Tensor>& cu_seqlens) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // as in the forward
  const Problem p = make_problem(q, k, v, pos_key, pos_query, mask, rel_slots, scale, dropout_p, seed, cu_seqlens);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(),
              "disentangled_attention_bwd: grad_out must match q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == p.H * (p.cu ? p.cu[p.B] : p.B * p.T),
              "disentangled_attention_bwd: lse must be fp32 [B, H, T] (packed: [H, N])");
  (void)out;  // delta is recomputed exactly from the block's probabilities instead of rowsum(dO * O)
  const at::Tensor& dout = grad_out;  // strided like q is fine (read per (b, h) through at::mm / to)
  const at::Tensor lse_c = lse.contiguous();
  if (amx_usable(q, p)) {
    return backward_amx(p, grad_out, q, k, v, p.has_pk ? *pos_key : at::Tensor(),
                        p.has_pq ? *pos_query : at::Tensor(), lse_c.data_ptr<float>());
  }
  at::Tensor dq = empty_in_dim_order(q), dk = empty_in_dim_order(k), dv = empty_in_dim_order(v);
  const at::Tensor pk = p.has_pk ? pos_key->to(p.acc) : at::Tensor();
  const at::Tensor pq = p.has_pq ? pos_query->to(p.acc) : at::Tensor();
  const int64_t n_part = std::min(p.B, kPosPartitions);
  const auto acc_opts = q.options().dtype(p.acc);
  at::Tensor dpk_parts = p.has_pk ? at::zeros({n_part, p.H, p.two_k, p.D}, acc_opts) : at::Tensor();
  at::Tensor dpq_parts = p.has_pq ? at::zeros({n_part, p.H, p.two_k, p.D}, acc_opts) : at::Tensor();
  const float* lp = lse_c.data_ptr<float>();
  // Task (partition c, head h) owns batches [c * B / n_part, (c + 1) * B / n_part) and its own partials.
  parallel_tasks(n_part * p.H, [&](int64_t t, int64_t) {
    const int64_t c = t / p.H, h = t % p.H;
    at::Tensor dpk_part = p.has_pk ? dpk_parts[c][h] : at::Tensor();
    at::Tensor dpq_part = p.has_pq ? dpq_parts[c][h] : at::Tensor();
    for (int64_t b = c * p.B / n_part; b < (c + 1) * p.B / n_part; ++b) {
      if (p.acc == at::kDouble) {
        backward_head<double>(sequence(p, b), b, h, dout, q, k, v, pk, pq, lp, dq, dk, dv, dpk_part, dpq_part);
      } else {
        backward_head<float>(sequence(p, b), b, h, dout, q, k, v, pk, pq, lp, dq, dk, dv, dpk_part, dpq_part);
      }
    }
  });
  // Sum of the partitions in a fixed order, in one parallel pass over elements (fixed chunks): one
  // parallel region instead of n_part - 1 whole-tensor add_ calls.
  auto reduce = [&](const at::Tensor& parts, const c10::optional<at::Tensor>& like) -> at::Tensor {
    if (!parts.defined()) return at::Tensor();
    const int64_t n = p.H * p.two_k * p.D;
    at::Tensor total = at::empty({p.H, p.two_k, p.D}, parts.options());
    if (p.acc == at::kDouble) {
      sum_partitions<double>(parts.data_ptr<double>(), total.data_ptr<double>(), n_part, n);
    } else {
      sum_partitions<float>(parts.data_ptr<float>(), total.data_ptr<float>(), n_part, n);
    }
    return total.to(like->scalar_type());
  };
  return {dq, dk, dv, reduce(dpk_parts, pos_key), reduce(dpq_parts, pos_query)};
}

}  // namespace da

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  m.def("disentangled_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? pos_key, Tensor? pos_query, Tensor? mask, "
        "Tensor rel_slots, float scale, float dropout_p, int seed, Tensor? cu_seqlens=None) -> (Tensor, Tensor)");
  m.def("disentangled_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? pos_key, "
        "Tensor? pos_query, Tensor? mask, Tensor rel_slots, Tensor out, Tensor lse, float scale, float dropout_p, "
        "int seed, Tensor? cu_seqlens=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(electra_fast_cpp, CPU, m) {
  m.impl("disentangled_attention_fwd", &da::disentangled_attention_fwd);
  m.impl("disentangled_attention_bwd", &da::disentangled_attention_bwd);
}

}  // namespace electra_fast
