// Out-of-line parts of brgemm.h.
#include "brgemm.h"

#include <torch/library.h>

#include <cstdlib>

namespace electra_fast {
namespace brg {

#ifdef EF_HAVE_BRGEMM
namespace {
constexpr int64_t kChunk = 512;

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

void pack_cols(const bf16* __restrict src, int64_t lds, int64_t N, int64_t K, uint16_t* __restrict dst, int64_t ld) {
  for (int64_t n0 = 0; n0 < N; n0 += kTR) {
    const int64_t nb = std::min(kTR, N - n0);
    for (int64_t k = 0; k < K; k += 2) {
      uint32_t* d = reinterpret_cast<uint32_t*>(dst + k * ld) + n0;
      for (int64_t n = 0; n < nb; ++n) std::memcpy(d + n, src + (n0 + n) * lds + k, 4);
    }
  }
}

void transpose(const bf16* __restrict src, int64_t lds, int64_t N, int64_t K, uint16_t* __restrict dst, int64_t ld) {
  for (int64_t n0 = 0; n0 < N; n0 += kTR) {
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
#else
bool native() { return false; }
#endif

bool enabled() {
  if (!native()) return false;
  const char* off = std::getenv("ELECTRA_FAST_NO_AMX");
  return off == nullptr || *off == '\0' || (off[0] == '0' && off[1] == '\0');
}

}  // namespace brg

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  // Whether bf16 inputs run their products on brgemm (AMX / AVX512-BF16) here (ELECTRA_FAST_NO_AMX=1 turns it
  // off): bf16 disentangled attention and the bf16 fused MLM loss + sampling.
  m.def("bf16_brgemm_available() -> bool", []() { return brg::native(); });
}

}  // namespace electra_fast
