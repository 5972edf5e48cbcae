// bf16 x bf16 -> fp32 block products on ATen's exported brgemm (oneDNN micro-kernels on AMX / AVX512-BF16, the
// ones torch's own CPU flash attention uses), and the operand packing they need. Shared by the bf16 paths of
// disentangled attention and of the fused MLM loss + sampling.
//
// brgemm reads B ([K, N]) in VNNI-2 layout: element (k, n) at B[(k / 2) * 2 * ldb + 2 * n + k % 2], K even.
// A ([M, K]) and C ([M, N], fp32) are plain row-major. Callers keep every B packable in one pass by turning
// products around where a transposed operand would be needed.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "float_bits.h"

#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define EF_HAVE_BRGEMM 1
#endif

namespace electra_fast {
namespace brg {

// True when torch's bf16 brgemm runs natively on this CPU (a 2 x 2 product with a known result checks out once
// per process); false on other CPUs and on torch builds without the API.
bool native();
// native() and ELECTRA_FAST_NO_AMX unset (or "0"). Read per call: tests compare both paths in one process.
bool enabled();

#ifdef EF_HAVE_BRGEMM
using bf16 = c10::BFloat16;

inline int64_t even(int64_t n) { return n + (n & 1); }

// round to nearest even; NaN stays NaN (the rounding add alone can carry a NaN's payload into -0 or inf: NaN
// probabilities of an invalid attention row must reach the output)
inline uint16_t bf16_bits(float x) { return Bits<at::BFloat16>::store(x); }
inline uint16_t bf16_bits(bf16 x) { return x.x; }

inline const bf16* as_bf16(const uint16_t* p) { return reinterpret_cast<const bf16*>(p); }

// C[M, N] (fp32, row stride ldc) (+)= A[M, K] (bf16, row stride lda) @ B (VNNI-2, ldb); K even. Cut into
// <= 512 x 512 x 512 brgemm calls (a few kernel shapes). Single-threaded: callers parallelise.
void gemm(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B, int64_t ldb, float* C,
          int64_t ldc, bool add);
inline void gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                 float* C, int64_t ldc, bool add) {
  gemm(M, N, K, as_bf16(A), lda, as_bf16(B), ldb, C, ldc, add);
}
// Frees the thread's AMX tile state; call at the end of each parallel task that ran gemm.
inline void release() { at::native::cpublas::brgemm_release(true); }

// dst (VNNI-2, row-pair stride 2 * ld) = src [R, C] (row stride lds) rounded to bf16; an odd last row pairs
// with zeros.
template <typename S>
void pack_rows(const S* __restrict src, int64_t lds, int64_t R, int64_t C, uint16_t* __restrict dst, int64_t ld) {
  for (int64_t r = 0; r < R; r += 2) {
    const S* a = src + r * lds;
    const S* b = a + lds;
    uint16_t* d = dst + r * ld;
    if (r + 1 < R) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        d[2 * c] = bf16_bits(a[c]);
        d[2 * c + 1] = bf16_bits(b[c]);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        d[2 * c] = bf16_bits(a[c]);
        d[2 * c + 1] = 0;
      }
    }
  }
}

// Transposes walk kTR source rows at a time: their lines stay in L1 while every column is read (a source row
// stride like 3 * H * D * 2 bytes maps all rows onto a few L1 sets; whole-column walks thrashed them).
constexpr int64_t kTR = 16;

// dst[c * ldd + r] = src[r * lds + c] for an R x C matrix of 32-bit values (AVX-512: 16 x 16 register tiles)
void transpose32(const uint32_t* __restrict src, int64_t lds, int64_t R, int64_t C, uint32_t* __restrict dst,
                 int64_t ldd);

// dst (VNNI-2, ld) = the transpose of src [N, K] (bf16, row stride lds, K even): B[k, n] = src[n, k]. The pair
// (src[n, k], src[n, k + 1]) is already the VNNI pair of column n: a 32-bit transpose.
void pack_cols(const bf16* __restrict src, int64_t lds, int64_t N, int64_t K, uint16_t* __restrict dst, int64_t ld);

// dst [K, ld] = the transpose of src [N, K] (bf16, row stride lds), columns N..ld-1 zero (K padding)
void transpose(const bf16* __restrict src, int64_t lds, int64_t N, int64_t K, uint16_t* __restrict dst, int64_t ld);

// dst [R, C] (row stride ld) = src (fp32, row stride lds) rounded to bf16
void to_rows(const float* __restrict src, int64_t lds, int64_t R, int64_t C, uint16_t* __restrict dst, int64_t ld);
#endif

// Uninitialised scratch of one task, reused across its work items; at::empty allocations (seen by torch's
// memory accounting).
class Scratch {
 public:
  template <typename T>
  T* get(int slot, int64_t n) {
    at::Tensor& t = bufs_[slot];
    const int64_t bytes = std::max<int64_t>(n * static_cast<int64_t>(sizeof(T)), 1);
    if (!t.defined() || t.numel() < bytes) t = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
    return reinterpret_cast<T*>(t.data_ptr<uint8_t>());
  }

 private:
  at::Tensor bufs_[20];
};

}  // namespace brg
}  // namespace electra_fast
