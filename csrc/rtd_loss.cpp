// Discriminator RTD loss on CPU: one fused, vectorised pass computes the loss, the metric counts and
// (when a gradient is needed) d loss_token / d logit, so the backward is a single scale. Semantics:
// electra_fast/reference/rtd_loss.py. Reductions run over fixed chunks summed in chunk order, so results
// do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "vec_math.h"

namespace electra_fast {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int kCounts = 5;  // n_valid, n_replaced, n_pred_replaced, n_true_pos, n_correct

// c != o without a 64-bit vector compare (SSE2 has none, which would keep the whole loop scalar).
template <typename id_t>
inline int32_t differs(const id_t* __restrict c, const id_t* __restrict o, int64_t i) {
  if constexpr (sizeof(id_t) == 8) {
    const uint32_t* c32 = reinterpret_cast<const uint32_t*>(c);
    const uint32_t* o32 = reinterpret_cast<const uint32_t*>(o);
    return ((c32[2 * i] ^ o32[2 * i]) | (c32[2 * i + 1] ^ o32[2 * i + 1])) != 0;
  } else {
    return c[i] != o[i];
  }
}

// fp64 logits compute in fp64 (so fp64 gradcheck is meaningful); every other dtype in fp32.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename T>
inline const T* advance(const T* p, int64_t s) {
  return p + s;
}
inline const void* advance(const void*, int64_t) { return nullptr; }  // no mask

// mask_t: uint8_t (bool / uint8 masks), int32_t or int64_t (transformers' attention masks, read as they are
// rather than converted in a separate pass); void = no mask.
template <typename scalar_t, typename id_t, typename mask_t, bool kWrite, bool kGrad>
void forward_chunk(const scalar_t* __restrict x, const id_t* __restrict c, const id_t* __restrict o,
                   const mask_t* __restrict m, acc_type<scalar_t>* __restrict loss,
                   acc_type<scalar_t>* __restrict grad, int64_t n, double* loss_sum, int64_t* counts) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kMask = !std::is_void_v<mask_t>;
  acc_t acc = 0;
  int32_t valid_n = 0, rep_n = 0, pred_n = 0, tp_n = 0, ok_n = 0;
#pragma omp simd reduction(+ : acc, valid_n, rep_n, pred_n, tp_n, ok_n)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    int32_t valid = 1;
    if constexpr (kMask) valid = static_cast<int32_t>(m[i] != 0);
    const int32_t y = differs(c, o, i);
    const int32_t pred = static_cast<int32_t>(xi > 0);
    const acc_t vf = static_cast<acc_t>(valid), yf = static_cast<acc_t>(y);
    const acc_t e = exp_nonpos(-std::abs(xi));  // shared by softplus and sigmoid
    const acc_t lv = (std::max(xi, acc_t(0)) - xi * yf + log1p_01(e)) * vf;
    if (kWrite) loss[i] = lv;
    if (kGrad) {
      const acc_t inv = acc_t(1) / (acc_t(1) + e);
      grad[i] = ((xi >= 0 ? inv : e * inv) - yf) * vf;
    }
    acc += lv;
    valid_n += valid;
    rep_n += valid * y;
    pred_n += valid * pred;
    tp_n += valid * y * pred;
    ok_n += valid * (1 - (y ^ pred));
  }
  *loss_sum = acc;
  counts[0] = valid_n;
  counts[1] = rep_n;
  counts[2] = pred_n;
  counts[3] = tp_n;
  counts[4] = ok_n;
}

// reduction: 0 = none ([B, T] fp32 losses, 0 at padding), 1 = sum, 2 = mean.
// Returns (loss, counts int64[5], dlogits fp32 [B, T] = d loss / d logit (per token for "none", divided by the
// real-token count for "mean"), or an empty tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rtd_loss_fwd(const at::Tensor& logits, const at::Tensor& corrupted,
                                                            const at::Tensor& original,
                                                            const c10::optional<at::Tensor>& mask, int64_t reduction,
                                                            bool need_grad) {
  TORCH_CHECK(logits.is_contiguous() && corrupted.is_contiguous() && original.is_contiguous(),
              "rtd_loss_fwd: inputs must be contiguous");
  TORCH_CHECK(corrupted.scalar_type() == original.scalar_type(), "rtd_loss_fwd: id dtypes differ");
  const int64_t n = logits.numel();
  const bool has_mask = mask.has_value();
  const at::ScalarType mask_type = has_mask ? mask->scalar_type() : at::kByte;
  TORCH_CHECK(!has_mask || ((mask_type == at::kByte || mask_type == at::kInt || mask_type == at::kLong) &&
                            mask->is_contiguous() && mask->numel() == logits.numel()),
              "rtd_loss_fwd: mask must be contiguous uint8 / int32 / int64 shaped like logits");
  const auto f32 = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor loss = reduction == 0 ? at::empty(logits.sizes(), f32) : at::empty({}, f32);
  at::Tensor grad = need_grad ? at::empty(logits.sizes(), f32) : at::empty({0}, f32);
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> sums(n_chunks, 0.0);
  std::vector<int64_t> counts(n_chunks * kCounts, 0);
  EF_DISPATCH_FLOATS(logits.scalar_type(), "rtd_loss_fwd", [&] {
    EF_DISPATCH_IDS(corrupted.scalar_type(), "rtd_loss_fwd", [&] {
      EF_DISPATCH_MASK(has_mask, mask_type, [&] {
        EF_BOOL_DISPATCH(reduction == 0, kWrite, [&] {
          EF_BOOL_DISPATCH(need_grad, kGrad, [&] {
            const scalar_t* x = logits.data_ptr<scalar_t>();
            const id_t* c = corrupted.data_ptr<id_t>();
            const id_t* o = original.data_ptr<id_t>();
            using acc_t = acc_type<scalar_t>;
            acc_t* out = kWrite ? loss.data_ptr<acc_t>() : nullptr;
            acc_t* g = kGrad ? grad.data_ptr<acc_t>() : nullptr;
            const mask_t* m = has_mask ? static_cast<const mask_t*>(mask->data_ptr()) : nullptr;
            at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
              for (int64_t k = begin; k < end; ++k) {
                const int64_t s = k * kChunk, len = std::min(kChunk, n - s);
                forward_chunk<scalar_t, id_t, mask_t, kWrite, kGrad>(
                    x + s, c + s, o + s, advance(m, s), kWrite ? out + s : nullptr,
                    kGrad ? g + s : nullptr, len, &sums[k], &counts[k * kCounts]);
              }
            });
          });
        });
      });
    });
  });
  double total = 0.0;
  at::Tensor totals = at::zeros({kCounts}, logits.options().dtype(at::kLong));
  int64_t* t = totals.data_ptr<int64_t>();
  for (int64_t k = 0; k < n_chunks; ++k) {
    total += sums[k];
    for (int j = 0; j < kCounts; ++j) t[j] += counts[k * kCounts + j];
  }
  if (reduction == 1) loss.fill_(total);
  if (reduction == 2) {
    const double n = static_cast<double>(std::max<int64_t>(t[0], 1));
    loss.fill_(total / n);
    if (need_grad) grad.div_(n);  // dlogits becomes d mean / d logit: the backward is one scale
  }
  return {loss, totals, grad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  m.def("rtd_loss_fwd(Tensor logits, Tensor corrupted, Tensor original, Tensor? mask, int reduction, "
        "bool need_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(electra_fast_cpp, CPU, m) { m.impl("rtd_loss_fwd", &rtd_loss_fwd); }

}  // namespace electra_fast
