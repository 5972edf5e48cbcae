// Shared pieces of the CPU disentangled attention (disentangled_attention.cpp: fp32 / fp64 accumulation through
// at::mm; disentangled_attention_amx.cpp: bf16 through brgemm). See the .cpp for the blocking scheme.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "parallel.h"
#include "philox.h"
#include "vec_math.h"

namespace electra_fast {
namespace da {

#ifndef EF_DA_BLOCK_M
#define EF_DA_BLOCK_M 64
#endif
constexpr int64_t kBlockM = EF_DA_BLOCK_M;  // query rows per block
constexpr int64_t kWholeT = 512;             // sequences up to this length take one block of all T rows

// Rows per block for length T: short sequences in one block (the [T, T] scores of T <= 512 are ~1 MB, still
// cache-resident), which halves or quarters the number of small GEMM calls, whose fixed cost dominates there.
inline int64_t block_rows(int64_t T) { return T <= kWholeT ? T : kBlockM; }
constexpr int64_t kPosPartitions = 8;  // fixed batch partitions for the position-gradient reduction
constexpr int64_t kJB = 16;            // keys per tile of the p2c gather / scatter

template <typename acc_t>
inline acc_t exp_shifted(acc_t x) {  // exp(x) for x <= 0 (vectorisable for fp32)
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp_nonpos(x);
  } else {
    return std::exp(x);
  }
}

// A call: padded [B, H, T, D], or packed [N, H, D] with cu (B = number of sequences, T = max_seqlen). The kernels
// work on one sequence at a time through sequence(p, b): in the packed layout a problem of that sequence's length.
struct Problem {
  int64_t B, H, T, D, two_k;
  bool has_pk, has_pq, has_mask;
  double scale, dropout_p;
  uint64_t seed;
  const uint8_t* mask;
  const int32_t* slots;  // rel_slots
  int32_t s0, s1;        // slot range over all (i, j)
  at::ScalarType acc;
  const int32_t* cu = nullptr;  // packed: cu_seqlens [B + 1]; nullptr for the padded layout
  int64_t drop_T = 0;           // row length of the dropout element index: T of the call (a sequence's padded row)
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& pos_key, const c10::optional<at::Tensor>& pos_query,
                     const c10::optional<at::Tensor>& mask, const at::Tensor& rel_slots, double scale,
                     double dropout_p, int64_t seed, const c10::optional<at::Tensor>& cu_seqlens);

// Sequence b of a packed call as a problem of its own length L: rel_slots depends on i - j only, so its table is
// the middle 2L - 1 entries of the call's. With own_slot_range, [s0, s1] is that table's range (the p2c products of
// a short sequence cover its own slots, and equal those of a call holding it alone); without, the call's (the bf16
// path's position packs start at the call's s0). The padded layout: p itself.
inline Problem sequence(const Problem& p, int64_t b, bool own_slot_range = true) {
  if (p.cu == nullptr) return p;
  Problem s = p;
  s.T = p.cu[b + 1] - p.cu[b];
  s.slots = p.slots + (p.T - s.T);
  if (own_slot_range) {
    const auto [lo, hi] = std::minmax_element(s.slots, s.slots + 2 * s.T - 1);
    s.s0 = *lo, s.s1 = *hi;
  }
  return s;
}

// The [T, D] rows of (b, h) (strided views: at::mm reads them through their row stride).
inline at::Tensor head_rows(const Problem& p, const at::Tensor& t, int64_t b, int64_t h) {
  if (p.cu == nullptr) return t[b][h];
  return t.narrow(0, p.cu[b], p.cu[b + 1] - p.cu[b]).select(1, h);
}

// lse: [B, H, T], packed [H, N]; the offset of (b, h)'s first row.
inline int64_t lse_offset(const Problem& p, int64_t b, int64_t h) {
  return p.cu == nullptr ? (b * p.H + h) * p.T : h * p.cu[p.B] + p.cu[b];
}
inline at::Tensor empty_lse(const Problem& p, const at::Tensor& q) {
  const auto opts = q.options().dtype(at::kFloat);
  return p.cu == nullptr ? at::empty({p.B, p.H, p.T}, opts) : at::empty({p.H, int64_t{p.cu[p.B]}}, opts);
}

// Slot range [lo, hi] touched by query rows [i0, i0 + bm) against all keys.
inline std::pair<int32_t, int32_t> block_slot_range(const Problem& p, int64_t i0, int64_t bm) {
  const int32_t* first = p.slots + i0;
  const int32_t* last = p.slots + i0 + bm - 1 + p.T;  // one past index i0 + bm - 1 + T - 1
  return {*std::min_element(first, last), *std::max_element(first, last)};
}

// Row stride of the score blocks: T padded off multiples of 256 floats so that a block's rows do not alias in
// the L1 sets (the p2c tiles touch kJB columns of every row).
inline int64_t block_ld(int64_t T) {
  int64_t ld = (T + 15) / 16 * 16;
  return ld % 256 == 0 ? ld + 16 : ld;
}

// Number of workers parallel_tasks(n, ...) uses (the size of per-worker state).
inline int64_t task_workers(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads())); }

// Runs task(t, w) for t in [0, n) on at::parallel_for's threads, handing tasks out dynamically: a descheduled
// thread (shared machine) does not hold the others back at the end. w in [0, task_workers(n)) names the worker
// (for per-worker scratch: one worker runs its tasks one after another). Tasks write disjoint outputs, so the
// result does not depend on which thread ran which task.
template <typename F>
void parallel_tasks(int64_t n, const F& task) {
  std::atomic<int64_t> next{0};
  electra_fast::parallel_for(0, task_workers(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) task(t, w);
    }
  });
}

inline bool query_valid(const Problem& p, int64_t b, int64_t i) { return !p.has_mask || p.mask[b * p.T + i]; }

// Whether sequence b has a valid key (read only for rows whose scores have no finite maximum: rare).
inline bool any_key(const Problem& p, int64_t b) {
  return !p.has_mask || std::any_of(p.mask + b * p.T, p.mask + (b + 1) * p.T, [](uint8_t m) { return m != 0; });
}

// keep[j] = 1 iff element e = base + j survives dropout (word e % 4 of the ATTN_DROPOUT call at e // 4).
void keep_span(uint64_t seed, uint64_t base, int64_t n, float p, uint8_t* __restrict keep);

// row[j] *= keep[j] ? 1 / (1 - p) : 0
template <typename acc_t>
inline void apply_keep(acc_t* __restrict row, const uint8_t* __restrict keep, int64_t n, acc_t inv_keep) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= keep[j] ? inv_keep : acc_t(0);
}

inline uint64_t dropout_base(const Problem& p, int64_t bh, int64_t i) {
  return static_cast<uint64_t>((bh * p.drop_T + i) * p.drop_T);
}

// keep bytes of a block's rows i0 .. i0 + bm - 1 (row r at keep + r * T)
inline void block_keep(const Problem& p, int64_t bh, int64_t i0, int64_t bm, uint8_t* keep) {
  const float p32 = static_cast<float>(p.dropout_p);
  if (p.drop_T == p.T) {  // the block's rows are consecutive elements of the stream: one call for all of them
    keep_span(p.seed, dropout_base(p, bh, i0), bm * p.T, p32, keep);
    return;
  }
  // a packed sequence shorter than its padded row: each row is a span of its own
  for (int64_t r = 0; r < bm; ++r) keep_span(p.seed, dropout_base(p, bh, i0 + r), p.T, p32, keep + r * p.T);
}

// p2c term of a block: s[r, j] += KP[j, s(i0 + r, j) - s0] (KP row stride ns). A key's values over the block's
// rows come from consecutive slots of one KP row, so keys are the outer loop; kJB keys at a time go through an
// L1-resident [bm, kJB] tile and are then added row-wise (walking a column of the block itself, stride ld,
// missed L1 on every element).
template <typename acc_t>
void add_p2c_block(const Problem& p, int64_t i0, int64_t bm, acc_t* __restrict s, int64_t ld,
                   const acc_t* __restrict kp, int64_t ns) {
  const int64_t T = p.T;
  std::unique_ptr<acc_t[]> tile(new acc_t[kJB * bm]);
  acc_t* __restrict t = tile.get();
  for (int64_t j0 = 0; j0 < T; j0 += kJB) {
    const int64_t jb = std::min(kJB, T - j0);
    for (int64_t jj = 0; jj < jb; ++jj) {
      const acc_t* kprow = kp + (j0 + jj) * ns - p.s0;
      const int32_t* sl = p.slots + i0 - (j0 + jj) + T - 1;  // sl[r] = s(i0 + r, j)
      for (int64_t r = 0; r < bm; ++r) t[r * kJB + jj] = kprow[sl[r]];
    }
    for (int64_t r = 0; r < bm; ++r) {
      acc_t* srow = s + r * ld + j0;
#pragma omp simd
      for (int64_t jj = 0; jj < jb; ++jj) srow[jj] += t[r * kJB + jj];
    }
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

// Its backward: dKP[j, s(i0 + r, j) - s0] += g[r, j], in a fixed order (columns of g copied kJB at a time into
// an L1-resident tile first, as in add_p2c_block).
template <typename acc_t>
void scatter_p2c_block(const Problem& p, int64_t i0, int64_t bm, const acc_t* __restrict g, int64_t ld,
                       acc_t* __restrict dkp, int64_t ns) {
  const int64_t T = p.T;
  std::unique_ptr<acc_t[]> tile(new acc_t[kJB * bm]);
  acc_t* __restrict t = tile.get();
  for (int64_t j0 = 0; j0 < T; j0 += kJB) {
    const int64_t jb = std::min(kJB, T - j0);
    for (int64_t r = 0; r < bm; ++r) {
      const acc_t* grow = g + r * ld + j0;
      for (int64_t jj = 0; jj < jb; ++jj) t[jj * bm + r] = grow[jj];
    }
    for (int64_t jj = 0; jj < jb; ++jj) {
      scatter_runs<acc_t>(dkp + (j0 + jj) * ns - p.s0, p.slots + i0 - (j0 + jj) + T - 1, 1, t + jj * bm, 1, bm);
    }
  }
}

// Scores of query row i: s = scale * (S + p2c + the c2p gather from crow), masked keys -> -inf, written back
// into `s`. Returns the row max (-inf when no key is valid).
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
  if (std::isnan(inv)) {  // a NaN or +inf score: an invalid row, NaN except at -inf scores (exactly 0)
    for (int64_t j = 0; j < T; ++j) s[j] = s[j] == acc_t(0) ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
    return std::numeric_limits<acc_t>::quiet_NaN();
  }
#pragma omp simd
  for (int64_t j = 0; j < T; ++j) s[j] *= inv;
  return mx + std::log(sum);
}

// Forward rows of one block: s ([bm, T], row stride ld) holds S (+ the p2c term) and becomes the probabilities
// with dropout applied; lse[i] (the (b, h) rows, lse_offset) is written (+inf for a padded query or a row with no
// valid key, whose probabilities are 0; NaN for a row with a NaN or infinite score, whose probabilities are NaN:
// NaN in, NaN out).
// c: the block's c2p products ([bm, c_ld], column 0 = slot clo) or nullptr. keep: scratch of bm * T bytes.
template <typename acc_t>
void forward_rows(const Problem& p, int64_t b, int64_t bh, int64_t i0, int64_t bm, acc_t* s, int64_t ld,
                  const acc_t* c, int64_t c_ld, int32_t clo, float* lse, uint8_t* keep) {
  const int64_t T = p.T;
  const acc_t inv_keep = acc_t(1) / (acc_t(1) - static_cast<acc_t>(p.dropout_p));
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  if (p.dropout_p > 0) block_keep(p, bh, i0, bm, keep);
  for (int64_t r = 0; r < bm; ++r) {
    const int64_t i = i0 + r;
    acc_t* row = s + r * ld;
    acc_t mx = ninf;
    const bool live = query_valid(p, b, i);
    if (live) mx = score_row<acc_t>(p, b, i, row, c ? c + r * c_ld : nullptr, clo);
    if (mx == ninf) {
      // padded query or no valid key: output 0. Otherwise every valid score is NaN or -inf (score_row's max skips
      // NaN): the row is invalid and outputs NaN, as the reference and the eager softmax do.
      const bool dead = !live || !any_key(p, b);
      for (int64_t j = 0; j < T; ++j)  // an invalid row: NaN except at -inf scores (masked keys), exactly 0
        row[j] = dead || row[j] == ninf ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
      lse[i] = dead ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
      continue;  // (dropout would keep NaN NaN and 0 zero)
    }
    lse[i] = static_cast<float>(softmax_row<acc_t>(T, row, mx, nullptr));
    if (p.dropout_p > 0) apply_keep<acc_t>(row, keep + r * T, T, inv_keep);
  }
}

// Dead rows (lse +inf: padded queries, rows without a valid key) output exactly 0, also where V holds a NaN or inf:
// their probabilities are 0, but 0 * NaN is NaN in the P @ V product. out: the block's [bm, D] rows (row stride ld).
template <typename T>
inline void zero_dead_rows(T* out, int64_t ld, int64_t bm, int64_t D, const float* lse_rows) {
  for (int64_t r = 0; r < bm; ++r) {
    if (lse_rows[r] == std::numeric_limits<float>::infinity()) std::fill(out + r * ld, out + r * ld + D, T(0));
  }
}

// Backward rows of one block. In: s = S (+ p2c), g = dP (dO V^T). Out: s = the probabilities that hit V
// (dropout applied), g = d score (scale included); dc[r, s(i, j) - clo] += g[r, j] when dc is given. lse: the
// (b, h) rows (lse_offset).
template <typename acc_t>
void backward_rows(const Problem& p, int64_t b, int64_t bh, int64_t i0, int64_t bm, acc_t* s, acc_t* g,
                   int64_t ld, const acc_t* c, acc_t* dc, int64_t c_ld, int32_t clo, const float* lse,
                   uint8_t* keep) {
  const int64_t T = p.T;
  const acc_t inv_keep = acc_t(1) / (acc_t(1) - static_cast<acc_t>(p.dropout_p));
  const acc_t scale = static_cast<acc_t>(p.scale);
  if (p.dropout_p > 0) block_keep(p, bh, i0, bm, keep);  // as in forward_rows
  for (int64_t r = 0; r < bm; ++r) {
    const int64_t i = i0 + r;
    acc_t* row = s + r * ld;
    acc_t* grow = g + r * ld;
    const uint8_t* krow = keep + r * T;
    const float l = lse[i];
    if (!query_valid(p, b, i) || std::isinf(l)) {
      std::fill(row, row + T, acc_t(0));
      std::fill(grow, grow + T, acc_t(0));
      continue;
    }
    score_row<acc_t>(p, b, i, row, c ? c + r * c_ld : nullptr, clo);
    if constexpr (std::is_same_v<acc_t, double>) {
      // fp64 (gradcheck): renormalise exactly instead of trusting the fp32 lse
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < T; ++j) mx = std::max(mx, row[j]);
      softmax_row<acc_t>(T, row, mx, nullptr);
    } else {
      const acc_t la = static_cast<acc_t>(l);
      softmax_row<acc_t>(T, row, acc_t(0), &la);
    }
    if (p.dropout_p > 0) apply_keep<acc_t>(grow, krow, T, inv_keep);  // dP through the dropout mask
    acc_t delta = 0;
#pragma omp simd reduction(+ : delta)
    for (int64_t j = 0; j < T; ++j) delta += row[j] * grow[j];
#pragma omp simd
    for (int64_t j = 0; j < T; ++j) grow[j] = row[j] * (grow[j] - delta) * scale;
    if (p.dropout_p > 0) apply_keep<acc_t>(row, krow, T, inv_keep);  // the probabilities that hit V
    if (dc != nullptr) {
      scatter_runs<acc_t>(dc + r * c_ld - clo, p.slots + i + T - 1, -1, grow, 1, T);  // dC[r, s(i, j)] += g[j]
    }
  }
}

// dst[e] = sum over c of src[c * n + e], c in increasing order (fixed chunks: thread-count independent).
template <typename acc_t>
void sum_partitions(const acc_t* __restrict src, acc_t* __restrict dst, int64_t n_part, int64_t n) {
  electra_fast::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    std::copy(src + begin, src + end, dst + begin);
    for (int64_t c = 1; c < n_part; ++c) {
      const acc_t* part = src + c * n;
#pragma omp simd
      for (int64_t e = begin; e < end; ++e) dst[e] += part[e];
    }
  });
}

// An uninitialised [B, H, T, D] tensor in t's dim order (the outputs' layout, mirrored by the fake kernels in
// ops/disentangled_attention.py): token-major ([B, T, H, D] memory) when t is a token-major view (H, T > 1 and
// stride(1) < stride(2): heads of a projection, or q / k / v sliced from one fused [B, T, 3, H, D] projection),
// so that the caller's transpose back to tokens is free and gradients stack into the projection in one copy;
// contiguous otherwise (and for packed [N, H, D] tensors).
inline at::Tensor empty_in_dim_order(const at::Tensor& t) {
  if (t.dim() == 4 && t.size(1) > 1 && t.size(2) > 1 && t.stride(1) < t.stride(2))
    return at::empty({t.size(0), t.size(2), t.size(1), t.size(3)}, t.options()).transpose(1, 2);
  return at::empty(t.sizes(), t.options());
}

// ---------------------------------------------------------------------------------------------------------
// bf16 on AMX / AVX512-BF16 (disentangled_attention_amx.cpp): bf16 x bf16 -> fp32 block products through
// ATen's brgemm micro-kernels; softmax, gathers and scatters stay in fp32 (the functions above).

// True when q is bf16 and D even, and brg::enabled() (torch's bf16 brgemm runs natively, ELECTRA_FAST_NO_AMX unset).
bool amx_usable(const at::Tensor& q, const Problem& p);
std::tuple<at::Tensor, at::Tensor> forward_amx(const Problem& p, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& pos_key,
                                               const at::Tensor& pos_query);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_amx(
    const Problem& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& pos_key, const at::Tensor& pos_query, const float* lse);

}  // namespace da
}  // namespace electra_fast
