// Storage bits <-> accumulation value of the floating dtypes, written so GCC vectorises the loops that use them:
// bf16 widens by a shift and rounds to nearest even exactly as c10::BFloat16 (NaN -> 0x7FC0). Shared by the
// dropout and dropout + add + LayerNorm kernels.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace electra_fast {

template <typename T>
struct Bits;
template <>
struct Bits<float> {
  using raw = uint32_t;
  using acc = float;
  static acc load(raw r) { return __builtin_bit_cast(float, r); }
  static raw store(acc v) { return __builtin_bit_cast(raw, v); }
};
template <>
struct Bits<double> {
  using raw = uint64_t;
  using acc = double;
  static acc load(raw r) { return __builtin_bit_cast(double, r); }
  static raw store(acc v) { return __builtin_bit_cast(raw, v); }
};
template <>
struct Bits<at::BFloat16> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw r) { return __builtin_bit_cast(float, static_cast<uint32_t>(r) << 16); }
  static raw store(acc v) {
    const uint32_t u = __builtin_bit_cast(uint32_t, v);
    return v != v ? raw{0x7FC0} : static_cast<raw>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
};
template <>
struct Bits<at::Half> {  // c10::Half's conversions (GCC leaves them scalar)
  using raw = uint16_t;
  using acc = float;
  static acc load(raw r) { return static_cast<float>(c10::Half(r, c10::Half::from_bits())); }
  static raw store(acc v) { return c10::Half(v).x; }
};

}  // namespace electra_fast
