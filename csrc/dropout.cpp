// Counter-based dropout on CPU: y = x * keep * scale, the same kernel for the forward (on the input) and the
// backward (on the gradient), the mask regenerated from (seed, stream) each time. Semantics and the random
// stream: electra_fast/reference/dropout.py.
//
// FIXED chunks of kChunk elements run in parallel (a chunk's result depends only on its indices, so the output
// never depends on the thread count). Inside a chunk, blocks of kBlock elements: one vectorised Philox call per
// four elements writes the four words of each group contiguously (word i % 4 of group i // 4 is element i's),
// then a contiguous loop selects x * scale or 0. The Philox loop is compiled for AVX-512 / AVX2 / baseline.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "dispatch.h"
#include "philox.h"

#ifndef EF_TARGET_CLONES
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EF_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EF_TARGET_CLONES
#endif
#endif

namespace electra_fast {
namespace {

constexpr int64_t kBlock = 1024;       // elements per Philox batch (a 4 KiB word buffer, stays in L1)
constexpr int64_t kChunk = 16 * kBlock;  // elements per parallel task: fixed, so results ignore the thread count

// keep[i] = 0xFFFFFFFF if element (group0 * 4 + i) is kept, else 0, for i < 4 * n_groups.
EF_TARGET_CLONES
void keep_words(uint64_t seed, uint32_t stream, uint64_t group0, int64_t n_groups, uint32_t threshold,
                uint32_t* __restrict keep) {
#pragma omp simd
  for (int64_t g = 0; g < n_groups; ++g) {
    const Philox4 r = philox4x32_10(seed, group0 + static_cast<uint64_t>(g), kDropout, stream);
    keep[4 * g + 0] = (r.x[0] >> 8) >= threshold ? 0xFFFFFFFFu : 0u;
    keep[4 * g + 1] = (r.x[1] >> 8) >= threshold ? 0xFFFFFFFFu : 0u;
    keep[4 * g + 2] = (r.x[2] >> 8) >= threshold ? 0xFFFFFFFFu : 0u;
    keep[4 * g + 3] = (r.x[3] >> 8) >= threshold ? 0xFFFFFFFFu : 0u;
  }
}

template <typename scalar_t>
EF_TARGET_CLONES void scale_kept(const scalar_t* __restrict x, const uint32_t* __restrict keep, scalar_t* __restrict y,
                                 int64_t n, float scale) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const acc_t s = static_cast<acc_t>(scale);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]) * s;
    y[i] = static_cast<scalar_t>(keep[i] ? v : acc_t(0));
  }
}

// x * keep * scale for a contiguous floating tensor of any shape; threshold = ceil(p * 2^24), scale = fp32(1/(1-p)).
at::Tensor dropout_apply(const at::Tensor& x_in, int64_t threshold, double scale, int64_t seed, int64_t stream) {
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t{1} << 24), "dropout_apply: threshold must be in [0, 2^24]");
  TORCH_CHECK(stream >= 0 && stream <= 0xFFFFFFFFll, "dropout_apply: stream must be in [0, 2^32)");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint32_t st = static_cast<uint32_t>(stream), thr = static_cast<uint32_t>(threshold);
  const float sc = static_cast<float>(scale);
  EF_DISPATCH_FLOATS(x.scalar_type(), "dropout_apply", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t n_chunks = (n + kChunk - 1) / kChunk;
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      alignas(64) uint32_t keep[kBlock];
      for (int64_t b = c0 * kChunk; b < std::min(n, c1 * kChunk); b += kBlock) {
        const int64_t len = std::min(kBlock, n - b);  // b is a multiple of 4: groups never straddle blocks
        keep_words(key, st, static_cast<uint64_t>(b / 4), (len + 3) / 4, thr, keep);
        scale_kept<scalar_t>(xp + b, keep, yp + b, len, sc);
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  m.def("dropout_apply(Tensor x, int threshold, float scale, int seed, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(electra_fast_cpp, CPU, m) { m.impl("dropout_apply", &dropout_apply); }

}  // namespace electra_fast
