// The Linear / GELU-MLP column's C++ kernels (electra_fast.linear, electra_fast.gelu_mlp; semantics:
// electra_fast/reference/linear.py). Under CPU bf16 the products run on oneDNN's matmul with the bias added in its
// epilogue (mkldnn::_linear_pointwise, the kernel inductor emits for CPU linears) instead of addmm's pre-filled
// output, and the MLP keeps gelu'(z) from one pass (gelu_and_grad) so that its backward's dz = (dY W2) * gelu'(z)
// is the epilogue of the dY W2 product (oneDNN's binary-mul post-op), no separate gelu_backward pass over
// [N, intermediate]. The caller says whether oneDNN may serve (``onednn``: a CPU whose oneDNN has native bf16
// GEMMs, asked once by electra_fast._cpu); otherwise, and for other dtypes, ATen's linear / mm.
//
// gelu_and_grad: erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, far below a bf16 ulp), whose exp(-z^2 / 2) is
// also the normal density in gelu'; fp32 arithmetic, one rounding of each output to its dtype. Fixed chunks: results
// do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "float_bits.h"
#include "parallel.h"
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
    electra_fast::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c * kChunk;
        gelu_and_grad_chunk<scalar_t>(zp + b, yp + b, sp + b, std::min(kChunk, n - b));
      }
    });
  });
  return {y, s};
}

// oneDNN's matmul with the bias in its epilogue (boxed: the mkldnn namespace's C++ signature is not public API)
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, w, b ? c10::IValue(*b) : c10::IValue(), std::string("none"),
                                 c10::List<std::optional<at::Scalar>>(), std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// (x w^T) * other, the product and the multiply in one oneDNN call (binary post-op)
at::Tensor onednn_linear_mul(const at::Tensor& x, const at::Tensor& other, const at::Tensor& w) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "binary");
  std::vector<c10::IValue> stack{x, other, w, c10::IValue(), std::string("mul")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// x [N, in], w [out, in], b [out] or None -> [N, out]
at::Tensor linear_epilogue(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                           bool onednn) {
  if (onednn && x.scalar_type() == at::kBFloat16) return onednn_linear(x, w, b);
  return at::linear(x, w, b);
}

// (gelu(z), gelu'(z)). bf16 with oneDNN: the fused pass. Otherwise the reference's values (ATen's gelu, the
// derivative in fp32 rounded once): every product but oneDNN's bf16 ones is ATen's, and so is every value.
std::tuple<at::Tensor, at::Tensor> gelu_pair(const at::Tensor& z, bool onednn) {
  if (onednn && z.scalar_type() == at::kBFloat16) return gelu_and_grad(z);
  const at::Tensor zf = z.scalar_type() == at::kDouble ? z : z.to(at::kFloat);
  const at::Tensor cdf = 0.5 * (1.0 + at::erf(zf * M_SQRT1_2));
  const at::Tensor s = cdf + zf * at::exp(-0.5 * zf * zf) * (0.5 * M_2_SQRTPI * M_SQRT1_2);
  return {at::gelu(z), s.to(z.scalar_type())};
}

// x [N, in] -> (y [N, out2], a = gelu(z) [N, out1], s = gelu'(z) [N, out1]), z = x w1^T + b1
std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_mlp_fwd(const at::Tensor& x, const at::Tensor& w1,
                                                            const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                            const std::optional<at::Tensor>& b2, bool onednn) {
  at::Tensor a, s;
  std::tie(a, s) = gelu_pair(linear_epilogue(x, w1, b1, onednn), onednn);  // z itself is dropped
  at::Tensor y = linear_epilogue(a, w2, b2, onednn);
  return {y, a, s};
}

// (dx, dw1, db1, dw2, db2); a bias gradient is empty when that bias is absent
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_mlp_bwd(
    const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& a, const at::Tensor& s,
    const at::Tensor& w2, bool has_b1, bool has_b2, bool onednn) {
  const at::Tensor g = grad_in.contiguous();
  at::Tensor dw2 = g.t().mm(a);
  at::Tensor db2 = has_b2 ? g.sum(0) : g.new_empty({0});
  at::Tensor dz = (onednn && g.scalar_type() == at::kBFloat16) ? onednn_linear_mul(g, s, w2.t().contiguous())
                                                                : g.mm(w2) * s;
  at::Tensor dx = dz.mm(w1);
  at::Tensor dw1 = dz.t().mm(x);
  at::Tensor db1 = has_b1 ? dz.sum(0) : dz.new_empty({0});
  return {dx, dw1, db1, dw2, db2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  m.def("gelu_and_grad(Tensor z) -> (Tensor, Tensor)");
  m.def("linear_epilogue(Tensor x, Tensor w, Tensor? b, bool onednn) -> Tensor");
  m.def("gelu_mlp_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, bool onednn) -> (Tensor, Tensor, Tensor)");
  m.def("gelu_mlp_bwd(Tensor grad, Tensor x, Tensor w1, Tensor a, Tensor s, Tensor w2, bool has_b1, bool has_b2, "
        "bool onednn) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(electra_fast_cpp, CPU, m) {
  m.impl("gelu_and_grad", &gelu_and_grad);
  m.impl("linear_epilogue", &linear_epilogue);
  m.impl("gelu_mlp_fwd", &gelu_mlp_fwd);
  m.impl("gelu_mlp_bwd", &gelu_mlp_bwd);
}

}  // namespace electra_fast
