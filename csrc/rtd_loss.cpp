// Discriminator RTD loss on CPU: one fused, vectorised pass computes the loss, the metric counts and
// (when a gradient is needed) d loss_token / d logit, so the backward is a single scale. Semantics:
// electra_fast/reference/rtd_loss.py. Reductions run over fixed chunks summed in chunk order, so results
// do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "parallel.h"
#include "vec_math.h"

namespace electra_fast {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int kCounts = 5;  // n_valid, n_replaced, n_pred_replaced, n_true_pos, n_correct

// c != o. Baseline x86-64 (SSE2) has no 64-bit vector compare, which would keep the whole loop scalar, so
// there int64 ids are compared as 32-bit halves; SSE4.1 and later compare them directly (fewer shuffles).
template <typename id_t>
inline int32_t differs(const id_t* __restrict c, const id_t* __restrict o, int64_t i) {
#if defined(__x86_64__) && !defined(__SSE4_1__)
  constexpr bool kSplit = sizeof(id_t) == 8;
#else
  constexpr bool kSplit = false;
#endif
  if constexpr (kSplit) {
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

// 512-bit vectors where the CPU has them: this loop is compute-bound (exp, log, a division per token) and
// ~25% faster at AVX-512 width than at GCC's default 256 bits. A no-op on CPUs without AVX-512.
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")
// mask_t: uint8_t (bool / uint8 masks), int32_t or int64_t (transformers' attention masks, read as they are
// rather than converted in a separate pass); void = no mask.
// kMetrics = false counts real tokens only (counts[1:] stay 0): training without return_metrics, where the
// four metric counters are ~15% of the loop.
template <typename scalar_t, typename id_t, typename mask_t, bool kWrite, bool kGrad, bool kMetrics>
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
    // softplus(y ? -x : x): selects, not products with the label or the mask, so an infinite logit has the
    // limit as its loss (0 or +inf, never inf - inf) and a padded token 0 whatever its logit (the reference's rule)
    const acc_t lv = valid ? std::max(y ? -xi : xi, acc_t(0)) + log1p_01(e) : acc_t(0);
    if (kWrite) loss[i] = lv;
    if (kGrad) {
      const acc_t inv = acc_t(1) / (acc_t(1) + e);  // sigmoid(|x|)
      // sigmoid(x) - y without cancellation: +sigmoid(x) for y = 0, -sigmoid(-x) for y = 1, where
      // sigmoid(|x|) = inv and sigmoid(-|x|) = e * inv.
      const bool big = (xi >= 0) != (y != 0);
      grad[i] = valid ? (big ? inv : e * inv) * (acc_t(1) - acc_t(2) * yf) : acc_t(0);
    }
    acc += lv;
    valid_n += valid;
    if (kMetrics) {
      rep_n += valid * y;
      pred_n += valid * pred;
      tp_n += valid * y * pred;
      ok_n += valid * (1 - (y ^ pred));
    }
  }
  *loss_sum = acc;
  counts[0] = valid_n;
  counts[1] = rep_n;
  counts[2] = pred_n;
  counts[3] = tp_n;
  counts[4] = ok_n;
}

#pragma GCC pop_options

// rtd_loss_fwd below; need_metrics = false leaves counts[1:] at 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rtd_loss_impl(const at::Tensor& logits, const at::Tensor& corrupted,
                                                             const at::Tensor& original,
                                                             const c10::optional<at::Tensor>& mask, int64_t reduction,
                                                             bool need_grad, bool need_metrics) {
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
           auto run = [&](auto metrics) {
            constexpr bool kMetrics = decltype(metrics)::value;
            const scalar_t* x = logits.data_ptr<scalar_t>();
            const id_t* c = corrupted.data_ptr<id_t>();
            const id_t* o = original.data_ptr<id_t>();
            using acc_t = acc_type<scalar_t>;
            acc_t* out = kWrite ? loss.data_ptr<acc_t>() : nullptr;
            acc_t* g = kGrad ? grad.data_ptr<acc_t>() : nullptr;
            const mask_t* m = has_mask ? static_cast<const mask_t*>(mask->data_ptr()) : nullptr;
            electra_fast::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
              for (int64_t k = begin; k < end; ++k) {
                const int64_t s = k * kChunk, len = std::min(kChunk, n - s);
                forward_chunk<scalar_t, id_t, mask_t, kWrite, kGrad, kMetrics>(
                    x + s, c + s, o + s, advance(m, s), kWrite ? out + s : nullptr,
                    kGrad ? g + s : nullptr, len, &sums[k], &counts[k * kCounts]);
              }
            });
           };
           if constexpr (kGrad) {  // no-grad calls always count metrics: one variant fewer to compile
             if (!need_metrics) return run(std::false_type{});
           }
           run(std::true_type{});
          });
        });
      });
    });
  });
  double total = 0.0;
  at::Tensor totals = at::empty({kCounts}, logits.options().dtype(at::kLong));  // filled here: no zeros_ op
  int64_t* t = totals.data_ptr<int64_t>();
  std::fill(t, t + kCounts, int64_t(0));
  for (int64_t k = 0; k < n_chunks; ++k) {
    total += sums[k];
    for (int j = 0; j < kCounts; ++j) t[j] += counts[k * kCounts + j];
  }
  const double n_real = static_cast<double>(std::max<int64_t>(t[0], 1));
  auto finish = [&](auto zero) {  // loss and grad are fp32, or fp64 for fp64 logits
    using acc_t = decltype(zero);
    if (reduction != 0) loss.data_ptr<acc_t>()[0] = static_cast<acc_t>(reduction == 2 ? total / n_real : total);
    if (reduction == 2 && need_grad) {
      // dlogits becomes d mean / d logit, so the backward is one scale. Same chunks, same threads as the
      // pass above (static schedule): each thread rescales what it just wrote, still in its cache.
      acc_t* g = grad.data_ptr<acc_t>();
      const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n_real);
      electra_fast::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
        const int64_t lo = begin * kChunk, hi = std::min(end * kChunk, n);
        for (int64_t i = lo; i < hi; ++i) g[i] *= inv_n;
      });
    }
  };
  if (logits.scalar_type() == at::kDouble) {
    finish(0.0);
  } else {
    finish(0.0f);
  }
  return {loss, totals, grad};
}

// reduction: 0 = none ([B, T] fp32 losses, 0 at padding), 1 = sum, 2 = mean.
// Returns (loss, counts int64[5], dlogits fp32 [B, T] = d loss / d logit (per token for "none", divided by the
// real-token count for "mean"), or an empty tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rtd_loss_fwd(const at::Tensor& logits, const at::Tensor& corrupted,
                                                            const at::Tensor& original,
                                                            const c10::optional<at::Tensor>& mask, int64_t reduction,
                                                            bool need_grad) {
  return rtd_loss_impl(logits, corrupted, original, mask, reduction, need_grad, true);
}

// The eager training path as a C++ autograd function: the Python autograd.Function and custom-op layers
// cost as much as the kernel at 256 x 512 tokens. The forward saves d loss / d logit; when the incoming
// gradient is a CPU 1.0 (loss.backward()) and the graph is not kept, the backward hands that buffer over
// as the gradient itself, so AccumulateGrad takes it without a copy.
struct RTDLossFunction : public torch::autograd::Function<RTDLossFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                                                const at::Tensor& corrupted, const at::Tensor& original,
                                                const c10::optional<at::Tensor>& mask, int64_t reduction,
                                                bool need_metrics) {
    auto [loss, counts, grad] = rtd_loss_impl(logits, corrupted, original, mask, reduction, true, need_metrics);
    ctx->saved_data["dlogits"] = grad;
    ctx->saved_data["dtype"] = static_cast<int64_t>(logits.scalar_type());
    ctx->set_materialize_grads(false);  // no zeros for the counts' (absent) gradient
    return {loss, counts};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // the engine runs a backward in grad mode only for create_graph=True: dlogits is a constant to autograd, so
    // a second derivative through it would be silently wrong
    TORCH_CHECK(!torch::autograd::GradMode::is_enabled(),
                "electra_fast::rtd_loss: backward with create_graph=True is not supported: its gradient is not "
                "differentiable, so a second derivative would be wrong; use torch's own operations where "
                "higher-order derivatives are needed");
    auto it = ctx->saved_data.find("dlogits");
    TORCH_CHECK(it != ctx->saved_data.end(),
                "rtd_loss: trying to backward through the graph a second time; pass retain_graph=True the first time");
    at::Tensor dlogits = it->second.toTensor();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    // a kept graph keeps the buffer: handing it over as well would let the next backward's accumulation (or a
    // zero_grad(set_to_none=False)) write into what the graph saved
    const bool kept = torch::autograd::get_current_graph_task_keep_graph();
    if (!kept) ctx->saved_data.erase("dlogits");
    const at::Tensor& g = grads[0];
    at::Tensor out;
    if (!g.defined()) {
      // the loss did not reach the graph's root: no gradient
    } else if (!kept && g.device().is_cpu() && g.numel() == 1 && dlogits.scalar_type() == dtype &&
               g.item<double>() == 1.0) {
      out = std::move(dlogits);
    } else {
      out = (dlogits * g).to(dtype);
    }
    return {out, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> rtd_loss_train(const at::Tensor& logits, const at::Tensor& corrupted,
                                                  const at::Tensor& original, const c10::optional<at::Tensor>& mask,
                                                  int64_t reduction, bool need_metrics) {
  auto out = RTDLossFunction::apply(logits, corrupted, original, mask, reduction, need_metrics);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  m.def("rtd_loss_fwd(Tensor logits, Tensor corrupted, Tensor original, Tensor? mask, int reduction, "
        "bool need_grad) -> (Tensor, Tensor, Tensor)");
  m.def("rtd_loss_train(Tensor logits, Tensor corrupted, Tensor original, Tensor? mask, int reduction, "
        "bool need_metrics) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(electra_fast_cpp, CPU, m) { m.impl("rtd_loss_fwd", &rtd_loss_fwd); }

// Autograd key only: the function above is the autograd formula (its forward calls the kernel directly).
TORCH_LIBRARY_IMPL(electra_fast_cpp, AutogradCPU, m) { m.impl("rtd_loss_train", &rtd_loss_train); }

}  // namespace electra_fast
