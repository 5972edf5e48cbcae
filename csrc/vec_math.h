// Branch-free float math that GCC auto-vectorises inside `#pragma omp simd` loops (libm's expf/log1pf
// are opaque calls that keep a loop scalar). Cephes polynomials, ~1-2 ulp over the ranges used here.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace electra_fast {

static inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

static inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x) for x <= 0 (what softplus and sigmoid need here); x < -87 returns ~0.
static inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  // Round to nearest with the 1.5 * 2^23 trick: no compare and no libm call, so it vectorises on every
  // x86 level (a floor-and-correct sequence made GCC give up with "control flow in loop" under AVX2).
  // Needs IEEE semantics: never build this with -ffast-math / -fassociative-math.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return y * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// log(u) for u in [1, 2] (Cephes logf after its range reduction).
static inline float log_1_2(float u) {
  // u = m * 2^e with m in [sqrt(1/2), sqrt(2)): e is 0, or 1 for u >= sqrt(2).
  const bool big = u >= 1.41421356237f;
  const float e = big ? 1.0f : 0.0f;
  const float m = (big ? u * 0.5f : u) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  return m + y + e * 0.693359375f;
}

// log1p(t) for t in [0, 1] as 2 atanh(s), s = t / (2 + t) in [0, 1/3]: an odd series in s up to s^13
// (truncation < 1e-8 relative). No range reduction and no select, about half the cost of Cephes' log
// in the RTD loss loop; <= 3 ulp for normal t (a denormal t loses bits in t / 2, harmless here: it is
// the size of the result).
static inline float log1p_01(float t) {
  const float s = t / (2.0f + t);
  const float z = s * s;
  float p = 1.0f / 13;
  p = p * z + 1.0f / 11;
  p = p * z + 1.0f / 9;
  p = p * z + 1.0f / 7;
  p = p * z + 1.0f / 5;
  p = p * z + 1.0f / 3;
  const float s2 = 2.0f * s;
  return s2 + s2 * (p * z);
}

// fp64 callers (gradcheck paths) get libm: exact enough and rare enough not to need SIMD.
static inline double exp_nonpos(double x) { return std::exp(x); }
static inline double log1p_01(double t) { return std::log1p(t); }

}  // namespace electra_fast
