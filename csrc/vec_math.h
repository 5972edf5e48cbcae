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

// log(u) for u in [1, 2] (the argument of log1p(t), t in [0, 1]).
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

// log1p(t) for t in [0, 1], accurate for tiny t (Goldberg: log(u) * t / (u - 1), u = 1 + t).
static inline float log1p_01(float t) {
  const float u = 1.0f + t;
  const float d = u - 1.0f;
  return d == 0.0f ? t : log_1_2(u) * (t / d);
}

// fp64 callers (gradcheck paths) get libm: exact enough and rare enough not to need SIMD.
static inline double exp_nonpos(double x) { return std::exp(x); }
static inline double log1p_01(double t) { return std::log1p(t); }

// log(1 + exp(-|x|)): the stable tail of softplus / BCE-with-logits.
static inline float softplus_neg_abs(float x) { return log1p_01(exp_nonpos(-(x < 0 ? -x : x))); }

static inline float sigmoid(float x) {
  const float e = exp_nonpos(-(x < 0 ? -x : x));
  const float s = 1.0f / (1.0f + e);
  return x >= 0 ? s : e * s;
}

}  // namespace electra_fast
