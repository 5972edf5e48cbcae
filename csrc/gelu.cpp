// GELU (erf form) and its derivative in one pass, for electra_fast.nn.linear's fused MLP under CPU bf16 autocast:
// the forward keeps gelu'(z) instead of z, and the backward's dz = (dY W2) * gelu'(z) then runs as the epilogue
// of the dY W2 product (no separate gelu_backward pass over [N, intermediate]).
//
// erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, far below a bf16 ulp), whose exp(-z^2 / 2) is also the
// normal density in gelu'; fp32 arithmetic, one rounding of each output to its dtype. Fixed chunks: results do not
// depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "float_bits.h"
#include "vec_math.h"

namespace electra_fast {
namespace {

constexpr int64_t kChunk = 16384;

// y = gelu(z), s = gelu'(z) on fp32 arrays. 512-bit vectors (GCC's default tuning keeps loops at 256 bits; this
// loop is compute-bound).
__attribute__((target("prefer-vector-width=512"))) void gelu_and_grad_f32(const float* __restrict z,
                                                                          float* __restrict y, float* __restrict s,
                                                                          int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = z[i];
    const float a = std::fabs(v) * 0.70710678118654752f;  // |z| / sqrt(2)
    const float t = 1.0f / (1.0f + 0.3275911f * a);
    const float poly =
        t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    const float e = exp_nonpos(-a * a);  // exp(-z^2 / 2)
    const float erf_a = 1.0f - poly * e;
    const float cdf = 0.5f * (1.0f + (v < 0.0f ? -erf_a : erf_a));
    y[i] = v * cdf;
    s[i] = cdf + v * e * 0.39894228040143268f;  // + z * pdf(z)
  }
}

// bf16: through fp32 tiles of kTile elements (the widening and the rounding in their own loops vectorise; mixed
// into the math loop they kept it at 256 bits with scalar pieces)
constexpr int64_t kTile = 1024;

template <typename T>
void gelu_and_grad_chunk(const T* __restrict zs, T* __restrict ys, T* __restrict ss, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    gelu_and_grad_f32(zs, ys, ss, n);
  } else {
    using B = Bits<T>;
    using raw = typename B::raw;
    const raw* z = reinterpret_cast<const raw*>(zs);
    raw* y = reinterpret_cast<raw*>(ys);
    raw* s = reinterpret_cast<raw*>(ss);
    alignas(64) float zf[kTile], yf[kTile], sf[kTile];
    for (int64_t i0 = 0; i0 < n; i0 += kTile) {
      const int64_t m = std::min(kTile, n - i0);
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) zf[i] = B::load(z[i0 + i]);
      gelu_and_grad_f32(zf, yf, sf, m);
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) {
        y[i0 + i] = B::store(yf[i]);
        s[i0 + i] = B::store(sf[i]);
      }
    }
  }
}

// z: contiguous fp32 / bf16 -> (gelu(z), gelu'(z)) in z's dtype.
std::tuple<at::Tensor, at::Tensor> gelu_and_grad(const at::Tensor& z_in) {
  TORCH_CHECK(z_in.scalar_type() == at::kFloat || z_in.scalar_type() == at::kBFloat16,
              "gelu_and_grad: fp32 or bf16 input expected");
  const at::Tensor z = z_in.contiguous();
  at::Tensor y = at::empty_like(z), s = at::empty_like(z);
  const int64_t n = z.numel();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "gelu_and_grad", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t *yp = y.data_ptr<scalar_t>(), *sp = s.data_ptr<scalar_t>();
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c * kChunk;
        gelu_and_grad_chunk<scalar_t>(zp + b, yp + b, sp + b, std::min(kChunk, n - b));
      }
    });
  });
  return {y, s};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) { m.def("gelu_and_grad(Tensor z) -> (Tensor, Tensor)"); }

TORCH_LIBRARY_IMPL(electra_fast_cpp, CPU, m) { m.impl("gelu_and_grad", &gelu_and_grad); }

}  // namespace electra_fast
