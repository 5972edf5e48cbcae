// Gumbel sampling, standalone and fused with the generator's vocabulary projection + MLM cross-entropy,
// on CPU. Semantics and noise layout: electra_fast/reference/sampling.py.
//
// The fused op streams over the vocabulary in chunks of `chunk` columns: one at::mm / addmm into a
// preallocated [N, chunk] buffer per chunk, then an at::parallel_for over rows that updates each row's
// online log-sum-exp, target logit, plain argmax and Gumbel argmax. Backward recomputes each chunk,
// turns it into dlogits in place and feeds two more matmuls; each chunk of dweight / dbias is written
// by exactly one loop iteration. Every row is processed sequentially by one task, so results do not
// depend on the thread count (beyond what the BLAS itself does).
//
// bf16 hidden and weight (the generator head under CPU bf16 autocast) take brgemm (brgemm.h) where it runs
// natively: every product is bf16 x bf16 -> fp32 in fixed row / column blocks (so no thread-count dependence at
// all), the forward products exact as before (bf16 products are exact in fp32), and dlogits rounded to bf16
// only as the operand of the two backward products, as flash attention does with its score gradients.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "brgemm.h"
#include "dispatch.h"
#include "env_switch.h"
#include "float_bits.h"
#include "parallel.h"
#include "philox.h"
#include "vec_math.h"

namespace electra_fast {
namespace {

constexpr int64_t kRowGrain = 4;   // rows per parallel task (each row is a full vocabulary chunk of work)
constexpr int64_t kTile = 1024;    // columns whose scores and Philox words live in stack buffers at once
// Philox calls of one tile (four columns per call; a tile may start mid-call), in whole vectors of 16
constexpr int64_t kTileCalls = ((kTile + 3) / 4 + 1 + 15) / 16 * 16;
constexpr int64_t kColBlock = 64;  // dbias columns per parallel task

// log(x) for a positive normal float: x = m * 2^e with m in [1, 2). Branch-free, vectorises.
static inline float log_pos(float x) {
  const int32_t bits = float_to_bits(x);
  const float e = static_cast<float>((bits >> 23) - 127);
  const float m = bits_to_float((bits & 0x007FFFFF) | 0x3F800000);
  return (log_1_2(m) + e * -2.12194440e-4f) + e * 0.693359375f;
}

// The AVX-512 Philox needs the whole file built for AVX-512 (-march=native on such a CPU): the score loop
// inlines vec_math.h's logs, which a target attribute alone would turn into calls.
#if defined(EF_HAVE_PHILOX_X16) && defined(__AVX512F__)
#define EF_GUMBEL_X16 1
// 512-bit vectors for the score loop (GCC's default tuning keeps loops at 256 bits)
#define EF_VEC512 __attribute__((target("prefer-vector-width=512")))
// ELECTRA_FAST_NO_AVX512=1 (read once per process) takes the portable loop: lets the tests check both.
bool use_philox_x16() {
  static const bool ok = !env_switch("ELECTRA_FAST_NO_AVX512");
  return ok;
}
#else
#define EF_VEC512
#endif

// words[4 * j + k] = word k of Philox call call0 + j (purpose GUMBEL), j < n_calls: with AVX-512 16 calls per
// vector (bit-identical to the scalar rounds GCC vectorises ~2.6x slower); room for n_calls rounded up to 16.
void gumbel_words(uint64_t seed, uint64_t call0, int64_t n_calls, uint32_t* __restrict words) {
#ifdef EF_GUMBEL_X16
  if (use_philox_x16()) {
    philox_words_x16(seed, call0, (n_calls + 15) / 16 * 16, kGumbel, words);
    return;
  }
#endif
#pragma omp simd
  for (int64_t j = 0; j < n_calls; ++j) {
    const Philox4 r = philox4x32_10(seed, call0 + static_cast<uint64_t>(j), kGumbel);
    words[4 * j] = r.x[0];
    words[4 * j + 1] = r.x[1];
    words[4 * j + 2] = r.x[2];
    words[4 * j + 3] = r.x[3];
  }
}

// sc[i] = x[i] * inv_t + Gumbel noise -log(-log(u)) of Philox word w[i] (-inf where disallowed); returns max sc
// over the non-NaN scores and sets *has_nan when a score is NaN (the vector max reduction drops NaN).
// u in [2^-24, 1 - 2^-24] keeps both logarithms' arguments positive normal floats.
template <typename T>
EF_VEC512 float gumbel_scores(const T* __restrict x, const uint32_t* __restrict w, int64_t len,
                              const uint8_t* __restrict dis, float inv_t, float* __restrict sc, bool* has_nan) {
  float mx = -std::numeric_limits<float>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int64_t i = 0; i < len; ++i) {
    float s = static_cast<float>(x[i]) * inv_t;
    s = s + -log_pos(-log_pos(philox_uniform_open(w[i])));
    if (dis != nullptr) s = dis[i] ? -std::numeric_limits<float>::infinity() : s;
    sc[i] = s;
    mx = std::max(mx, s);
    nan |= s != s;
  }
  *has_nan = nan != 0;
  return mx;
}

// One tile's step of a running argmax in torch.argmax's order over the allowed columns (the reference's rule):
// a NaN value beats everything and the first one is kept; otherwise strict > keeps the smallest id on ties.
// *best_id stays -1 until the first allowed column, which a row of -inf values then keeps. vals: the tile's
// values (disallowed ones -inf, never NaN), mx: their max over non-NaN values; dis: the tile's disallowed flags
// or nullptr; id0: the id of the tile's first column.
template <typename acc_t>
inline void argmax_step(const acc_t* vals, int64_t len, acc_t mx, bool has_nan, const uint8_t* dis, int64_t id0,
                        acc_t* best, int64_t* best_id) {
  if (has_nan) {
    if (!std::isnan(*best)) {
      int64_t i = 0;
      while (!std::isnan(vals[i])) ++i;
      *best = vals[i];
      *best_id = id0 + i;
    }
  } else if (mx > *best) {
    int64_t i = 0;
    while (vals[i] != mx) ++i;
    *best = mx;
    *best_id = id0 + i;
  } else if (*best_id < 0) {  // every allowed value so far is -inf: the first allowed column
    int64_t i = 0;
    while (i < len && dis != nullptr && dis[i]) ++i;
    if (i < len) *best_id = id0 + i;
  }
}

// Running Gumbel argmax over columns [v0, v0 + n) of one row: x points at column v0, `index` is the
// Philox element of column v0 (row * V + v0; element e reads word e % 4 of call e // 4). *best_id starts at -1.
template <typename T>
void gumbel_argmax(const T* __restrict x, int64_t n, int64_t v0, uint64_t index, const uint8_t* __restrict dis,
                   uint64_t seed, float inv_t, float* best, int64_t* best_id) {
  alignas(64) float sc[kTile];
  alignas(64) uint32_t words[4 * kTileCalls];
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t len = std::min(kTile, n - t0);
    const uint64_t e0 = index + static_cast<uint64_t>(t0);
    const int64_t off = static_cast<int64_t>(e0 % 4);
    gumbel_words(seed, e0 / 4, (off + len + 3) / 4, words);
    const uint8_t* tile_dis = dis == nullptr ? nullptr : dis + v0 + t0;
    bool nan = false;
    const float mx = gumbel_scores<T>(x + t0, words + off, len, tile_dis, inv_t, sc, &nan);
    argmax_step<float>(sc, len, mx, nan, tile_dis, v0 + t0, best, best_id);
  }
}

template <typename acc_t>
static inline acc_t exp_le0(acc_t x) {
  return std::exp(x);
}
template <>
inline float exp_le0<float>(float x) {
  return exp_nonpos(x);
}

// Per-row state of the fused forward (acc_t: fp32, or fp64 for fp64 inputs).
template <typename acc_t>
struct RowState {
  acc_t* m;        // running max
  acc_t* s;        // running sum of exp(x - m)
  acc_t* tgt;      // target logit
  acc_t* amax;     // plain argmax value / id
  int64_t* amax_id;
  float* best;     // Gumbel argmax score / id
  int64_t* best_id;
};

// x: one row of the chunk's hidden @ W_chunk.T; the bias chunk (or nullptr) is added here, in cache.
template <typename acc_t, typename id_t>
void update_row(acc_t* __restrict x, const acc_t* __restrict bias, int64_t n, int64_t v0, int64_t row, int64_t vocab,
                const id_t* targets, const uint8_t* dis, uint64_t seed, float inv_t, const RowState<acc_t>& st) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  int nan = 0;
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] += bias[i];
  }
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    mx = std::max(mx, x[i]);
    nan |= x[i] != x[i];
  }
  // plain argmax: torch.argmax's order over every column (st.amax_id starts at 0, so a row of -inf gives 0)
  argmax_step<acc_t>(x, n, mx, nan != 0, nullptr, v0, &st.amax[row], &st.amax_id[row]);
  // online log-sum-exp with torch.logsumexp's non-finite results: a NaN or +inf running max sticks and is the
  // lse (see the end of the forward); the sum is only taken under a finite max
  const acc_t m_new = nan != 0 ? std::numeric_limits<acc_t>::quiet_NaN() : std::max(st.m[row], mx);
  if (std::isfinite(m_new)) {
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += exp_le0<acc_t>(x[i] - m_new);
    st.s[row] = st.s[row] * exp_le0<acc_t>(st.m[row] - m_new) + sum;
  }
  st.m[row] = m_new;  // std::max keeps a NaN first argument
  const int64_t t = static_cast<int64_t>(targets[row]);
  if (t >= v0 && t < v0 + n) st.tgt[row] = x[t - v0];
  gumbel_argmax<acc_t>(x, n, v0, static_cast<uint64_t>(row) * vocab + v0, dis, seed, inv_t, &st.best[row],
                       &st.best_id[row]);
}

// One row's dlogits over columns v0..v0+n: (exp(x - lse) - onehot(t)) * g, in place; exactly 0 when the row is
// ignored (t == ignore_index), whatever its logits: 0 * a NaN or inf logit would be NaN.
template <typename acc_t>
void dlogits_row(acc_t* __restrict x, const acc_t* __restrict bias, int64_t n, int64_t v0, int64_t t,
                 int64_t ignore_index, acc_t lse, acc_t g) {
  if (t == ignore_index) {
    std::fill(x, x + n, acc_t(0));
    return;
  }
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = exp_le0<acc_t>(std::min(x[i] + bias[i] - lse, acc_t(0))) * g;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = exp_le0<acc_t>(std::min(x[i] - lse, acc_t(0))) * g;
  }
  if (t >= v0 && t < v0 + n) x[t - v0] -= g;
}

// out[c] = sum over rows r (in order) of x[r * stride + c], c < width.
template <typename acc_t>
void column_sums(const acc_t* __restrict x, int64_t rows, int64_t stride, int64_t width, acc_t* __restrict out) {
  for (int64_t c = 0; c < width; ++c) out[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* xr = x + r * stride;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) out[c] += xr[c];
  }
}

// logits chunk [N, vc] = hidden_acc @ weight[v0:v0+vc].T into `out`; returns the bias chunk in the
// accumulation dtype (undefined without bias): the row loops add it (addmm with a broadcast bias ran
// ~1.4x slower than mm here).
at::Tensor chunk_logits(at::Tensor& out, const at::Tensor& h, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, int64_t v0, int64_t vc) {
  at::mm_out(out, h, weight.narrow(0, v0, vc).to(h.scalar_type()).t());
  return bias.has_value() ? bias->narrow(0, v0, vc).to(h.scalar_type()).contiguous() : at::Tensor();
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_common(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, int64_t chunk) {
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous() && targets.is_contiguous(),
              "mlm_loss_sample: inputs must be contiguous");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "mlm_loss_sample: hidden [N, E] and weight [V, E] expected");
  TORCH_CHECK(chunk >= 1, "mlm_loss_sample: chunk must be >= 1");
}

#ifdef EF_HAVE_BRGEMM
constexpr int64_t kBrRows = 32;  // rows per task on the bf16 path: a [32, chunk] fp32 logits block stays in L2

bool brgemm_path(const at::Tensor& hidden, const at::Tensor& weight) {
  return hidden.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && hidden.size(1) % 2 == 0 &&
         brg::enabled();
}

const brg::bf16* bf16_ptr(const at::Tensor& t) { return t.data_ptr<brg::bf16>(); }
uint16_t* u16_ptr(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<int16_t>()); }

// weight [V, E] -> VNNI of weight^T, the B operand ([E, V], ld V) of hidden @ weight^T
at::Tensor pack_weight_cols(const at::Tensor& weight) {
  const int64_t vocab = weight.size(0), e = weight.size(1);
  at::Tensor out = at::empty({e * vocab}, weight.options().dtype(at::kShort));
  const brg::bf16* w = bf16_ptr(weight);
  uint16_t* dst = u16_ptr(out);
  electra_fast::parallel_for(0, vocab, 1024, [&](int64_t begin, int64_t end) {
    brg::pack_cols(w + begin * e, e, end - begin, e, dst + 2 * begin, vocab);
  });
  return out;
}

// weight [V, E] -> VNNI of its rows, the B operand ([V, E], ld E) of dlogits @ weight; an odd V pairs with zeros
at::Tensor pack_weight_rows(const at::Tensor& weight) {
  const int64_t vocab = weight.size(0), e = weight.size(1);
  at::Tensor out = at::empty({brg::even(vocab) * e}, weight.options().dtype(at::kShort));
  const brg::bf16* w = bf16_ptr(weight);
  uint16_t* dst = u16_ptr(out);
  electra_fast::parallel_for(0, (vocab + 1) / 2, 512, [&](int64_t begin, int64_t end) {
    const int64_t r0 = 2 * begin, r1 = std::min(vocab, 2 * end);
    brg::pack_rows(w + r0 * e, e, r1 - r0, e, dst + r0 * e, e);
  });
  return out;
}

// The bias in fp32 (undefined without bias): the row loops add it to each fp32 logits chunk.
at::Tensor bias_fp32(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
}

// Fills st like the generic loop.
template <typename id_t>
void fwd_brgemm(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                const id_t* tg, const uint8_t* dis, uint64_t seed, float inv_t, int64_t chunk, at::Tensor& buf,
                const RowState<float>& st) {
  const int64_t n = hidden.size(0), vocab = weight.size(0), e = hidden.size(1);
  const at::Tensor wt = pack_weight_cols(weight), bf = bias_fp32(bias);
  const brg::bf16* h = bf16_ptr(hidden);
  const uint16_t* wp = u16_ptr(wt);
  for (int64_t v0 = 0; v0 < vocab; v0 += chunk) {  // chunk-outer: a weight chunk is shared by every row block
    const int64_t vc = std::min(chunk, vocab - v0);
    float* x = buf.data_ptr<float>();
    const float* bp = bf.defined() ? bf.data_ptr<float>() + v0 : nullptr;
    electra_fast::parallel_for(0, (n + kBrRows - 1) / kBrRows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * kBrRows, rows = std::min(kBrRows, n - r0);
        brg::gemm(rows, vc, e, h + r0 * e, e, brg::as_bf16(wp) + 2 * v0, vocab, x + r0 * vc, vc, false);
        for (int64_t r = r0; r < r0 + rows; ++r)
          update_row<float, id_t>(x + r * vc, bp, vc, v0, r, vocab, tg, dis, seed, inv_t, st);
      }
      brg::release();
    });
  }
}
// brgemm_path() implies bf16 inputs, whose accumulation dtype is fp32: the generic loop's fp64 instance never
// gets here
template <typename id_t>
void fwd_brgemm(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const id_t*, const uint8_t*,
                uint64_t, float, int64_t, at::Tensor&, const RowState<double>&) {
  TORCH_CHECK(false, "mlm_loss_sample_fwd: the brgemm path accumulates in fp32");
}

// dh [N, E], dweight [V, E] (bf16), dbias [V] (weight dtype): per chunk, (1) row blocks recompute the logits,
// turn them into dlogits (kept in fp32 for dbias), add dlogits @ W_chunk to their dh rows and pack their
// dlogits as VNNI row pairs; (2) column blocks compute dW_chunk^T = hidden^T @ dlogits (turned around so B
// packs from rows) and the dbias sums.
template <typename id_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_brgemm(const at::Tensor& grad_rows, const at::Tensor& hidden,
                                                          const at::Tensor& weight,
                                                          const c10::optional<at::Tensor>& bias, const id_t* tg,
                                                          const float* ls, int64_t ignore_index, int64_t chunk) {
  const int64_t n = hidden.size(0), vocab = weight.size(0), e = hidden.size(1), ne = brg::even(n);
  const at::Tensor wt = pack_weight_cols(weight), wr = pack_weight_rows(weight), bf = bias_fp32(bias);
  const auto f32 = hidden.options().dtype(at::kFloat), i16 = hidden.options().dtype(at::kShort);
  at::Tensor ht = at::empty({e * ne}, i16);  // hidden^T [E, N] (zero column N when N is odd): A of dW^T
  brg::transpose(bf16_ptr(hidden), e, n, e, u16_ptr(ht), ne);
  at::Tensor buf = at::empty({n * chunk}, f32), dlp = at::empty({ne * chunk}, i16);
  at::Tensor dh = at::empty({n, e}, f32), dw = at::empty_like(weight), db = at::empty({vocab}, weight.options());
  at::Tensor dbc_buf = at::empty({chunk}, f32);
  const brg::bf16* h = bf16_ptr(hidden);
  const float* gr = grad_rows.data_ptr<float>();
  const uint16_t *wtp = u16_ptr(wt), *wrp = u16_ptr(wr);
  const uint16_t* htp = u16_ptr(ht);
  float* dhp = dh.data_ptr<float>();
  uint16_t* dwp = reinterpret_cast<uint16_t*>(dw.data_ptr<brg::bf16>());
  for (int64_t v0 = 0; v0 < vocab; v0 += chunk) {
    const int64_t vc = std::min(chunk, vocab - v0), vce = brg::even(vc);
    float* x = buf.data_ptr<float>();
    uint16_t* dl = u16_ptr(dlp);
    const float* bp = bf.defined() ? bf.data_ptr<float>() + v0 : nullptr;
    electra_fast::parallel_for(0, (n + kBrRows - 1) / kBrRows, 1, [&](int64_t begin, int64_t end) {
      brg::Scratch ws;
      uint16_t* a = ws.get<uint16_t>(0, kBrRows * vce);  // this block's dlogits in bf16, zero column vc if odd
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * kBrRows, rows = std::min(kBrRows, n - r0);
        float* xb = x + r0 * vc;
        brg::gemm(rows, vc, e, h + r0 * e, e, brg::as_bf16(wtp) + 2 * v0, vocab, xb, vc, false);
        for (int64_t r = r0; r < r0 + rows; ++r) {
          dlogits_row<float>(x + r * vc, bp, vc, v0, static_cast<int64_t>(tg[r]), ignore_index, ls[r], gr[r]);
        }
        brg::to_rows(xb, vc, rows, vc, a, vce);
        if (vce != vc) {
          for (int64_t r = 0; r < rows; ++r) a[r * vce + vc] = 0;
        }
        brg::gemm(rows, e, vce, a, vce, wrp + v0 * e, e, dhp + r0 * e, e, v0 > 0);
        brg::pack_rows(xb, vc, rows, vc, dl + r0 * vc, vc);  // rows r0.. (r0 even) pair within the block
      }
      brg::release();
    });
    float* dbc = dbc_buf.data_ptr<float>();
    electra_fast::parallel_for(0, (vc + kColBlock - 1) / kColBlock, 1, [&](int64_t begin, int64_t end) {
      brg::Scratch ws;
      float* tile = ws.get<float>(0, e * kColBlock);
      for (int64_t cb = begin; cb < end; ++cb) {
        const int64_t c0 = cb * kColBlock, cols = std::min(kColBlock, vc - c0);
        brg::gemm(e, cols, ne, htp, ne, dl + 2 * c0, vc, tile, kColBlock, false);
        for (int64_t c = 0; c < cols; ++c) {
          uint16_t* row = dwp + (v0 + c0 + c) * e;
          for (int64_t k = 0; k < e; ++k) row[k] = Bits<at::BFloat16>::store(tile[k * kColBlock + c]);  // NaN stays
        }
        column_sums<float>(x + c0, n, vc, cols, dbc + c0);
      }
      brg::release();
    });
    db.narrow(0, v0, vc).copy_(dbc_buf.narrow(0, 0, vc));
  }
  return {dh.to(hidden.scalar_type()), dw, db};
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlm_loss_sample_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const c10::optional<at::Tensor>& disallowed, int64_t seed, double inv_temperature, int64_t ignore_index,
    int64_t chunk) {
  check_common(hidden, weight, targets, chunk);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  chunk = std::min(chunk, std::max<int64_t>(vocab, 1));
#ifdef EF_HAVE_BRGEMM
  const bool brgemm = brgemm_path(hidden, weight);
  if (brgemm) chunk = brg::even(chunk);  // chunks start at even rows of the packed weight
#else
  const bool brgemm = false;
#endif
  const auto acc = acc_type(hidden);
  const auto fopt = hidden.options().dtype(acc);
  const at::Tensor h = brgemm ? hidden : hidden.to(acc).contiguous();
  at::Tensor buf = at::empty({n * chunk}, fopt);
  at::Tensor m = at::full({n}, -std::numeric_limits<double>::infinity(), fopt), s = at::zeros({n}, fopt);
  at::Tensor tgt = at::zeros({n}, fopt), amax = at::full({n}, -std::numeric_limits<double>::infinity(), fopt);
  at::Tensor amax_id = at::zeros({n}, hidden.options().dtype(at::kLong)), best_id = at::full_like(amax_id, -1);
  at::Tensor best = at::full({n}, -std::numeric_limits<float>::infinity(), hidden.options().dtype(at::kFloat));
  const uint8_t* dis = disallowed.has_value() ? disallowed->data_ptr<uint8_t>() : nullptr;
  const float inv_t = static_cast<float>(inv_temperature);
  at::Tensor loss = at::empty({n}, fopt), lse = at::empty({n}, fopt);
  AT_DISPATCH_FLOATING_TYPES(acc, "mlm_loss_sample_fwd", [&] {
    using acc_t = scalar_t;
    EF_DISPATCH_IDS(targets.scalar_type(), "mlm_loss_sample_fwd", [&] {
      const id_t* tg = targets.data_ptr<id_t>();
      const RowState<acc_t> st{m.data_ptr<acc_t>(),       s.data_ptr<acc_t>(),         tgt.data_ptr<acc_t>(),
                               amax.data_ptr<acc_t>(),    amax_id.data_ptr<int64_t>(), best.data_ptr<float>(),
                               best_id.data_ptr<int64_t>()};
#ifdef EF_HAVE_BRGEMM
      if (brgemm) fwd_brgemm<id_t>(hidden, weight, bias, tg, dis, static_cast<uint64_t>(seed), inv_t, chunk, buf, st);
#endif
      for (int64_t v0 = 0; v0 < (brgemm ? 0 : vocab); v0 += chunk) {
        const int64_t vc = std::min(chunk, vocab - v0);
        at::Tensor lc = buf.narrow(0, 0, n * vc).view({n, vc});
        const at::Tensor bc = chunk_logits(lc, h, weight, bias, v0, vc);
        acc_t* x = lc.data_ptr<acc_t>();
        const acc_t* bp = bc.defined() ? bc.data_ptr<acc_t>() : nullptr;
        electra_fast::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r)
            update_row<acc_t, id_t>(x + r * vc, bp, vc, v0, r, vocab, tg, dis, static_cast<uint64_t>(seed), inv_t,
                                    st);
        });
      }
      acc_t* lo = loss.data_ptr<acc_t>();
      acc_t* ls = lse.data_ptr<acc_t>();
      for (int64_t r = 0; r < n; ++r) {
        ls[r] = std::isfinite(st.m[r]) ? st.m[r] + std::log(st.s[r]) : st.m[r];  // NaN, +inf or -inf as is
        lo[r] = static_cast<int64_t>(tg[r]) == ignore_index ? acc_t(0) : ls[r] - st.tgt[r];
      }
    });
  });
  return {loss, lse, best_id, amax_id};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlm_loss_sample_bwd(
    const at::Tensor& grad_rows, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index,
    int64_t chunk) {
  check_common(hidden, weight, targets, chunk);
  const int64_t n = hidden.size(0), vocab = weight.size(0), e = hidden.size(1);
  chunk = std::min(chunk, std::max<int64_t>(vocab, 1));
  const auto acc = acc_type(hidden);
  TORCH_CHECK(grad_rows.scalar_type() == acc && lse.scalar_type() == acc && grad_rows.is_contiguous() &&
                  lse.is_contiguous(),
              "mlm_loss_sample_bwd: grad_rows and lse must be contiguous in the accumulation dtype");
#ifdef EF_HAVE_BRGEMM
  if (brgemm_path(hidden, weight)) {
    return EF_DISPATCH_IDS(targets.scalar_type(), "mlm_loss_sample_bwd", [&] {
      return bwd_brgemm<id_t>(grad_rows, hidden, weight, bias, targets.data_ptr<id_t>(), lse.data_ptr<float>(),
                              ignore_index, brg::even(chunk));
    });
  }
#endif
  const auto fopt = hidden.options().dtype(acc);
  const at::Tensor h = hidden.to(acc).contiguous();
  at::Tensor buf = at::empty({n * chunk}, fopt);
  at::Tensor dh = at::zeros({n, e}, fopt);
  at::Tensor dw = at::empty_like(weight);
  at::Tensor db = at::empty({vocab}, weight.options());
  const bool direct = weight.scalar_type() == acc;  // else each dweight chunk goes through an acc buffer
  at::Tensor dwc_buf = direct ? at::Tensor() : at::empty({chunk * e}, fopt);
  at::Tensor dbc_buf = at::empty({chunk}, fopt);
  AT_DISPATCH_FLOATING_TYPES(acc, "mlm_loss_sample_bwd", [&] {
    using acc_t = scalar_t;
    EF_DISPATCH_IDS(targets.scalar_type(), "mlm_loss_sample_bwd", [&] {
      const id_t* tg = targets.data_ptr<id_t>();
      const acc_t* gr = grad_rows.data_ptr<acc_t>();
      const acc_t* ls = lse.data_ptr<acc_t>();
      for (int64_t v0 = 0; v0 < vocab; v0 += chunk) {
        const int64_t vc = std::min(chunk, vocab - v0);
        at::Tensor lc = buf.narrow(0, 0, n * vc).view({n, vc});
        const at::Tensor bc = chunk_logits(lc, h, weight, bias, v0, vc);
        acc_t* x = lc.data_ptr<acc_t>();
        const acc_t* bp = bc.defined() ? bc.data_ptr<acc_t>() : nullptr;
        electra_fast::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            dlogits_row<acc_t>(x + r * vc, bp, vc, v0, static_cast<int64_t>(tg[r]), ignore_index, ls[r], gr[r]);
          }
        });
        const at::Tensor wc = weight.narrow(0, v0, vc).to(acc);
        dh.addmm_(lc, wc);
        if (direct) {
          at::Tensor out = dw.narrow(0, v0, vc);
          at::mm_out(out, lc.t(), h);
        } else {
          at::Tensor tmp = dwc_buf.narrow(0, 0, vc * e).view({vc, e});
          at::mm_out(tmp, lc.t(), h);
          dw.narrow(0, v0, vc).copy_(tmp);
        }
        // dbias chunk: column sums, each column block summed over rows in order by one task.
        acc_t* dbc = dbc_buf.data_ptr<acc_t>();
        electra_fast::parallel_for(0, (vc + kColBlock - 1) / kColBlock, 1, [&](int64_t begin, int64_t end) {
          for (int64_t cb = begin; cb < end; ++cb) {
            const int64_t c0 = cb * kColBlock, c1 = std::min(vc, c0 + kColBlock);
            column_sums<acc_t>(x + c0, n, vc, c1 - c0, dbc + c0);
          }
        });
        db.narrow(0, v0, vc).copy_(dbc_buf.narrow(0, 0, vc));
      }
    });
  });
  return {dh.to(hidden.scalar_type()), dw, db};
}

at::Tensor gumbel_sample(const at::Tensor& logits, const c10::optional<at::Tensor>& disallowed, int64_t seed,
                         double inv_temperature) {
  TORCH_CHECK(logits.is_contiguous() && logits.dim() == 2, "gumbel_sample: contiguous [N, V] logits expected");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::zeros({n}, logits.options().dtype(at::kLong));
  const uint8_t* dis = disallowed.has_value() ? disallowed->data_ptr<uint8_t>() : nullptr;
  const float inv_t = static_cast<float>(inv_temperature);
  int64_t* o = out.data_ptr<int64_t>();
  EF_DISPATCH_FLOATS(logits.scalar_type(), "gumbel_sample", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    electra_fast::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float best = -std::numeric_limits<float>::infinity();
        int64_t best_id = -1;
        gumbel_argmax<scalar_t>(x + r * vocab, vocab, 0, static_cast<uint64_t>(r) * vocab, dis,
                                static_cast<uint64_t>(seed), inv_t, &best, &best_id);
        o[r] = best_id;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  m.def("gumbel_sample(Tensor logits, Tensor? disallowed, int seed, float inv_temperature) -> Tensor");
  m.def("mlm_loss_sample_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor? disallowed, "
        "int seed, float inv_temperature, int ignore_index, int chunk) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("mlm_loss_sample_bwd(Tensor grad_rows, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
        "Tensor lse, int ignore_index, int chunk) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(electra_fast_cpp, CPU, m) {
  m.impl("gumbel_sample", &gumbel_sample);
  m.impl("mlm_loss_sample_fwd", &mlm_loss_sample_fwd);
  m.impl("mlm_loss_sample_bwd", &mlm_loss_sample_bwd);
}

}  // namespace electra_fast
