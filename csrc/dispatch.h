// Shared dtype dispatch for the CPU kernels: ids are int32/int64, floats fp32/fp64/fp16/bf16.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#define EF_DISPATCH_IDS(TYPE, NAME, ...)                                              \
  [&] {                                                                              \
    if ((TYPE) == at::kInt) {                                                        \
      using id_t = int32_t;                                                          \
      return __VA_ARGS__();                                                          \
    }                                                                                \
    TORCH_CHECK((TYPE) == at::kLong, NAME, ": ids must be int32 or int64, got ", TYPE); \
    using id_t = int64_t;                                                            \
    return __VA_ARGS__();                                                            \
  }()

#define EF_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

#define EF_BOOL_DISPATCH(COND, NAME, ...) \
  [&] {                                   \
    if (COND) {                           \
      constexpr bool NAME = true;         \
      return __VA_ARGS__();               \
    }                                     \
    constexpr bool NAME = false;          \
    return __VA_ARGS__();                 \
  }()

// Optional mask of uint8 / int32 / int64 as `mask_t` (void when absent).
#define EF_DISPATCH_MASK(HAS_MASK, TYPE, ...)                  \
  [&] {                                                        \
    if (!(HAS_MASK)) {                                         \
      using mask_t = void;                                     \
      return __VA_ARGS__();                                    \
    }                                                          \
    if ((TYPE) == at::kLong) {                                 \
      using mask_t = int64_t;                                  \
      return __VA_ARGS__();                                    \
    }                                                          \
    if ((TYPE) == at::kInt) {                                  \
      using mask_t = int32_t;                                  \
      return __VA_ARGS__();                                    \
    }                                                          \
    using mask_t = uint8_t;                                    \
    return __VA_ARGS__();                                      \
  }()
