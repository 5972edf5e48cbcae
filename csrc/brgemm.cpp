// Out-of-line parts of brgemm.h.
#include "brgemm.h"
#include "env_switch.h"

#include <torch/library.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <cstdlib>

namespace electra_fast {
namespace brg {

#ifdef EF_HAVE_BRGEMM
// GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized on its own _mm512_undefined_* temporaries.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace {
constexpr int64_t kChunk = 512;

#ifdef __AVX512F__
// dst[c * ldd + r] = src[r * lds + c] for a 16 x 16 tile of 32-bit values (strides in 32-bit units): unpacks of
// 32- and 64-bit pairs within 128-bit lanes, then two rounds of lane shuffles.
void tile16_u32(const uint32_t* src, int64_t lds, uint32_t* dst, int64_t ldd) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * lds);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4g + m], lane l: column 4l + m of rows 4g .. 4g + 3
  for (int g = 0; g < 4; ++g) {
    r[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g + 0], t[4 * g + 2]);
    r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g + 0], t[4 * g + 2]);
    r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512i ve = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x88), vo = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xDD);
    const __m512i we = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x88);
    const __m512i wo = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xDD);
    _mm512_storeu_si512(dst + m * ldd, _mm512_shuffle_i32x4(ve, we, 0x88));         // column m
    _mm512_storeu_si512(dst + (4 + m) * ldd, _mm512_shuffle_i32x4(vo, wo, 0x88));   // column 4 + m
    _mm512_storeu_si512(dst + (8 + m) * ldd, _mm512_shuffle_i32x4(ve, we, 0xDD));   // column 8 + m
    _mm512_storeu_si512(dst + (12 + m) * ldd, _mm512_shuffle_i32x4(vo, wo, 0xDD));  // column 12 + m
  }
}
#endif

// 2 x 2 product with known result: brgemm must run natively with VNNI B here (a fallback would read B plainly).
bool brgemm_bf16_works() {
  try {
    if (!at::native::cpublas::could_pack(at::kBFloat16)) return false;
    const bf16 a[4] = {1, 2, 3, 4};
    const bf16 b[4] = {5, 7, 6, 8};  // B = [[5, 6], [7, 8]] in VNNI-2
    float c[4] = {0, 0, 0, 0};
    at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, true);
    release();
    return c[0] == 19 && c[1] == 22 && c[2] == 43 && c[3] == 50;
  } catch (...) {
    return false;
  }
}
}  // namespace

bool native() {
  static const bool ok = brgemm_bf16_works();
  return ok;
}

void gemm(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B, int64_t ldb, float* C,
          int64_t ldc, bool add) {
  for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
    for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        at::native::cpublas::brgemm(std::min(kChunk, M - m0), std::min(kChunk, N - n0), std::min(kChunk, K - k0),
                                    lda, ldb, ldc, add || k0 > 0, A + m0 * lda + k0, B + k0 * ldb + 2 * n0,
                                    C + m0 * ldc + n0, true);
      }
    }
  }
}

void transpose32(const uint32_t* __restrict src, int64_t lds, int64_t R, int64_t C, uint32_t* __restrict dst,
                 int64_t ldd) {
  int64_t r0 = 0;
#ifdef __AVX512F__
  for (; r0 + 16 <= R; r0 += 16) {
    int64_t c0 = 0;
    for (; c0 + 16 <= C; c0 += 16) tile16_u32(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
    for (int64_t c = c0; c < C; ++c) {
      for (int64_t r = r0; r < r0 + 16; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
  }
#endif
  for (int64_t c0 = 0; c0 < C; c0 += kTR) {  // leftover rows: source rows stay in L1 while columns are read
    const int64_t cb = std::min(kTR, C - c0);
    for (int64_t r = r0; r < R; ++r) {
      for (int64_t c = c0; c < c0 + cb; ++c) dst[c * ldd + r] = src[r * lds + c];
    }
  }
}

void pack_cols(const bf16* __restrict src, int64_t lds, int64_t N, int64_t K, uint16_t* __restrict dst, int64_t ld) {
  if (lds % 2 == 0) {  // the VNNI pairs are 32-bit units of the source rows: a 32-bit transpose
    transpose32(reinterpret_cast<const uint32_t*>(src), lds / 2, N, K / 2, reinterpret_cast<uint32_t*>(dst), ld);
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += kTR) {
    const int64_t nb = std::min(kTR, N - n0);
    for (int64_t k = 0; k < K; k += 2) {
      uint32_t* d = reinterpret_cast<uint32_t*>(dst + k * ld) + n0;
      for (int64_t n = 0; n < nb; ++n) std::memcpy(d + n, src + (n0 + n) * lds + k, 4);
    }
  }
}

void transpose(const bf16* __restrict src, int64_t lds, int64_t N, int64_t K, uint16_t* __restrict dst, int64_t ld) {
  int64_t n_done = 0;
#ifdef __AVX512F__
  if (lds % 2 == 0 && K % 2 == 0) {
    // 16 rows x 16 column pairs at a time: a 32-bit transpose, then each pair row splits into its low halves (even
    // columns k) and high halves (odd k) with vpmovdw
    alignas(64) uint32_t tile[16 * 16];
    const uint32_t* s32 = reinterpret_cast<const uint32_t*>(src);
    for (; n_done + 16 <= N; n_done += 16) {
      for (int64_t m0 = 0; m0 < K / 2; m0 += 16) {
        const int64_t mb = std::min<int64_t>(16, K / 2 - m0);
        if (mb == 16) {
          tile16_u32(s32 + n_done * (lds / 2) + m0, lds / 2, tile, 16);
        } else {
          for (int64_t m = 0; m < mb; ++m) {
            for (int64_t n = 0; n < 16; ++n) tile[m * 16 + n] = s32[(n_done + n) * (lds / 2) + m0 + m];
          }
        }
        for (int64_t m = 0; m < mb; ++m) {
          const __m512i row = _mm512_load_si512(tile + m * 16);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (2 * (m0 + m)) * ld + n_done), _mm512_cvtepi32_epi16(row));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (2 * (m0 + m) + 1) * ld + n_done),
                              _mm512_cvtepi32_epi16(_mm512_srli_epi32(row, 16)));
        }
      }
    }
  }
#endif
  for (int64_t n0 = n_done; n0 < N; n0 += kTR) {
    const int64_t nb = std::min(kTR, N - n0);
    for (int64_t k = 0; k < K; ++k) {
      uint16_t* d = dst + k * ld + n0;
      for (int64_t n = 0; n < nb; ++n) d[n] = src[(n0 + n) * lds + k].x;
    }
  }
  for (int64_t k = 0; k < K; ++k) std::fill(dst + k * ld + N, dst + (k + 1) * ld, uint16_t(0));
}

void to_rows(const float* __restrict src, int64_t lds, int64_t R, int64_t C, uint16_t* __restrict dst, int64_t ld) {
  for (int64_t r = 0; r < R; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dst[r * ld + c] = bf16_bits(src[r * lds + c]);
  }
}
#pragma GCC diagnostic pop
#else
bool native() { return false; }
#endif

bool enabled() { return native() && !env_switch("ELECTRA_FAST_NO_AMX"); }

}  // namespace brg

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  // Whether bf16 inputs run their products on brgemm here (where torch's brgemm packs bf16: AMX; not an
  // AVX512-BF16 CPU without AMX; ELECTRA_FAST_NO_AMX=1 turns it off): bf16 disentangled attention and the bf16
  // fused MLM loss + sampling.
  m.def("bf16_brgemm_available() -> bool", []() { return brg::native(); });
}

}  // namespace electra_fast
