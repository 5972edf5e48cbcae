// Counter-based dropout on CPU: y = x * keep * scale, the same kernel for the forward (on the input) and the
// backward (on the gradient), the mask regenerated from (seed, stream) each time. Semantics and the random
// stream: electra_fast/reference/dropout.py.
//
// FIXED chunks of kChunk elements run in parallel (a chunk's result depends only on its indices, so the output
// never depends on the thread count). A chunk first gets its keep bytes (one Philox call per four elements; word
// i % 4 of call i // 4 is element i's), then a contiguous loop writes x * scale or 0. On AVX-512 CPUs the Philox
// calls run 16 to a 512-bit vector with hand-written intrinsics; elsewhere GCC vectorises the portable loop
// (target_clones). The product loops work on raw bits so every dtype vectorises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "dispatch.h"
#include "float_bits.h"
#include "keep_bytes.h"
#include "parallel.h"
#include "philox.h"

namespace electra_fast {
namespace {

// Elements per parallel task: fixed, so results ignore the thread count; its keep bytes (16 KiB) stay in L1.
constexpr int64_t kChunk = 16384;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EF_HAVE_AVX512_PATH 1
#include <immintrin.h>
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* temporaries.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// y = keep ? x * scale : 0 with the product in fp32 (fp64 for double) and one rounding to the dtype. The select is
// an AND with a mask of the value's width (a byte-keyed select of wider values leaves GCC's loop scalar) and works
// on the bits of 16-bit types (float_bits.h), so every dtype's loop vectorises.
template <typename scalar_t>
EF_TARGET_CLONES void scale_kept(const scalar_t* __restrict xs, const uint8_t* __restrict keep,
                                 scalar_t* __restrict ys, int64_t n, float scale) {
  using B = Bits<scalar_t>;
  using raw = typename B::raw;
  const raw* __restrict x = reinterpret_cast<const raw*>(xs);
  raw* __restrict y = reinterpret_cast<raw*>(ys);
  const typename B::acc s = static_cast<typename B::acc>(scale);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const raw mask = static_cast<raw>(raw{0} - static_cast<raw>(keep[i]));  // all ones where kept
    y[i] = B::store(B::load(x[i]) * s) & mask;
  }
}

// fp16: GCC leaves _Float16 / c10::Half conversions scalar, so the AVX-512 path converts 16 at a time with
// vcvtph2ps / vcvtps2ph (round to nearest even, as c10::Half); other CPUs take c10::Half's conversions.
void scale_kept_half_portable(const at::Half* __restrict x, const uint8_t* __restrict keep, at::Half* __restrict y,
                              int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] = keep[i] ? static_cast<at::Half>(static_cast<float>(x[i]) * scale) : at::Half(0.0f);
  }
}

#ifdef EF_HAVE_AVX512_PATH
__attribute__((target("avx512f"))) void scale_kept_half_avx512(const at::Half* x, const uint8_t* keep, at::Half* y,
                                                               int64_t n, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))), s);
    const __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keep + i)));
    const __m512 kept = _mm512_maskz_mov_ps(_mm512_test_epi32_mask(k, k), v);  // dropped: +0
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm512_cvtps_ph(kept, _MM_FROUND_TO_NEAREST_INT));
  }
  scale_kept_half_portable(x + i, keep + i, y + i, n - i, scale);
}
#endif

template <>
void scale_kept<at::Half>(const at::Half* x, const uint8_t* keep, at::Half* y, int64_t n, float scale) {
#ifdef EF_HAVE_AVX512_PATH
  if (have_avx512()) return scale_kept_half_avx512(x, keep, y, n, scale);
#endif
  scale_kept_half_portable(x, keep, y, n, scale);
}
#ifdef EF_HAVE_AVX512_PATH
#pragma GCC diagnostic pop
#endif

// x * keep * scale for a contiguous floating tensor of any shape; threshold = ceil(p * 2^24), scale = fp32(1/(1-p)).
at::Tensor dropout_apply(const at::Tensor& x_in, int64_t threshold, double scale, int64_t seed, int64_t stream) {
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t{1} << 24), "dropout_apply: threshold must be in [0, 2^24]");
  TORCH_CHECK(stream >= 0 && stream <= 0xFFFFFFFFll, "dropout_apply: stream must be in [0, 2^32)");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint32_t st = static_cast<uint32_t>(stream), thr = static_cast<uint32_t>(threshold);
  const float sc = static_cast<float>(scale);
  EF_DISPATCH_FLOATS(x.scalar_type(), "dropout_apply", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t n_chunks = (n + kChunk - 1) / kChunk;
    electra_fast::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      // The whole chunk's keep bytes first, then its products: reading bytes right after the wide stores that
      // wrote them stalls on store forwarding (2-4x slower for fp64 at 1 Ki-element blocks).
      alignas(64) uint8_t keep[kChunk];
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c * kChunk, len = std::min(kChunk, n - b);  // b is a multiple of 4: no group straddles
        keep_bytes(key, kDropout, st, static_cast<uint64_t>(b / 4), (len + 3) / 4, thr, keep);
        scale_kept<scalar_t>(xp + b, keep, yp + b, len, sc);
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  m.def("dropout_apply(Tensor x, int threshold, float scale, int seed, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(electra_fast_cpp, CPU, m) { m.impl("dropout_apply", &dropout_apply); }

}  // namespace electra_fast
