// DeBERTa disentangled attention on CPU, forward and backward, flash-style.
// Semantics and the backend contract: electra_fast/reference/disentangled_attention.py.
//
// Work is blocked over (batch, head, query block; no [B, H, T, T] tensor). One task owns one (b, h) in the
// forward and one (head, fixed batch partition) in the backward (tasks handed out dynamically over
// at::parallel_for's threads), walks its query blocks in order and never holds more than one block of scores:
// [kBlockM, T], or [T, T] for T <= kWholeT (one block: fewer, larger GEMM calls).
// Matrix products go through ATen (at::mm on blocks).
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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "philox.h"
#include "vec_math.h"

namespace electra_fast {
namespace {

#ifndef EF_DA_BLOCK_M
#define EF_DA_BLOCK_M 64
#endif
constexpr int64_t kBlockM = EF_DA_BLOCK_M;  // query rows per block
constexpr int64_t kWholeT = 512;             // sequences up to this length take one block of all T rows

// Rows per block for length T: short sequences in one block (the [T, T] scores of T <= 512 are ~1 MB, still
// cache-resident), which halves or quarters the number of small GEMM calls, whose fixed cost dominates there.
inline int64_t block_rows(int64_t T) { return T <= kWholeT ? T : kBlockM; }
constexpr int64_t kPosPartitions = 8;  // fixed batch partitions for the position-gradient reduction

template <typename acc_t>
inline acc_t exp_shifted(acc_t x) {  // exp(x) for x <= 0 (vectorisable for fp32)
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp_nonpos(x);
  } else {
    return std::exp(x);
  }
}

struct Problem {
  int64_t B, H, T, D, two_k;
  bool has_pk, has_pq, has_mask;
  double scale, dropout_p;
  uint64_t seed;
  const uint8_t* mask;
  const int32_t* slots;  // rel_slots
  int32_t s0, s1;        // slot range over all (i, j)
  at::ScalarType acc;
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& pos_key, const c10::optional<at::Tensor>& pos_query,
                     const c10::optional<at::Tensor>& mask, const at::Tensor& rel_slots, double scale,
                     double dropout_p, int64_t seed) {
  // q, k, v may be strided views (e.g. [B, T, H, D] memory seen as [B, H, T, D]): every per-(b, h) slice is
  // a [T, D] matrix that at::mm reads through its row stride, so the caller's permute copies are not needed.
  TORCH_CHECK(q.dim() == 4, "disentangled_attention: q, k, v must be [B, H, T, D]");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "disentangled_attention: q, k, v shapes differ");
  Problem p;
  p.B = q.size(0), p.H = q.size(1), p.T = q.size(2), p.D = q.size(3);
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

// Slot range [lo, hi] touched by query rows [i0, i0 + bm) against all keys.
inline std::pair<int32_t, int32_t> block_slot_range(const Problem& p, int64_t i0, int64_t bm) {
  const int32_t* first = p.slots + i0;
  const int32_t* last = p.slots + i0 + bm - 1 + p.T;  // one past index i0 + bm - 1 + T - 1
  return {*std::min_element(first, last), *std::max_element(first, last)};
}

// Row stride of the score blocks: T padded so that rows do not alias in the L1 sets (the p2c term walks
// the block column by column; a power-of-two stride would keep only a few of its rows cached).
inline int64_t block_ld(int64_t T) {
  int64_t ld = (T + 15) / 16 * 16;
  return ld % 256 == 0 ? ld + 16 : ld;
}

// Runs task(t) for t in [0, n) on at::parallel_for's threads, handing tasks out dynamically: a descheduled
// thread (shared machine) does not hold the others back at the end. Tasks write disjoint outputs, so the
// result does not depend on which thread ran which task.
template <typename F>
void parallel_tasks(int64_t n, const F& task) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) task(t);
    }
  });
}

inline bool query_valid(const Problem& p, int64_t b, int64_t i) { return !p.has_mask || p.mask[b * p.T + i]; }

// keep[j] = 1 iff element (b, h, i, j) survives dropout: word 0 of the ATTN_DROPOUT stream at index
// ((b * H + h) * T + i) * T + j = base + j (the draw every backend makes). One row per call, vectorised.
EF_TARGET_CLONES
void keep_row(uint64_t seed, uint64_t base, int64_t n, float p, uint8_t* __restrict keep) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    keep[j] = philox_uniform(philox4x32_10(seed, base + static_cast<uint64_t>(j), kAttnDropout).x[0]) >= p;
  }
}

// row[j] *= keep[j] ? 1 / (1 - p) : 0
template <typename acc_t>
inline void apply_keep(acc_t* __restrict row, const uint8_t* __restrict keep, int64_t n, acc_t inv_keep) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= keep[j] ? inv_keep : acc_t(0);
}

inline uint64_t dropout_base(const Problem& p, int64_t bh, int64_t i) {
  return static_cast<uint64_t>((bh * p.T + i) * p.T);
}

// Scores of one block: s = scale * (S + C-gather + KP-gather), masked keys -> -inf, written back into `s`.
// Returns the row max (or -inf when no key is valid).
// p2c term of a block: s[r, j] += KP[j, s(i0 + r, j) - s0]. Walks keys in the outer loop so each KP row is
// read contiguously (the slots of one key over the block's rows are consecutive) and the block rows stay in L1.
template <typename acc_t>
void add_p2c_block(const Problem& p, int64_t i0, int64_t bm, acc_t* __restrict s, int64_t ld,
                   const acc_t* __restrict kp, int64_t ns) {
  const int64_t T = p.T;
  for (int64_t j = 0; j < T; ++j) {
    const acc_t* kprow = kp + j * ns - p.s0;
    const int32_t* sl = p.slots + i0 - j + T - 1;  // sl[r] = s(i0 + r, j)
    for (int64_t r = 0; r < bm; ++r) s[r * ld + j] += kprow[sl[r]];
  }
}

// dst[sl[e * sl_step]] += src[e * src_step] for e in [0, n), in order. Neighbouring elements mostly share a slot
// (runs of equal slots: every bucketed distance beyond the exact range), so the sum of a run is kept in a
// register and stored once: a read-modify-write per element would stall on store-to-load forwarding.
template <typename acc_t>
inline void scatter_runs(acc_t* __restrict dst, const int32_t* sl, int64_t sl_step, const acc_t* __restrict src,
                         int64_t src_step, int64_t n) {
  if (n <= 0) return;
  int32_t cur = sl[0];
  acc_t run = 0;
  for (int64_t e = 0; e < n; ++e) {
    const int32_t s = sl[e * sl_step];
    if (s != cur) {
      dst[cur] += run;
      run = 0;
      cur = s;
    }
    run += src[e * src_step];
  }
  dst[cur] += run;
}

// Its backward: dKP[j, s(i0 + r, j) - s0] += g[r, j], in a fixed order.
template <typename acc_t>
void scatter_p2c_block(const Problem& p, int64_t i0, int64_t bm, const acc_t* __restrict g, int64_t ld,
                       acc_t* __restrict dkp, int64_t ns) {
  const int64_t T = p.T;
  for (int64_t j = 0; j < T; ++j) {
    acc_t* dkprow = dkp + j * ns - p.s0;
    const int32_t* sl = p.slots + i0 - j + T - 1;
    scatter_runs<acc_t>(dkprow, sl, 1, g + j, ld, bm);
  }
}

template <typename acc_t>
inline acc_t score_row(const Problem& p, int64_t b, int64_t i, acc_t* __restrict s, const acc_t* __restrict crow,
                       int32_t clo) {
  const int64_t T = p.T;
  const int32_t* sl = p.slots + i + T - 1;  // sl[-j] = s(i, j)
  const acc_t scale = static_cast<acc_t>(p.scale);
  const uint8_t* m = p.has_mask ? p.mask + b * T : nullptr;
  if (crow != nullptr) {
    const acc_t* c0 = crow - clo;
#pragma omp simd  // a gather (no write conflicts: s[j] is written once)
    for (int64_t j = 0; j < T; ++j) s[j] += c0[sl[-j]];
  }
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  acc_t mx = ninf;
  // Two loops: a `m == nullptr ||` test inside the body kept GCC from vectorising the max reduction.
  if (m != nullptr) {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < T; ++j) {
      const acc_t x = m[j] ? s[j] * scale : ninf;
      s[j] = x;
      mx = x > mx ? x : mx;
    }
  } else {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < T; ++j) {
      const acc_t x = s[j] * scale;
      s[j] = x;
      mx = x > mx ? x : mx;
    }
  }
  return mx;
}

// Turns a scored row into probabilities (dropout not applied); returns lse.
template <typename acc_t>
inline acc_t softmax_row(int64_t T, acc_t* __restrict s, acc_t mx, const acc_t* lse_in) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  if (lse_in != nullptr) {  // backward: probabilities from the saved lse
    const acc_t l = *lse_in;
#pragma omp simd
    for (int64_t j = 0; j < T; ++j) {
      const acc_t x = s[j];
      const acc_t e = exp_shifted<acc_t>(std::min<acc_t>(x - l, acc_t(0)));
      s[j] = x == ninf ? acc_t(0) : e;
    }
    return l;
  }
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < T; ++j) {
    const acc_t x = s[j];
    const acc_t e = exp_shifted<acc_t>(x - mx);
    const acc_t e2 = x == ninf ? acc_t(0) : e;
    s[j] = e2;
    sum += e2;
  }
  const acc_t inv = acc_t(1) / sum;
#pragma omp simd
  for (int64_t j = 0; j < T; ++j) s[j] *= inv;
  return mx + std::log(sum);
}

template <typename acc_t>
void forward_head(const Problem& p, int64_t b, int64_t h, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& pk, const at::Tensor& pq, at::Tensor& out, float* lse) {
  const int64_t T = p.T, bh = b * p.H + h;
  const at::Tensor qf = q[b][h].to(p.acc), kf = k[b][h].to(p.acc), vf = v[b][h].to(p.acc);
  const int64_t ns = p.s1 - p.s0 + 1;
  at::Tensor kp;  // [T, ns]: k_j . pos_query[s0 + c]
  if (p.has_pq) kp = at::mm(kf, pq[h].narrow(0, p.s0, ns).t()).contiguous();
  const float p32 = static_cast<float>(p.dropout_p);
  const acc_t inv_keep = acc_t(1) / (acc_t(1) - static_cast<acc_t>(p.dropout_p));
  std::vector<uint8_t> keep(p.dropout_p > 0 ? T : 0);
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
    const acc_t* cp = p.has_pk ? c.data_ptr<acc_t>() : nullptr;
    const int64_t c_ld = p.has_pk ? c.size(1) : 0;
    if (p.has_pq) add_p2c_block<acc_t>(p, i0, bm, sp, ld, kp.data_ptr<acc_t>(), ns);
    for (int64_t r = 0; r < bm; ++r) {
      const int64_t i = i0 + r;
      acc_t* row = sp + r * ld;
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      if (query_valid(p, b, i)) mx = score_row<acc_t>(p, b, i, row, cp ? cp + r * c_ld : nullptr, clo);
      if (mx == -std::numeric_limits<acc_t>::infinity()) {  // padded query or no valid key: output 0
        std::fill(row, row + T, acc_t(0));
        lse[bh * T + i] = std::numeric_limits<float>::infinity();
        continue;
      }
      lse[bh * T + i] = static_cast<float>(softmax_row<acc_t>(T, row, mx, nullptr));
      if (p.dropout_p > 0) {
        keep_row(p.seed, dropout_base(p, bh, i), T, p32, keep.data());
        apply_keep<acc_t>(row, keep.data(), T, inv_keep);
      }
    }
    at::Tensor dst = out[b][h].narrow(0, i0, bm);
    if (dst.scalar_type() == p.acc) {
      at::mm_out(dst, s, vf);  // straight into the (row-strided) output: no temporary, no copy
    } else {
      dst.copy_(at::mm(s, vf));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> disentangled_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& pos_key,
    const c10::optional<at::Tensor>& pos_query, const c10::optional<at::Tensor>& mask, const at::Tensor& rel_slots,
    double scale, double dropout_p, int64_t seed) {
  // The internal at::mm calls work on acc-dtype (fp32) copies: under autocast they would be recast to
  // bf16 / fp16 and break the typed scratch. The kernel has its own precision policy, so skip autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Problem p = make_problem(q, k, v, pos_key, pos_query, mask, rel_slots, scale, dropout_p, seed);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({p.B, p.H, p.T}, q.options().dtype(at::kFloat));
  const at::Tensor pk = p.has_pk ? pos_key->to(p.acc) : at::Tensor();
  const at::Tensor pq = p.has_pq ? pos_query->to(p.acc) : at::Tensor();
  float* lp = lse.data_ptr<float>();
  parallel_tasks(p.B * p.H, [&](int64_t bh) {
    if (p.acc == at::kDouble) {
      forward_head<double>(p, bh / p.H, bh % p.H, q, k, v, pk, pq, out, lp);
    } else {
      forward_head<float>(p, bh / p.H, bh % p.H, q, k, v, pk, pq, out, lp);
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
  const at::Tensor qf = q[b][h].to(p.acc), kf = k[b][h].to(p.acc), vf = v[b][h].to(p.acc);
  const at::Tensor dof = dout[b][h].to(p.acc);
  const auto opts = qf.options();
  // dK / dV accumulate over query blocks: straight in the outputs when they have the accumulation dtype
  const bool direct = dq.scalar_type() == p.acc;
  at::Tensor dkf = direct ? dk[b][h].zero_() : at::zeros({T, p.D}, opts);
  at::Tensor dvf = direct ? dv[b][h].zero_() : at::zeros({T, p.D}, opts);
  const int64_t ns = p.s1 - p.s0 + 1;
  at::Tensor kp, dkp;  // [T, ns]
  if (p.has_pq) {
    kp = at::mm(kf, pq[h].narrow(0, p.s0, ns).t()).contiguous();
    dkp = at::zeros({T, ns}, opts);
  }
  const float p32 = static_cast<float>(p.dropout_p);
  const acc_t inv_keep = acc_t(1) / (acc_t(1) - static_cast<acc_t>(p.dropout_p));
  std::vector<uint8_t> keep(p.dropout_p > 0 ? T : 0);
  const acc_t scale = static_cast<acc_t>(p.scale);
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
    const int64_t c_ld = p.has_pk ? c.size(1) : 0;
    acc_t* dcp = p.has_pk ? dc.data_ptr<acc_t>() : nullptr;
    if (p.has_pq) add_p2c_block<acc_t>(p, i0, bm, sp, ld, kp.data_ptr<acc_t>(), ns);
    for (int64_t r = 0; r < bm; ++r) {
      const int64_t i = i0 + r;
      acc_t* row = sp + r * ld;
      acc_t* grow = gp + r * ld;
      const float l = lse[bh * T + i];
      if (!query_valid(p, b, i) || std::isinf(l)) {
        std::fill(row, row + T, acc_t(0));
        std::fill(grow, grow + T, acc_t(0));
        continue;
      }
      score_row<acc_t>(p, b, i, row, p.has_pk ? c.data_ptr<acc_t>() + r * c_ld : nullptr, clo);
      if constexpr (std::is_same_v<acc_t, double>) {
        // fp64 (gradcheck): renormalise exactly instead of trusting the fp32 lse
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < T; ++j) mx = std::max(mx, row[j]);
        softmax_row<acc_t>(T, row, mx, nullptr);
      } else {
        const acc_t la = static_cast<acc_t>(l);
        softmax_row<acc_t>(T, row, acc_t(0), &la);
      }
      if (p.dropout_p > 0) {  // dP through the dropout mask
        keep_row(p.seed, dropout_base(p, bh, i), T, p32, keep.data());
        apply_keep<acc_t>(grow, keep.data(), T, inv_keep);
      }
      acc_t delta = 0;
#pragma omp simd reduction(+ : delta)
      for (int64_t j = 0; j < T; ++j) delta += row[j] * grow[j];
#pragma omp simd
      for (int64_t j = 0; j < T; ++j) grow[j] = row[j] * (grow[j] - delta) * scale;
      if (p.dropout_p > 0) apply_keep<acc_t>(row, keep.data(), T, inv_keep);  // the probabilities that hit V
      const int32_t* sl = p.slots + i + T - 1;
      if (dcp != nullptr) {
        scatter_runs<acc_t>(dcp + r * c_ld - clo, sl, -1, grow, 1, T);  // dC[r, s(i, j)] += g[j]
      }
    }
    if (p.has_pq) scatter_p2c_block<acc_t>(p, i0, bm, gp, ld, dkp.data_ptr<acc_t>(), ns);
    dvf.addmm_(s.t(), dob);
    dkf.addmm_(g.t(), qb);
    at::Tensor dq_dst = dq[b][h].narrow(0, i0, bm);
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
    dk[b][h].copy_(dkf);
    dv[b][h].copy_(dvf);
  }
}

// dst[e] = sum over c of src[c * n + e], c in increasing order (fixed chunks: thread-count independent).
template <typename acc_t>
void sum_partitions(const acc_t* __restrict src, acc_t* __restrict dst, int64_t n_part, int64_t n) {
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    std::copy(src + begin, src + end, dst + begin);
    for (int64_t c = 1; c < n_part; ++c) {
      const acc_t* part = src + c * n;
#pragma omp simd
      for (int64_t e = begin; e < end; ++e) dst[e] += part[e];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> disentangled_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& pos_key, const c10::optional<at::Tensor>& pos_query,
    const c10::optional<at::Tensor>& mask, const at::Tensor& rel_slots, const at::Tensor& out, const at::Tensor& lse,
    double scale, double dropout_p, int64_t seed) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // as in the forward
  const Problem p = make_problem(q, k, v, pos_key, pos_query, mask, rel_slots, scale, dropout_p, seed);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(),
              "disentangled_attention_bwd: grad_out must match q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == p.B * p.H * p.T,
              "disentangled_attention_bwd: lse must be fp32 [B, H, T]");
  (void)out;  // delta is recomputed exactly from the block's probabilities instead of rowsum(dO * O)
  const at::Tensor& dout = grad_out;  // strided like q is fine (read per (b, h) through at::mm / to)
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const at::Tensor pk = p.has_pk ? pos_key->to(p.acc) : at::Tensor();
  const at::Tensor pq = p.has_pq ? pos_query->to(p.acc) : at::Tensor();
  const int64_t n_part = std::min(p.B, kPosPartitions);
  const auto acc_opts = q.options().dtype(p.acc);
  at::Tensor dpk_parts = p.has_pk ? at::zeros({n_part, p.H, p.two_k, p.D}, acc_opts) : at::Tensor();
  at::Tensor dpq_parts = p.has_pq ? at::zeros({n_part, p.H, p.two_k, p.D}, acc_opts) : at::Tensor();
  const float* lp = lse_c.data_ptr<float>();
  // Task (partition c, head h) owns batches [c * B / n_part, (c + 1) * B / n_part) and its own partials.
  parallel_tasks(n_part * p.H, [&](int64_t t) {
    const int64_t c = t / p.H, h = t % p.H;
    at::Tensor dpk_part = p.has_pk ? dpk_parts[c][h] : at::Tensor();
    at::Tensor dpq_part = p.has_pq ? dpq_parts[c][h] : at::Tensor();
    for (int64_t b = c * p.B / n_part; b < (c + 1) * p.B / n_part; ++b) {
      if (p.acc == at::kDouble) {
        backward_head<double>(p, b, h, dout, q, k, v, pk, pq, lp, dq, dk, dv, dpk_part, dpq_part);
      } else {
        backward_head<float>(p, b, h, dout, q, k, v, pk, pq, lp, dq, dk, dv, dpk_part, dpq_part);
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  m.def("disentangled_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? pos_key, Tensor? pos_query, Tensor? mask, "
        "Tensor rel_slots, float scale, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("disentangled_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? pos_key, "
        "Tensor? pos_query, Tensor? mask, Tensor rel_slots, Tensor out, Tensor lse, float scale, float dropout_p, "
        "int seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(electra_fast_cpp, CPU, m) {
  m.impl("disentangled_attention_fwd", &disentangled_attention_fwd);
  m.impl("disentangled_attention_bwd", &disentangled_attention_bwd);
}

}  // namespace electra_fast
