// Keep bytes of counter-based dropout, shared by csrc/dropout.cpp and csrc/disentangled_attention.cpp.
#pragma once
#include <cstdint>

namespace electra_fast {

// keep[i] = 1 iff element e = 4 * group0 + i is kept: (word e % 4 of philox4x32_10(seed, e // 4, purpose, stream)
// >> 8) >= threshold, i.e. uniform >= p for threshold = ceil(p * 2^24). Writes 4 * n_groups bytes rounded up to a
// multiple of 256 (keep must have that room). AVX-512 intrinsics where the CPU has them
// (ELECTRA_FAST_NO_AVX512=1: the portable loop), bit-identical either way.
// Whether the AVX-512 paths run (the CPU has AVX-512F/BW and BMI2); ELECTRA_FAST_NO_AVX512=1 (read once per
// process) turns them off, so the tests can check the portable paths on any CPU.
bool have_avx512();

void keep_bytes(uint64_t seed, uint32_t purpose, uint32_t stream, uint64_t group0, int64_t n_groups,
                uint32_t threshold, uint8_t* keep);

}  // namespace electra_fast
