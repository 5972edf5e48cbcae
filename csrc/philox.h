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

}  // namespace electra_fast
