// Discriminator RTD loss on CPU: one fused, vectorised pass forward (loss + metric counts) and one
// backward. Semantics: electra_fast/reference/rtd_loss.py. Reductions are over fixed chunks summed in
// chunk order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "dispatch.h"
#include "vec_math.h"

namespace electra_fast {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int kCounts = 5;  // n_valid, n_replaced, n_pred_replaced, n_true_pos, n_correct

template <typename scalar_t, typename id_t, bool kMask, bool kWrite>
void forward_chunk(const scalar_t* __restrict x, const id_t* __restrict c, const id_t* __restrict o,
                   const uint8_t* __restrict m, float* __restrict loss, int64_t n, double* loss_sum,
                   int64_t* counts) {
  float acc = 0.f;
  int32_t valid_n = 0, rep_n = 0, pred_n = 0, tp_n = 0, ok_n = 0;
#pragma omp simd reduction(+ : acc, valid_n, rep_n, pred_n, tp_n, ok_n)
  for (int64_t i = 0; i < n; ++i) {
    const float xi = static_cast<float>(x[i]);
    const int32_t valid = kMask ? (m[i] != 0) : 1;
    const int32_t y = c[i] != o[i];
    const int32_t pred = xi > 0.f;
    const float l = (xi > 0.f ? xi : 0.f) - (y ? xi : 0.f) + softplus_neg_abs(xi);
    const float lv = valid ? l : 0.f;
    if (kWrite) loss[i] = lv;
    acc += lv;
    valid_n += valid;
    rep_n += valid & y;
    pred_n += valid & pred;
    tp_n += valid & y & pred;
    ok_n += valid & (y == pred);
  }
  *loss_sum = acc;
  counts[0] = valid_n;
  counts[1] = rep_n;
  counts[2] = pred_n;
  counts[3] = tp_n;
  counts[4] = ok_n;
}

template <typename scalar_t, typename id_t, bool kMask, bool kPerToken>
void backward_chunk(const float* __restrict gs, const scalar_t* __restrict x, const id_t* __restrict c,
                    const id_t* __restrict o, const uint8_t* __restrict m, scalar_t* __restrict g, int64_t n) {
  const float g0 = gs[0];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xi = static_cast<float>(x[i]);
    const float y = c[i] != o[i] ? 1.f : 0.f;
    const float scale = kPerToken ? gs[i] : g0;
    const float gi = (sigmoid(xi) - y) * scale;
    g[i] = static_cast<scalar_t>(kMask ? (m[i] ? gi : 0.f) : gi);
  }
}

// reduction: 0 = none ([B, T] fp32 losses, 0 at padding), 1 = sum, 2 = mean. Returns (loss, counts int64[5]).
std::tuple<at::Tensor, at::Tensor> rtd_loss_fwd(const at::Tensor& logits, const at::Tensor& corrupted,
                                                const at::Tensor& original, const c10::optional<at::Tensor>& mask,
                                                int64_t reduction) {
  TORCH_CHECK(logits.is_contiguous() && corrupted.is_contiguous() && original.is_contiguous(),
              "rtd_loss_fwd: inputs must be contiguous");
  TORCH_CHECK(corrupted.scalar_type() == original.scalar_type(), "rtd_loss_fwd: id dtypes differ");
  const int64_t n = logits.numel();
  const bool has_mask = mask.has_value();
  const uint8_t* m = has_mask ? mask->data_ptr<uint8_t>() : nullptr;
  at::Tensor loss = reduction == 0 ? at::empty(logits.sizes(), logits.options().dtype(at::kFloat))
                                   : at::empty({}, logits.options().dtype(at::kFloat));
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> sums(n_chunks, 0.0);
  std::vector<int64_t> counts(n_chunks * kCounts, 0);
  EF_DISPATCH_FLOATS(logits.scalar_type(), "rtd_loss_fwd", [&] {
    EF_DISPATCH_IDS(corrupted.scalar_type(), "rtd_loss_fwd", [&] {
      EF_BOOL_DISPATCH(has_mask, kMask, [&] {
        EF_BOOL_DISPATCH(reduction == 0, kWrite, [&] {
          const scalar_t* x = logits.data_ptr<scalar_t>();
          const id_t* c = corrupted.data_ptr<id_t>();
          const id_t* o = original.data_ptr<id_t>();
          float* out = kWrite ? loss.data_ptr<float>() : nullptr;
          at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
            for (int64_t k = begin; k < end; ++k) {
              const int64_t s = k * kChunk, len = std::min(kChunk, n - s);
              forward_chunk<scalar_t, id_t, kMask, kWrite>(x + s, c + s, o + s, kMask ? m + s : nullptr,
                                                           kWrite ? out + s : nullptr, len, &sums[k],
                                                           &counts[k * kCounts]);
            }
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
  if (reduction == 2) loss.fill_(total / static_cast<double>(std::max<int64_t>(t[0], 1)));
  return {loss, totals};
}

// grad_scale: fp32, one element (sum / mean: already divided by the token count) or one per token.
at::Tensor rtd_loss_bwd(const at::Tensor& grad_scale, const at::Tensor& logits, const at::Tensor& corrupted,
                        const at::Tensor& original, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(grad_scale.scalar_type() == at::kFloat && grad_scale.is_contiguous(),
              "rtd_loss_bwd: grad_scale must be contiguous fp32");
  const int64_t n = logits.numel();
  const bool per_token = grad_scale.numel() != 1;
  TORCH_CHECK(!per_token || grad_scale.numel() == n, "rtd_loss_bwd: grad_scale has the wrong size");
  at::Tensor grad = at::empty_like(logits);
  const bool has_mask = mask.has_value();
  const uint8_t* m = has_mask ? mask->data_ptr<uint8_t>() : nullptr;
  const float* gs = grad_scale.data_ptr<float>();
  EF_DISPATCH_FLOATS(logits.scalar_type(), "rtd_loss_bwd", [&] {
    EF_DISPATCH_IDS(corrupted.scalar_type(), "rtd_loss_bwd", [&] {
      EF_BOOL_DISPATCH(has_mask, kMask, [&] {
        EF_BOOL_DISPATCH(per_token, kPerToken, [&] {
          const scalar_t* x = logits.data_ptr<scalar_t>();
          const id_t* c = corrupted.data_ptr<id_t>();
          const id_t* o = original.data_ptr<id_t>();
          scalar_t* g = grad.data_ptr<scalar_t>();
          at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
            backward_chunk<scalar_t, id_t, kMask, kPerToken>(kPerToken ? gs + begin : gs, x + begin, c + begin,
                                                            o + begin, kMask ? m + begin : nullptr, g + begin,
                                                            end - begin);
          });
        });
      });
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  m.def("rtd_loss_fwd(Tensor logits, Tensor corrupted, Tensor original, Tensor? mask, int reduction) -> (Tensor, Tensor)");
  m.def("rtd_loss_bwd(Tensor grad_scale, Tensor logits, Tensor corrupted, Tensor original, Tensor? mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(electra_fast_cpp, CPU, m) {
  m.impl("rtd_loss_fwd", &rtd_loss_fwd);
  m.impl("rtd_loss_bwd", &rtd_loss_bwd);
}

}  // namespace electra_fast
