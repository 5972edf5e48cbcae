// Dropout + residual add + LayerNorm on CPU, forward and backward, one pass over the rows each. Semantics and
// the random stream: electra_fast/reference/dropout_add_layer_norm.py (the mask is the dropout op's).
//
// FIXED blocks of kRows rows run in parallel: a block's keep bytes come from one keep_bytes call (its first
// element, r0 * H, is a multiple of 4 because kRows is), its rows are normalised from an fp32 copy in L1, and
// in the backward it writes its own partial dweight / dbias row, summed over blocks in block order afterwards.
// Nothing depends on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "dispatch.h"
#include "float_bits.h"
#include "keep_bytes.h"
#include "parallel.h"
#include "philox.h"

namespace electra_fast {
namespace {

constexpr int64_t kRows = 32;  // rows per task (a multiple of 4)
constexpr int64_t kColBlock = 256;  // columns per task of the partial-sum reduction

struct Mask {
  uint64_t seed;
  uint32_t stream, threshold;
  float scale;
  bool on() const { return threshold > 0; }
  // keep bytes of rows [r0, r0 + rows) of an [N, H] tensor; keep has room for rows * H rounded up to 256
  void fill(int64_t r0, int64_t rows, int64_t H, uint8_t* keep) const {
    const int64_t e0 = r0 * H, n = rows * H;
    keep_bytes(seed, kDropout, stream, static_cast<uint64_t>(e0 / 4), (n + 3) / 4, threshold, keep);
  }
};

template <typename T>
using acc_of = typename Bits<T>::acc;

constexpr int kScaledExp = 20;  // reference.dropout_add_layer_norm.SCALED_EXP

// mean and rstd of a row whose sum of squares overflowed acc (|h| beyond ~1e19 in fp32), by the reference's rule:
// from the row scaled by an exact power of two s, max |s h| in [2^20, 2^21). A row holding inf / NaN keeps its
// non-finite moments. Rare, so plain loops.
template <typename acc>
void scaled_moments(const acc* __restrict buf, int64_t H, double eps, acc* mean, acc* rstd) {
  acc mx = 0;
  for (int64_t c = 0; c < H; ++c) {
    if (!std::isfinite(buf[c])) return;
    mx = std::max(mx, std::abs(buf[c]));
  }
  const acc s = std::ldexp(acc(1), kScaledExp - std::ilogb(mx));
  acc sum = 0;
  for (int64_t c = 0; c < H; ++c) sum += buf[c] * s;
  const acc ms = sum / static_cast<acc>(H);
  acc ss = 0;
  for (int64_t c = 0; c < H; ++c) ss += (buf[c] * s - ms) * (buf[c] * s - ms);
  const acc e = static_cast<acc>(eps);
  *mean = ms / s;
  *rstd = std::min(s / std::sqrt(ss / static_cast<acc>(H) + e * s * s), acc(1) / std::sqrt(e));
}

template <typename T, typename W>
void forward_rows(const T* __restrict x, const T* __restrict res, const W* __restrict w, const W* __restrict b,
                  int64_t r0, int64_t rows, int64_t H, double eps, const Mask& mk, const uint8_t* __restrict keep,
                  T* __restrict out, T* __restrict h, acc_of<T>* __restrict mean, acc_of<T>* __restrict rstd,
                  acc_of<T>* __restrict buf) {
  using B = Bits<T>;
  using acc = acc_of<T>;
  using raw = typename B::raw;
  const raw* xr = reinterpret_cast<const raw*>(x);
  const raw* rr = reinterpret_cast<const raw*>(res);
  raw* hr = reinterpret_cast<raw*>(h);
  raw* orw = reinterpret_cast<raw*>(out);
  const acc scale = static_cast<acc>(mk.scale);
  for (int64_t r = r0; r < r0 + rows; ++r) {
    const int64_t o = r * H;
    const uint8_t* kp = keep + (r - r0) * H;
    acc sum = 0;
    if (mk.on()) {
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < H; ++c) {
        const acc d = kp[c] ? B::load(B::store(B::load(xr[o + c]) * scale)) : acc(0);
        const raw hv = B::store(d + B::load(rr[o + c]));
        hr[o + c] = hv;
        buf[c] = B::load(hv);
        sum += buf[c];
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < H; ++c) {
        const raw hv = B::store(B::load(xr[o + c]) + B::load(rr[o + c]));
        hr[o + c] = hv;
        buf[c] = B::load(hv);
        sum += buf[c];
      }
    }
    acc mu = sum / static_cast<acc>(H);
    acc ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < H; ++c) ss += (buf[c] - mu) * (buf[c] - mu);
    acc rs = acc(1) / std::sqrt(ss / static_cast<acc>(H) + static_cast<acc>(eps));
    if (!std::isfinite(ss)) scaled_moments<acc>(buf, H, eps, &mu, &rs);
    mean[r] = mu;
    rstd[r] = rs;
    if (b != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < H; ++c)
        orw[o + c] = B::store((buf[c] - mu) * rs * static_cast<acc>(w[c]) + static_cast<acc>(b[c]));
    } else {
#pragma omp simd
      for (int64_t c = 0; c < H; ++c) orw[o + c] = B::store((buf[c] - mu) * rs * static_cast<acc>(w[c]));
    }
  }
}

template <typename T, typename W>
void backward_rows(const T* __restrict go_p, const T* __restrict h_p, const W* __restrict w,
                   const acc_of<T>* __restrict mean, const acc_of<T>* __restrict rstd, int64_t r0, int64_t rows,
                   int64_t H, const Mask& mk, const uint8_t* __restrict keep, T* __restrict dx_p, T* __restrict dr_p,
                   acc_of<T>* __restrict dw_part, acc_of<T>* __restrict db_part, acc_of<T>* __restrict xh,
                   acc_of<T>* __restrict g) {
  using B = Bits<T>;
  using acc = acc_of<T>;
  using raw = typename B::raw;
  const raw* gor = reinterpret_cast<const raw*>(go_p);
  const raw* hr = reinterpret_cast<const raw*>(h_p);
  raw* dxr = reinterpret_cast<raw*>(dx_p);
  raw* drr = reinterpret_cast<raw*>(dr_p);
  const acc scale = static_cast<acc>(mk.scale);
  const acc inv_h = acc(1) / static_cast<acc>(H);
  for (int64_t r = r0; r < r0 + rows; ++r) {
    const int64_t o = r * H;
    const acc mu = mean[r], rs = rstd[r];
    acc sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
    for (int64_t c = 0; c < H; ++c) {
      const acc gov = B::load(gor[o + c]);
      xh[c] = (B::load(hr[o + c]) - mu) * rs;
      g[c] = gov * static_cast<acc>(w[c]);
      dw_part[c] += gov * xh[c];
      db_part[c] += gov;
      sg += g[c];
      sgx += g[c] * xh[c];
    }
    const acc mg = sg * inv_h, mgx = sgx * inv_h;
    const uint8_t* kp = keep + (r - r0) * H;
    if (mk.on()) {
#pragma omp simd
      for (int64_t c = 0; c < H; ++c) {
        const raw d = B::store(rs * (g[c] - mg - xh[c] * mgx));
        drr[o + c] = d;
        dxr[o + c] = kp[c] ? B::store(B::load(d) * scale) : raw{0};
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < H; ++c) {
        const raw d = B::store(rs * (g[c] - mg - xh[c] * mgx));
        drr[o + c] = d;
        dxr[o + c] = d;
      }
    }
  }
}

Mask make_mask(int64_t threshold, double scale, int64_t seed, int64_t stream) {
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t{1} << 24),
              "dropout_add_layer_norm: threshold must be in [0, 2^24]");
  TORCH_CHECK(stream >= 0 && stream <= 0xFFFFFFFFll, "dropout_add_layer_norm: stream must be in [0, 2^32)");
  return Mask{static_cast<uint64_t>(seed), static_cast<uint32_t>(stream), static_cast<uint32_t>(threshold),
              static_cast<float>(scale)};
}

// T: the rows' dtype; W: the weight's (fp32 or T)
template <typename F>
void dispatch_weight(at::ScalarType t, at::ScalarType w, F&& f) {
  EF_DISPATCH_FLOATS(t, "dropout_add_layer_norm", [&] {
    using T = scalar_t;
    if (w == t) {
      f(T(), T());
    } else {
      TORCH_CHECK(w == at::kFloat, "dropout_add_layer_norm: weight must be fp32 or the input's dtype");
      f(T(), float());
    }
  });
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_rows(const at::Tensor& t, const char* what, int64_t n, int64_t H, at::ScalarType dt) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == H && t.is_contiguous() && t.scalar_type() == dt,
              "dropout_add_layer_norm: ", what, " must be a contiguous [N, H] tensor of the input's dtype");
}

int64_t keep_room(int64_t H) { return (kRows * H + 255) / 256 * 256; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    int64_t threshold, double scale, int64_t seed, int64_t stream, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "dropout_add_layer_norm: x must be a contiguous [N, H] tensor");
  const int64_t n = x.size(0), H = x.size(1);
  check_rows(residual, "residual", n, H, x.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && weight.is_contiguous(),
              "dropout_add_layer_norm: weight must be a contiguous [H] tensor");
  TORCH_CHECK(!bias.has_value() || (bias->sizes() == weight.sizes() && bias->scalar_type() == weight.scalar_type() &&
                                    bias->is_contiguous()),
              "dropout_add_layer_norm: bias must be a contiguous [H] tensor of weight's dtype");
  const Mask mk = make_mask(threshold, scale, seed, stream);
  at::Tensor out = at::empty_like(x), h = at::empty_like(x);
  at::Tensor mean = at::empty({n}, x.options().dtype(acc_type(x))), rstd = at::empty_like(mean);
  if (n == 0 || H == 0) return {out, h, mean.fill_(0), rstd.fill_(0)};
  dispatch_weight(x.scalar_type(), weight.scalar_type(), [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    using acc = acc_of<T>;
    const T *xp = x.data_ptr<T>(), *rp = residual.data_ptr<T>();
    const W* wp = weight.data_ptr<W>();
    const W* bp = bias.has_value() ? bias->data_ptr<W>() : nullptr;
    T *op = out.data_ptr<T>(), *hp = h.data_ptr<T>();
    acc *mp = mean.data_ptr<acc>(), *sp = rstd.data_ptr<acc>();
    electra_fast::parallel_for(0, (n + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) {
      std::vector<uint8_t> keep(mk.on() ? keep_room(H) : 0);
      std::vector<acc> buf(H);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * kRows, rows = std::min(kRows, n - r0);
        if (mk.on()) mk.fill(r0, rows, H, keep.data());
        forward_rows<T, W>(xp, rp, wp, bp, r0, rows, H, eps, mk, keep.data(), op, hp, mp, sp, buf.data());
      }
    });
  });
  return {out, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t threshold, double scale, int64_t seed, int64_t stream, bool has_bias) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "dropout_add_layer_norm: h must be a contiguous [N, H] tensor");
  const int64_t n = h.size(0), H = h.size(1);
  check_rows(grad_out, "grad_out", n, H, h.scalar_type());
  const auto acc_t = acc_type(h);
  TORCH_CHECK(mean.numel() == n && rstd.numel() == n && mean.scalar_type() == acc_t && rstd.scalar_type() == acc_t &&
                  mean.is_contiguous() && rstd.is_contiguous(),
              "dropout_add_layer_norm: mean / rstd must be contiguous [N] in the accumulation dtype");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && weight.is_contiguous(),
              "dropout_add_layer_norm: weight must be a contiguous [H] tensor");
  const Mask mk = make_mask(threshold, scale, seed, stream);
  at::Tensor dx = at::empty_like(h), dres = at::empty_like(h);
  const int64_t nblk = (n + kRows - 1) / kRows;
  at::Tensor parts = at::zeros({2, std::max<int64_t>(nblk, 1), H}, h.options().dtype(acc_t));
  dispatch_weight(h.scalar_type(), weight.scalar_type(), [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    using acc = acc_of<T>;
    const T *gp = grad_out.data_ptr<T>(), *hp = h.data_ptr<T>();
    const W* wp = weight.data_ptr<W>();
    const acc *mp = mean.data_ptr<acc>(), *sp = rstd.data_ptr<acc>();
    T *dxp = dx.data_ptr<T>(), *drp = dres.data_ptr<T>();
    acc* pp = parts.data_ptr<acc>();
    const int64_t pstride = std::max<int64_t>(nblk, 1) * H;
    electra_fast::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      std::vector<uint8_t> keep(mk.on() ? keep_room(H) : 0);
      std::vector<acc> xh(H), g(H);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * kRows, rows = std::min(kRows, n - r0);
        if (mk.on()) mk.fill(r0, rows, H, keep.data());
        backward_rows<T, W>(gp, hp, wp, mp, sp, r0, rows, H, mk, keep.data(), dxp, drp, pp + blk * H,
                            pp + pstride + blk * H, xh.data(), g.data());
      }
    });
  });
  // dweight / dbias: the blocks' partial rows summed in block order, columns in parallel (fixed blocks)
  at::Tensor sums = at::empty({2, H}, parts.options());
  AT_DISPATCH_FLOATING_TYPES(acc_t, "dropout_add_layer_norm_bwd", [&] {
    const scalar_t* pp = parts.data_ptr<scalar_t>();
    scalar_t* sp = sums.data_ptr<scalar_t>();
    const int64_t nb = std::max<int64_t>(nblk, 1);
    electra_fast::parallel_for(0, (2 * H + kColBlock - 1) / kColBlock, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t cb = c0; cb < c1; ++cb) {
        const int64_t lo = cb * kColBlock, hi = std::min(2 * H, lo + kColBlock);
        for (int64_t j = lo; j < hi; ++j) {
          const int64_t which = j / H, c = j % H;
          scalar_t s = 0;
          for (int64_t blk = 0; blk < nb; ++blk) s += pp[(which * nb + blk) * H + c];
          sp[j] = s;
        }
      }
    });
  });
  // copies: op outputs may not alias each other; without a bias an empty dbias (the schema returns tensors only)
  at::Tensor dweight = sums[0].to(weight.scalar_type(), false, true);
  at::Tensor dbias = has_bias ? sums[1].to(weight.scalar_type(), false, true) : at::empty({0}, weight.options());
  return {dx, dres, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  m.def("dropout_add_layer_norm_fwd(Tensor x, Tensor residual, Tensor weight, Tensor? bias, int threshold, "
        "float scale, int seed, int stream, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dropout_add_layer_norm_bwd(Tensor grad_out, Tensor h, Tensor weight, Tensor mean, Tensor rstd, "
        "int threshold, float scale, int seed, int stream, bool has_bias) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(electra_fast_cpp, CPU, m) {
  m.impl("dropout_add_layer_norm_fwd", &dropout_add_layer_norm_fwd);
  m.impl("dropout_add_layer_norm_bwd", &dropout_add_layer_norm_bwd);
}

}  // namespace electra_fast
