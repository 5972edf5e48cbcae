// at::parallel_for that carries the caller's inference mode into its worker threads.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <cstdint>
#include <optional>

namespace electra_fast {

// at::parallel_for's worker threads keep their own thread-local state, outside inference mode whatever the caller's
// is. A chunk that calls ATen on a tensor the caller allocated under torch.inference_mode() (an inference tensor:
// an output, a view of one) then fails with "Inplace update to inference tensor outside InferenceMode" as soon as
// a second thread runs a chunk. Only inference mode is carried: autocast and grad mode stay the workers' own, as
// the kernels' numerics were measured.
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    std::optional<c10::InferenceMode> guard;
    if (inference) guard.emplace();
    f(b, e);
  });
}

}  // namespace electra_fast
