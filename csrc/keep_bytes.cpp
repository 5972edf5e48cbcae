// Keep bytes of counter-based dropout (one Philox call per four elements: word e % 4 of the call at e // 4 is
// element e's), shared by the dropout op and the attention dropout. See electra_fast/reference/philox.py.
#include "keep_bytes.h"
#include "env_switch.h"

#include <cstdint>
#include <cstdlib>

#include "philox.h"

namespace electra_fast {
namespace {

// keep[i] = 1 if element (4 * group0 + i) is kept, else 0, for i < 4 * n_groups: the portable path (GCC
// vectorises the Philox rounds; the stores of the four words interleave).
EF_TARGET_CLONES
void keep_bytes_portable(uint64_t seed, uint32_t purpose, uint32_t stream, uint64_t group0, int64_t n_groups, uint32_t threshold,
                         uint8_t* __restrict keep) {
#pragma omp simd
  for (int64_t g = 0; g < n_groups; ++g) {
    const Philox4 r = philox4x32_10(seed, group0 + static_cast<uint64_t>(g), purpose, stream);
    keep[4 * g + 0] = (r.x[0] >> 8) >= threshold;
    keep[4 * g + 1] = (r.x[1] >> 8) >= threshold;
    keep[4 * g + 2] = (r.x[2] >> 8) >= threshold;
    keep[4 * g + 3] = (r.x[3] >> 8) >= threshold;
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EF_HAVE_AVX512_PATH 1
#include <immintrin.h>
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* temporaries.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// The same bytes as keep_bytes_portable, 16 Philox calls (64 elements) per 512-bit vector (GCC keeps the portable
// loop at 256 bits), kUnroll independent vectors per iteration: a round is a chain of dependent multiplies, and
// interleaving vectors hides their latency. The four words' keep bits are interleaved with pdep (bit 4j + k = word
// k of call j) and expanded to bytes with one vpmovm2b. n_groups: a multiple of 16 * kUnroll.
constexpr int kUnroll = 4;

__attribute__((target("avx512f,avx512bw,bmi2"))) void keep_bytes_avx512(uint64_t seed, uint32_t purpose, uint32_t stream,
                                                                        uint64_t group0, int64_t n_groups,
                                                                        uint32_t threshold, uint8_t* keep) {
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
  for (int64_t g = 0; g < n_groups; g += 16 * kUnroll) {
    __m512i c0[kUnroll], c1[kUnroll], c2[kUnroll], c3[kUnroll];
    for (int u = 0; u < kUnroll; ++u) {
      philox_index_x16(group0 + static_cast<uint64_t>(g + 16 * u), c0[u], c1[u]);
      c2[u] = _mm512_set1_epi32(static_cast<int>(purpose));
      c3[u] = _mm512_set1_epi32(static_cast<int>(stream));
    }
    philox_rounds_x16<kUnroll>(c0, c1, c2, c3, seed);  // csrc/philox.h
    for (int u = 0; u < kUnroll; ++u) {
      const uint64_t m0 = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(c0[u], 8), thr);
      const uint64_t m1 = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(c1[u], 8), thr);
      const uint64_t m2 = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(c2[u], 8), thr);
      const uint64_t m3 = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(c3[u], 8), thr);
      const uint64_t bits = _pdep_u64(m0, 0x1111111111111111ull) | _pdep_u64(m1, 0x2222222222222222ull) |
                            _pdep_u64(m2, 0x4444444444444444ull) | _pdep_u64(m3, 0x8888888888888888ull);
      _mm512_storeu_si512(keep + 4 * (g + 16 * u), _mm512_and_si512(_mm512_movm_epi8(bits), _mm512_set1_epi8(1)));
    }
  }
}

#pragma GCC diagnostic pop
#endif

}  // namespace

bool have_avx512() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("bmi2") && !env_switch("ELECTRA_FAST_NO_AVX512");
  return ok;
#else
  return false;
#endif
}

// keep bytes for elements 4 * group0 .. 4 * (group0 + n_groups) - 1 (keep holds 4 * n_groups rounded up to 256).
void keep_bytes(uint64_t seed, uint32_t purpose, uint32_t stream, uint64_t group0, int64_t n_groups,
                uint32_t threshold, uint8_t* keep) {
#ifdef EF_HAVE_AVX512_PATH
  if (have_avx512()) {
    constexpr int64_t step = 16 * kUnroll;  // the extra calls of a partial last step write bytes past n: unused
    keep_bytes_avx512(seed, purpose, stream, group0, (n_groups + step - 1) / step * step, threshold, keep);
    return;
  }
#endif
  keep_bytes_portable(seed, purpose, stream, group0, n_groups, threshold, keep);
}

}  // namespace electra_fast
