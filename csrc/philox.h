// Philox4x32-10: the random stream shared by every backend (see electra_fast/reference/philox.py
// for the key / counter layout, the purposes and the uint32 -> float conversions).
#pragma once
#include <cstdint>

// Loops that run Philox over a row are compiled for AVX-512 / AVX2 / baseline (the 32x32->64 multiplies
// vectorise far better at the wider levels) and dispatched at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EF_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EF_TARGET_CLONES
#endif

namespace electra_fast {

enum PhiloxPurpose : uint32_t { kMasking = 1, kGumbel = 2, kAttnDropout = 3, kDropout = 4 };

struct Philox4 {
  uint32_t x[4];
};

// ``stream``: the counter's fourth word (0 for every purpose but kDropout, which keys its dropout site).
static inline Philox4 philox4x32_10(uint64_t seed, uint64_t index, uint32_t purpose, uint32_t stream = 0) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32);
  uint32_t c2 = purpose, c3 = stream;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// [0, 1), exactly (x >> 8) * 2^-24
static inline float philox_uniform(uint32_t x) { return static_cast<float>(x >> 8) * 5.9604644775390625e-08f; }
// (0, 1), exactly ((x >> 9) + 0.5) * 2^-23
static inline float philox_uniform_open(uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// 16 Philox calls per 512-bit vector (u32 lanes), for AVX-512 CPUs. Callers either compile for AVX-512 or
// dispatch at run time (the functions carry target("avx512f"), so they build on any x86 level).
#define EF_HAVE_PHILOX_X16 1
}  // namespace electra_fast
#include <immintrin.h>
namespace electra_fast {
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* temporaries.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// (hi32, lo32) of the 32x32->64 products of each u32 lane of a with m (m: the same constant in every lane).
// vpmuludq multiplies the even lanes; a dword shuffle (CDAB: swap the halves of each 64-bit lane) feeds it the
// odd ones and moves the halves back into place. Shuffles and blends run beside the multiplies (the multiplies'
// port is the bottleneck; vpmulld for lo would take two more of its slots).
__attribute__((target("avx512f"))) static inline void philox_mulhilo32_x16(__m512i a, __m512i m, __m512i& hi,
                                                                           __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_CDAB), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_shuffle_epi32(even, _MM_PERM_CDAB), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_shuffle_epi32(odd, _MM_PERM_CDAB));
}

// Counter words (c0, c1) of the 16 consecutive indices base .. base + 15 (a wrapped low word carries).
__attribute__((target("avx512f"))) static inline void philox_index_x16(uint64_t base, __m512i& c0, __m512i& c1) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
  c0 = _mm512_add_epi32(lo, lane);
  const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, lo);
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
  c1 = _mm512_mask_add_epi32(hi, carry, hi, _mm512_set1_epi32(1));
}

// The ten rounds of philox4x32_10 on U independent vectors of 16 counters, in place (c -> x). A round is a
// chain of dependent multiplies: interleaving U vectors hides their latency.
template <int U>
__attribute__((target("avx512f"))) static inline void philox_rounds_x16(__m512i (&c0)[U], __m512i (&c1)[U],
                                                                        __m512i (&c2)[U], __m512i (&c3)[U],
                                                                        uint64_t seed) {
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const __m512i vk0 = _mm512_set1_epi32(static_cast<int>(k0)), vk1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int u = 0; u < U; ++u) {
      __m512i hb, lb, ha, la;
      philox_mulhilo32_x16(c2[u], mb, hb, lb);
      philox_mulhilo32_x16(c0[u], ma, ha, la);
      c0[u] = _mm512_ternarylogic_epi32(hb, c1[u], vk0, 0x96);  // hi ^ c ^ k in one vpternlogd (three-way xor)
      c2[u] = _mm512_ternarylogic_epi32(ha, c3[u], vk1, 0x96);
      c1[u] = lb;
      c3[u] = la;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Stores the four words of 16 calls in element order: words[4 * j + k] = word k of call j (stream 0).
__attribute__((target("avx512f"))) static inline void philox_store_words_x16(__m512i x0, __m512i x1, __m512i x2,
                                                                             __m512i x3, uint32_t* __restrict out) {
  // per 128-bit lane i: t = (x0, x1) / (x2, x3) pairs of calls 4i, 4i + 1 (lo) and 4i + 2, 4i + 3 (hi)
  const __m512i t0 = _mm512_unpacklo_epi32(x0, x1), t1 = _mm512_unpackhi_epi32(x0, x1);
  const __m512i t2 = _mm512_unpacklo_epi32(x2, x3), t3 = _mm512_unpackhi_epi32(x2, x3);
  // u_m: lane i holds the four words of call 4i + m
  const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
  const __m512i a01 = _mm512_shuffle_i32x4(u0, u1, 0x88), a23 = _mm512_shuffle_i32x4(u2, u3, 0x88);  // 0 8 1 9 | 2 10 3 11
  const __m512i b01 = _mm512_shuffle_i32x4(u0, u1, 0xDD), b23 = _mm512_shuffle_i32x4(u2, u3, 0xDD);  // 4 12 5 13 | 6 14 7 15
  _mm512_storeu_si512(out, _mm512_shuffle_i32x4(a01, a23, 0x88));       // calls 0 1 2 3
  _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(b01, b23, 0x88));  // 4 5 6 7
  _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(a01, a23, 0xDD));  // 8 9 10 11
  _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(b01, b23, 0xDD));  // 12 13 14 15
}

// words[4 * j + k] = philox4x32_10(seed, call0 + j, purpose).x[k] for j < n_calls (a multiple of 16): the
// element-order words of the purposes whose call serves four elements, bit-identical to the scalar Philox.
__attribute__((target("avx512f"))) static inline void philox_words_x16(uint64_t seed, uint64_t call0, int64_t n_calls,
                                                                       uint32_t purpose, uint32_t* __restrict words) {
  constexpr int kU = 4;
  int64_t g = 0;
  for (; g + 16 * kU <= n_calls; g += 16 * kU) {
    __m512i c0[kU], c1[kU], c2[kU], c3[kU];
    for (int u = 0; u < kU; ++u) {
      philox_index_x16(call0 + static_cast<uint64_t>(g + 16 * u), c0[u], c1[u]);
      c2[u] = _mm512_set1_epi32(static_cast<int>(purpose));
      c3[u] = _mm512_setzero_si512();
    }
    philox_rounds_x16<kU>(c0, c1, c2, c3, seed);
    for (int u = 0; u < kU; ++u) philox_store_words_x16(c0[u], c1[u], c2[u], c3[u], words + 4 * (g + 16 * u));
  }
  for (; g < n_calls; g += 16) {
    __m512i c0[1], c1[1], c2[1], c3[1];
    philox_index_x16(call0 + static_cast<uint64_t>(g), c0[0], c1[0]);
    c2[0] = _mm512_set1_epi32(static_cast<int>(purpose));
    c3[0] = _mm512_setzero_si512();
    philox_rounds_x16<1>(c0, c1, c2, c3, seed);
    philox_store_words_x16(c0[0], c1[0], c2[0], c3[0], words + 4 * g);
  }
}
#pragma GCC diagnostic pop
#endif

}  // namespace electra_fast
