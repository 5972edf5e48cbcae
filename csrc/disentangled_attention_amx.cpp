// bf16 disentangled attention on AMX / AVX512-BF16: the blocking, rows and reductions of
// disentangled_attention.cpp, with every block product a bf16 x bf16 -> fp32 brgemm (ATen's oneDNN micro-kernels,
// the ones torch's own CPU flash attention uses). Scores, softmax, lse, gathers, scatters and every accumulation
// stay fp32; the probabilities, d scores and position-product gradients are rounded to bf16 (nearest even) only as
// operands of the products that consume them, as flash attention does on GPUs.
//
// brgemm reads B ([K, N]) in VNNI-2 layout: element (k, n) at B[(k / 2) * 2 * ldb + 2 * n + k % 2], K even.
// Products that need a transposed operand are turned around instead (dV^T = dO^T P, dK^T = Q^T dS,
// dpos_key^T = Q^T dC, dpos_query^T = K^T dKP), so every B is packed from rows or columns in one pass.
#include <cstring>
#include <vector>

#include "brgemm.h"
#include "disentangled_attention.h"

namespace electra_fast {
namespace da {

#ifdef EF_HAVE_BRGEMM
namespace {

using namespace brg;

// [B, H, T, D] (packed: [N, H, D] with p.cu) bf16 tensor: base pointer of (b, h), the row stride ld and the stride
// of D (unit for the inputs; the outputs may be strided)
struct Rows {
  bf16* base;
  int64_t sb, sh, ld, sd;
  const int32_t* cu;
  Rows(const at::Tensor& t, const Problem& p)
      : base(t.data_ptr<bf16>()), sb(t.stride(0)), sh(t.stride(1)), ld(t.stride(p.cu ? 0 : 2)),
        sd(t.stride(t.dim() - 1)), cu(p.cu) {}
  bf16* at(int64_t b, int64_t h) const { return base + (cu ? cu[b] : b) * sb + h * sh; }
};

inline at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Per-head B operands of the position products, packed once per call (shared by every batch).
struct PosPack {
  int64_t ns = 0, nsp = 0;  // slots s0..s1, and that count rounded up to even
  at::Tensor key_t, query_t;        // [H, D * nsp]: VNNI of pos[h][s0 + c]^T (c2p / p2c scores)
  at::Tensor key_rows, query_rows;  // [H, nsp * D]: VNNI of rows pos[h][s0 ..] (dQ += dC pos_key, dK += dKP pos_query)
  const uint16_t* ptr(const at::Tensor& t, int64_t h) const {
    return reinterpret_cast<const uint16_t*>(t.data_ptr<int16_t>()) + h * t.size(1);
  }
};

PosPack pack_positions(const Problem& p, const at::Tensor& pos_key, const at::Tensor& pos_query, bool rows) {
  PosPack pp;
  pp.ns = p.s1 - p.s0 + 1;
  pp.nsp = even(pp.ns);
  const auto opts = at::TensorOptions().dtype(at::kShort);
  auto pack = [&](const at::Tensor& pos, at::Tensor& t_out, at::Tensor& rows_out) {
    if (!pos.defined()) return;
    const at::Tensor src = pos.contiguous();
    t_out = at::zeros({p.H, p.D * pp.nsp}, opts);
    if (rows) rows_out = at::zeros({p.H, pp.nsp * p.D}, opts);
    for (int64_t h = 0; h < p.H; ++h) {
      const bf16* s = src.data_ptr<bf16>() + (h * p.two_k + p.s0) * p.D;
      pack_cols(s, p.D, pp.ns, p.D, reinterpret_cast<uint16_t*>(t_out[h].data_ptr<int16_t>()), pp.nsp);
      if (rows) pack_rows(s, p.D, pp.ns, p.D, reinterpret_cast<uint16_t*>(rows_out[h].data_ptr<int16_t>()), p.D);
    }
  };
  pack(pos_key, pp.key_t, pp.key_rows);
  pack(pos_query, pp.query_t, pp.query_rows);
  return pp;
}

// out rows [bm, D] (strided bf16) = src (fp32 [bm, D], row stride lds)
void store_rows(const float* __restrict src, int64_t lds, int64_t bm, int64_t D, bf16* __restrict dst,
                int64_t ld_dst, int64_t d_stride) {
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t r = 0; r < bm; ++r) {
    if (d_stride == 1) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) out[r * ld_dst + d] = bf16_bits(src[r * lds + d]);
    } else {
      for (int64_t d = 0; d < D; ++d) out[r * ld_dst + d * d_stride] = bf16_bits(src[r * lds + d]);
    }
  }
}

// out rows [T, D] (strided bf16) = at^T (+ add): at fp32 [D, T] (a transposed accumulator), add fp32 [T, D] or
// nullptr. Tiles of kTR rows keep the column reads of `at` and the row writes in L1.
void store_transposed(const float* __restrict at, const float* __restrict add, int64_t T, int64_t D,
                      bf16* __restrict dst, int64_t ld_dst, int64_t d_stride) {
  float tile[kTR * 128];
  for (int64_t j0 = 0; j0 < T; j0 += kTR) {
    const int64_t jb = std::min(kTR, T - j0);
    for (int64_t d0 = 0; d0 < D; d0 += 128) {
      const int64_t db = std::min<int64_t>(128, D - d0);
      transpose32(reinterpret_cast<const uint32_t*>(at + d0 * T + j0), T, db, jb, reinterpret_cast<uint32_t*>(tile),
                  128);
      for (int64_t j = 0; j < jb; ++j) {
        float* row = tile + j * 128;
        if (add != nullptr) {
#pragma omp simd
          for (int64_t d = 0; d < db; ++d) row[d] += add[(j0 + j) * D + d0 + d];
        }
      }
      store_rows(tile, 128, jb, db, dst + j0 * ld_dst + d0 * d_stride, ld_dst, d_stride);
    }
  }
}

// Zero column `col` of a [rows, ld] bf16 matrix (the K padding of an odd T)
void zero_col(uint16_t* m, int64_t rows, int64_t ld, int64_t col) {
  if (col < ld) {
    for (int64_t r = 0; r < rows; ++r) m[r * ld + col] = 0;
  }
}

void forward_head(const Problem& p, int64_t b, int64_t h, const Rows& q, const Rows& k, const Rows& v,
                  const PosPack& pos, const Rows& out, float* lse, Scratch& ws) {
  const int64_t T = p.T, D = p.D, Te = even(T), bh = b * p.H + h, nsp = pos.nsp;
  const bf16 *qp = q.at(b, h), *kp = k.at(b, h), *vp = v.at(b, h);
  const int64_t ld = block_ld(T), rows = block_rows(T);
  uint16_t *kt = ws.get<uint16_t>(0, D * T), *vv = ws.get<uint16_t>(1, Te * D), *pb = ws.get<uint16_t>(2, rows * Te);
  float *s = ws.get<float>(3, rows * ld), *c = ws.get<float>(4, rows * nsp), *kpf = ws.get<float>(5, T * nsp);
  float* of = ws.get<float>(6, rows * D);
  uint8_t* keep = ws.get<uint8_t>(7, rows * T);
  zero_col(pb, rows, Te, T);
  pack_cols(kp, k.ld, T, D, kt, T);
  pack_rows(vp, v.ld, T, D, vv, D);
  if (p.has_pq) gemm(T, nsp, D, kp, k.ld, as_bf16(pos.ptr(pos.query_t, h)), nsp, kpf, nsp, false);
  bf16* op = out.at(b, h);
  lse += lse_offset(p, b, h);
  for (int64_t i0 = 0; i0 < T; i0 += rows) {
    const int64_t bm = std::min(rows, T - i0);
    const bf16* qb = qp + i0 * q.ld;
    gemm(bm, T, D, qb, q.ld, as_bf16(kt), T, s, ld, false);
    int32_t lo = 0;
    int64_t nc = 0;
    if (p.has_pk) {
      const auto range = block_slot_range(p, i0, bm);
      lo = range.first;
      nc = range.second - lo + 1;
      gemm(bm, nc, D, qb, q.ld, as_bf16(pos.ptr(pos.key_t, h)) + 2 * (lo - p.s0), nsp, c, nc, false);
    }
    if (p.has_pq) add_p2c_block<float>(p, i0, bm, s, ld, kpf, nsp);
    forward_rows<float>(p, b, bh, i0, bm, s, ld, p.has_pk ? c : nullptr, nc, lo, lse, keep);
    to_rows(s, ld, bm, T, pb, Te);
    gemm(bm, D, Te, pb, Te, vv, D, of, D, false);
    zero_dead_rows<float>(of, D, bm, D, lse + i0);
    store_rows(of, D, bm, D, op + i0 * out.ld, out.ld, out.sd);
  }
}

// Backward of one (b, h). dpk_t / dpq_t: this task's [D, ldp] fp32 position-gradient partials (transposed).
void backward_head(const Problem& p, int64_t b, int64_t h, const Rows& q, const Rows& k, const Rows& v,
                   const Rows& dout, const PosPack& pos, const float* lse, const Rows& dq, const Rows& dk,
                   const Rows& dv, float* dpk_t, float* dpq_t, int64_t ldp, Scratch& ws) {
  const int64_t T = p.T, D = p.D, Te = even(T), bh = b * p.H + h, nsp = pos.nsp;
  const bf16 *qp = q.at(b, h), *kp = k.at(b, h), *vp = v.at(b, h), *dop = dout.at(b, h);
  const int64_t ld = block_ld(T), rows = block_rows(T), rows_e = even(rows);
  // B operands of the whole (b, h): K^T and V^T (scores, dP), K rows (dQ); A operands Q^T, dO^T, K^T (the
  // turned-around products)
  uint16_t *kt = ws.get<uint16_t>(0, D * T), *vt = ws.get<uint16_t>(1, D * T), *kv = ws.get<uint16_t>(2, Te * D);
  uint16_t *qt = ws.get<uint16_t>(3, D * Te), *dot = ws.get<uint16_t>(4, D * Te), *ktr = ws.get<uint16_t>(5, D * Te);
  // per block
  uint16_t *pv = ws.get<uint16_t>(6, rows_e * T), *dsv = ws.get<uint16_t>(7, rows_e * T);
  uint16_t* dsr = ws.get<uint16_t>(8, rows * Te);
  float *s = ws.get<float>(9, rows * ld), *g = ws.get<float>(10, rows * ld), *dqf = ws.get<float>(11, rows * D);
  float *dvt = ws.get<float>(12, D * T), *dkt = ws.get<float>(13, D * T);
  uint8_t* keep = ws.get<uint8_t>(14, rows * T);
  float *c = ws.get<float>(15, rows * nsp), *dc = ws.get<float>(16, rows * nsp);
  uint16_t *dcr = ws.get<uint16_t>(17, rows * nsp), *dcv = ws.get<uint16_t>(18, rows_e * nsp);
  pack_cols(kp, k.ld, T, D, kt, T);
  pack_cols(vp, v.ld, T, D, vt, T);
  pack_rows(kp, k.ld, T, D, kv, D);
  transpose(qp, q.ld, T, D, qt, Te);
  transpose(dop, dout.ld, T, D, dot, Te);
  zero_col(dsr, rows, Te, T);
  float *kpf = nullptr, *dkp = nullptr;
  if (p.has_pq) {
    kpf = ws.get<float>(19, 2 * T * nsp);  // KP, then dKP
    dkp = kpf + T * nsp;
    std::fill(dkp, dkp + T * nsp, 0.f);
    gemm(T, nsp, D, kp, k.ld, as_bf16(pos.ptr(pos.query_t, h)), nsp, kpf, nsp, false);
  }
  bf16* dqp = dq.at(b, h);
  lse += lse_offset(p, b, h);
  for (int64_t i0 = 0; i0 < T; i0 += rows) {
    const int64_t bm = std::min(rows, T - i0), bme = even(bm);
    const bf16 *qb = qp + i0 * q.ld, *dob = dop + i0 * dout.ld;
    gemm(bm, T, D, qb, q.ld, as_bf16(kt), T, s, ld, false);
    gemm(bm, T, D, dob, dout.ld, as_bf16(vt), T, g, ld, false);
    int32_t lo = 0;
    int64_t nc = 0;
    if (p.has_pk) {  // columns from an even slot offset, so the VNNI rows of pos_key line up for dQ += dC pos_key
      const auto range = block_slot_range(p, i0, bm);
      lo = p.s0 + ((range.first - p.s0) & ~1);
      nc = even(range.second - lo + 1);
      gemm(bm, nc, D, qb, q.ld, as_bf16(pos.ptr(pos.key_t, h)) + 2 * (lo - p.s0), nsp, c, nc, false);
      std::fill(dc, dc + bm * nc, 0.f);
    }
    if (p.has_pq) add_p2c_block<float>(p, i0, bm, s, ld, kpf, nsp);
    backward_rows<float>(p, b, bh, i0, bm, s, g, ld, p.has_pk ? c : nullptr, p.has_pk ? dc : nullptr, nc, lo, lse,
                         keep);
    if (p.has_pq) scatter_p2c_block<float>(p, i0, bm, g, ld, dkp, nsp);
    pack_rows(s, ld, bm, T, pv, T);
    pack_rows(g, ld, bm, T, dsv, T);
    to_rows(g, ld, bm, T, dsr, Te);
    gemm(D, T, bme, dot + i0, Te, pv, T, dvt, T, i0 > 0);  // dV^T += dO^T P
    gemm(D, T, bme, qt + i0, Te, dsv, T, dkt, T, i0 > 0);  // dK^T += Q^T dS
    gemm(bm, D, Te, dsr, Te, kv, D, dqf, D, false);        // dQ = dS K
    if (p.has_pk) {
      to_rows(dc, nc, bm, nc, dcr, nc);
      pack_rows(dc, nc, bm, nc, dcv, nc);
      gemm(bm, D, nc, dcr, nc, pos.ptr(pos.key_rows, h) + (lo - p.s0) * D, D, dqf, D, true);  // dQ += dC pos_key
      gemm(D, nc, bme, qt + i0, Te, dcv, nc, dpk_t + lo, ldp, true);  // dpos_key^T += Q^T dC
    }
    store_rows(dqf, D, bm, D, dqp + i0 * dq.ld, dq.ld, dq.sd);
  }
  float* dkf = nullptr;
  if (p.has_pq) {  // dK += dKP pos_query, dpos_query^T += K^T dKP (the scores' slot range: columns from s0)
    uint16_t* dkpr = ws.get<uint16_t>(6, std::max(rows_e * T, 2 * Te * nsp));  // the block buffers are free now
    uint16_t* dkpv = dkpr + Te * nsp;
    to_rows(dkp, nsp, T, nsp, dkpr, nsp);
    pack_rows(dkp, nsp, T, nsp, dkpv, nsp);
    transpose(kp, k.ld, T, D, ktr, Te);
    dkf = ws.get<float>(9, std::max(rows * ld, T * D));
    gemm(T, D, nsp, dkpr, nsp, pos.ptr(pos.query_rows, h), D, dkf, D, false);
    gemm(D, nsp, Te, ktr, Te, dkpv, nsp, dpq_t + p.s0, ldp, true);
  }
  store_transposed(dkt, dkf, T, D, dk.at(b, h), dk.ld, dk.sd);
  store_transposed(dvt, nullptr, T, D, dv.at(b, h), dv.ld, dv.sd);
}

}  // namespace

bool amx_usable(const at::Tensor& q, const Problem& p) {
  return q.scalar_type() == at::kBFloat16 && p.D % 2 == 0 && brg::enabled();
}

std::tuple<at::Tensor, at::Tensor> forward_amx(const Problem& p, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& pos_key,
                                               const at::Tensor& pos_query) {
  const at::Tensor qc = unit_last(q), kc = unit_last(k), vc = unit_last(v);
  at::Tensor out = empty_in_dim_order(q);
  at::Tensor lse = empty_lse(p, q);
  const PosPack pos = pack_positions(p, pos_key, pos_query, false);
  const Rows qr(qc, p), kr(kc, p), vr(vc, p), outr(out, p);
  float* lp = lse.data_ptr<float>();
  std::vector<Scratch> ws(task_workers(p.B * p.H));  // per worker: allocated once, reused by its tasks
  parallel_tasks(p.B * p.H, [&](int64_t bh, int64_t w) {
    const int64_t b = bh / p.H;
    forward_head(sequence(p, b, false), b, bh % p.H, qr, kr, vr, pos, outr, lp, ws[w]);
    release();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_amx(
    const Problem& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& pos_key, const at::Tensor& pos_query, const float* lse) {
  const at::Tensor qc = unit_last(q), kc = unit_last(k), vc = unit_last(v), dc = unit_last(grad_out);
  at::Tensor dq = empty_in_dim_order(q), dk = empty_in_dim_order(k), dv = empty_in_dim_order(v);
  const PosPack pos = pack_positions(p, pos_key, pos_query, true);
  const int64_t n_part = std::min(p.B, kPosPartitions);
  const int64_t ldp = p.two_k + 2;  // room for the even-aligned slot columns past 2k - 1 (zero products)
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dpk_parts = p.has_pk ? at::zeros({n_part, p.H, p.D, ldp}, f32) : at::Tensor();
  at::Tensor dpq_parts = p.has_pq ? at::zeros({n_part, p.H, p.D, ldp}, f32) : at::Tensor();
  const Rows qr(qc, p), kr(kc, p), vr(vc, p), dr(dc, p), dqr(dq, p), dkr(dk, p), dvr(dv, p);
  // Task (partition c, head h) owns batches [c * B / n_part, (c + 1) * B / n_part) and its own partials.
  std::vector<Scratch> ws(task_workers(n_part * p.H));
  parallel_tasks(n_part * p.H, [&](int64_t t, int64_t w) {
    const int64_t c = t / p.H, h = t % p.H;
    float* dpk_t = p.has_pk ? dpk_parts[c][h].data_ptr<float>() : nullptr;
    float* dpq_t = p.has_pq ? dpq_parts[c][h].data_ptr<float>() : nullptr;
    for (int64_t b = c * p.B / n_part; b < (c + 1) * p.B / n_part; ++b) {
      backward_head(sequence(p, b, false), b, h, qr, kr, vr, dr, pos, lse, dqr, dkr, dvr, dpk_t, dpq_t, ldp, ws[w]);
    }
    release();
  });
  auto reduce = [&](const at::Tensor& parts) -> at::Tensor {
    if (!parts.defined()) return at::Tensor();
    const int64_t n = p.H * p.D * ldp;
    at::Tensor total = at::empty({p.H, p.D, ldp}, parts.options());
    sum_partitions<float>(parts.data_ptr<float>(), total.data_ptr<float>(), n_part, n);
    return total.narrow(2, 0, p.two_k).transpose(1, 2).to(at::kBFloat16).contiguous();
  };
  return {dq, dk, dv, reduce(dpk_parts), reduce(dpq_parts)};
}

#else  // a torch without the bf16 brgemm: bf16 takes the fp32-accumulation path of disentangled_attention.cpp

bool amx_usable(const at::Tensor&, const Problem&) { return false; }
std::tuple<at::Tensor, at::Tensor> forward_amx(const Problem&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "disentangled_attention: bf16 brgemm is not available in this torch build");
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_amx(
    const Problem&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const float*) {
  TORCH_CHECK(false, "disentangled_attention: bf16 brgemm is not available in this torch build");
}

#endif

}  // namespace da
}  // namespace electra_fast
