// Token masking on CPU: one pass per row (rows in parallel; a row's result depends on nothing else, so
// the output never depends on the thread count). Semantics, the random stream and the rounding rules:
// electra_fast/reference/masking.py.
//
// "count" is a radix select: a histogram of the keys' top bits finds the bucket where the running total
// of unit lengths crosses n, and only that bucket's few units are sorted (O(T) per row, words included).
// The Philox block is compiled for AVX-512 / AVX2 / baseline (target_clones) so the 32x32->64 multiplies
// vectorise on any x86 CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dispatch.h"
#include "parallel.h"
#include "philox.h"

namespace electra_fast {
namespace {

constexpr int64_t kIgnoreIndex = -100;

// x0, x1, x2 of the MASKING stream for indices base .. base + n - 1.
EF_TARGET_CLONES
void philox_row(uint64_t seed, uint64_t base, int64_t n, uint32_t* __restrict x0, uint32_t* __restrict x1,
                uint32_t* __restrict x2) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const Philox4 r = philox4x32_10(seed, base + static_cast<uint64_t>(i), kMasking);
    x0[i] = r.x[0];
    x1[i] = r.x[1];
    x2[i] = r.x[2];
  }
}

struct Params {
  uint64_t seed;
  int64_t mask_token_id, n_random, sel_thr, mask_thr, rand_thr;
  bool count;
  const int64_t* specials;
  int64_t n_specials;
  const int32_t* table;
};

// Scratch reused across the rows one thread handles.
struct Scratch {
  std::vector<uint32_t> x0, x1, x2;
  std::vector<uint8_t> cand, sel;
  std::vector<int32_t> ws, len;   // words: start of each token's unit; length of the unit at its start
  std::vector<uint8_t> ok;        // words: unit holds only candidates (at its start)
  std::vector<int32_t> hist;      // "count": total unit length per bucket of the key's top bits
  std::vector<uint64_t> packed;   // "count": (key << 32) | start of the eligible units in the boundary bucket
  void resize(int64_t T, int bits) {
    x0.resize(T), x1.resize(T), x2.resize(T), cand.resize(T), sel.resize(T), ws.resize(T), len.resize(T), ok.resize(T);
    hist.resize(size_t{1} << bits);
    packed.reserve(T);
  }
};

static inline uint64_t pack(uint32_t key, int64_t pos) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(pos);
}

// Bucket bits for the "count" radix select: about one unit per bucket, at least 16 buckets.
static inline int bucket_bits(int64_t T) {
  int bits = 4;
  while (bits < 12 && (int64_t{1} << bits) < T) ++bits;
  return bits;
}

// "count": mark (in sel, at unit starts) the longest prefix of the eligible units in (key, start) order whose total
// length stays <= n. One histogram pass over the key's top bits finds the bucket where the running total crosses
// n; only that bucket's few units are sorted. ``unit(t)`` returns the unit length if t starts an eligible unit, else 0.
template <typename UnitLen>
void select_prefix(int64_t T, int64_t n, int bits, Scratch& s, UnitLen unit) {
  const int shift = 32 - bits;
  std::fill(s.hist.begin(), s.hist.end(), 0);
  for (int64_t t = 0; t < T; ++t) s.hist[s.x0[t] >> shift] += unit(t);
  int64_t before = 0;
  size_t cut = s.hist.size();  // first bucket that does not fit whole
  for (size_t k = 0; k < s.hist.size(); ++k) {
    if (before + s.hist[k] > n) {
      cut = k;
      break;
    }
    before += s.hist[k];
  }
  s.packed.clear();
  for (int64_t t = 0; t < T; ++t) {
    const size_t k = s.x0[t] >> shift;
    const int32_t l = unit(t);
    s.sel[t] = l > 0 && k < cut;
    if (l > 0 && k == cut) s.packed.push_back(pack(s.x0[t], t));
  }
  std::sort(s.packed.begin(), s.packed.end());
  for (uint64_t u : s.packed) {
    const int64_t t = static_cast<int64_t>(u & 0xFFFFFFFFu);
    const int32_t l = unit(t);
    if (before + l > n) break;  // the prefix ends at the first unit that does not fit
    before += l;
    s.sel[t] = 1;
  }
}

template <typename id_t>
void mask_row(const id_t* __restrict ids, const uint8_t* __restrict real_m, const uint8_t* __restrict starts,
              id_t* __restrict out, int64_t* __restrict labels, bool* __restrict masked, int64_t b, int64_t T,
              int bits, const Params& p, Scratch& s) {
  philox_row(p.seed, static_cast<uint64_t>(b * T), T, s.x0.data(), s.x1.data(), s.x2.data());
  const int64_t* sp = p.specials;
  const int64_t n_sp = p.n_specials;
  // Candidates: real and not special (specials in the outer loop so the inner one vectorises).
  uint8_t* __restrict cand = s.cand.data();
#pragma omp simd
  for (int64_t t = 0; t < T; ++t) cand[t] = real_m == nullptr || real_m[t] != 0;
  int64_t n_real = 0, n_cand = 0;
#pragma omp simd reduction(+ : n_real)
  for (int64_t t = 0; t < T; ++t) n_real += cand[t];
  for (int64_t k = 0; k < n_sp; ++k) {
    const id_t special = static_cast<id_t>(sp[k]);
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) cand[t] &= ids[t] != special;
  }
#pragma omp simd reduction(+ : n_cand)
  for (int64_t t = 0; t < T; ++t) n_cand += cand[t];
  // Units: words (start token + following non-start tokens; padding and position 0 always start one) or tokens.
  const bool words = starts != nullptr;
  if (words) {
    int32_t start = 0;
    for (int64_t t = 0; t < T; ++t) {
      const bool real = real_m == nullptr || real_m[t] != 0;
      if (t == 0 || starts[t] != 0 || !real) {
        start = static_cast<int32_t>(t);
        s.len[t] = 0;
        s.ok[t] = 1;
      }
      s.ws[t] = start;
      s.len[start] += 1;
      s.ok[start] &= cand[t];
    }
  }
  if (p.count) {
    const int64_t n = n_cand == 0 ? 0 : std::min<int64_t>(n_cand, std::max<int32_t>(1, p.table[n_real]));
    if (!words) {
      select_prefix(T, n, bits, s, [&](int64_t t) { return static_cast<int32_t>(cand[t] && n > 0); });
    } else {
      select_prefix(T, n, bits, s, [&](int64_t t) {
        return static_cast<int32_t>(s.ws[t] == t && s.ok[t] && s.len[t] <= n) * s.len[t];
      });
      for (int64_t t = 0; t < T; ++t) s.sel[t] = s.sel[s.ws[t]];  // ws[t] <= t: the start is already final
    }
  } else if (words) {
    for (int64_t t = 0; t < T; ++t) {
      const int32_t w = s.ws[t];
      s.sel[t] = s.ok[w] && static_cast<int64_t>(s.x0[w] >> 8) < p.sel_thr;
    }
  } else {
    const uint32_t* __restrict x0 = s.x0.data();
    const uint32_t sel_thr = static_cast<uint32_t>(p.sel_thr);
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) s.sel[t] = cand[t] & ((x0[t] >> 8) < sel_thr);
  }
  const uint32_t* __restrict x1 = s.x1.data();
  const uint32_t* __restrict x2 = s.x2.data();
  const uint8_t* __restrict sel = s.sel.data();
  const uint64_t n_random = static_cast<uint64_t>(p.n_random);
  const uint32_t mask_thr = static_cast<uint32_t>(p.mask_thr), rand_thr = static_cast<uint32_t>(p.rand_thr);
  const id_t mask_id = static_cast<id_t>(p.mask_token_id);
#pragma omp simd
  for (int64_t t = 0; t < T; ++t) {
    const id_t id = ids[t];
    const uint32_t u = x1[t] >> 8;
    const id_t r = static_cast<id_t>((static_cast<uint64_t>(x2[t]) * n_random) >> 32);
    const id_t repl = u < mask_thr ? mask_id : (u < rand_thr ? r : id);
    out[t] = sel[t] ? repl : id;
    labels[t] = sel[t] ? static_cast<int64_t>(id) : kIgnoreIndex;
    masked[t] = sel[t] != 0;
  }
  // Random tokens (rare) step past the sorted specials: a scalar fix-up keeps the loop above vectorised.
  if (n_sp > 0 && rand_thr > mask_thr) {
    for (int64_t t = 0; t < T; ++t) {
      const uint32_t u = x1[t] >> 8;
      if (!sel[t] || u < mask_thr || u >= rand_thr) continue;
      int64_t r = static_cast<int64_t>((static_cast<uint64_t>(x2[t]) * n_random) >> 32);
      for (int64_t k = 0; k < n_sp; ++k) r += r >= sp[k];
      out[t] = static_cast<id_t>(r);
    }
  }
}

// Returns (input_ids', labels int64, masked bool), all [B, T].
std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_tokens(
    const at::Tensor& input_ids, const c10::optional<at::Tensor>& attention_mask,
    const c10::optional<at::Tensor>& word_starts, const at::Tensor& specials, const at::Tensor& count_table,
    int64_t seed, int64_t mask_token_id, int64_t n_random, int64_t sel_thr, int64_t mask_thr, int64_t rand_thr,
    bool count) {
  TORCH_CHECK(input_ids.dim() == 2 && input_ids.is_contiguous(), "mask_tokens: input_ids must be contiguous [B, T]");
  TORCH_CHECK(specials.scalar_type() == at::kLong && specials.is_contiguous(), "mask_tokens: specials must be int64");
  TORCH_CHECK(count_table.scalar_type() == at::kInt && count_table.is_contiguous(),
              "mask_tokens: count_table must be int32");
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  TORCH_CHECK(!count || count_table.numel() >= T + 1, "mask_tokens: count_table must hold T + 1 entries");
  for (const auto* m : {&attention_mask, &word_starts}) {
    if (m->has_value()) {
      TORCH_CHECK((*m)->scalar_type() == at::kByte && (*m)->is_contiguous() && (*m)->sizes() == input_ids.sizes(),
                  "mask_tokens: attention_mask / word_starts must be contiguous uint8 [B, T]");
    }
  }
  at::Tensor out = at::empty_like(input_ids);
  at::Tensor labels = at::empty(input_ids.sizes(), input_ids.options().dtype(at::kLong));
  at::Tensor masked = at::empty(input_ids.sizes(), input_ids.options().dtype(at::kBool));
  if (B * T == 0) return {out, labels, masked};
  const Params p{static_cast<uint64_t>(seed), mask_token_id, n_random, sel_thr, mask_thr, rand_thr, count,
                 specials.data_ptr<int64_t>(), specials.numel(), count_table.data_ptr<int32_t>()};
  const uint8_t* am = attention_mask.has_value() ? attention_mask->data_ptr<uint8_t>() : nullptr;
  const uint8_t* ws = word_starts.has_value() ? word_starts->data_ptr<uint8_t>() : nullptr;
  EF_DISPATCH_IDS(input_ids.scalar_type(), "mask_tokens", [&] {
    const id_t* ids = input_ids.data_ptr<id_t>();
    id_t* o = out.data_ptr<id_t>();
    int64_t* l = labels.data_ptr<int64_t>();
    bool* m = masked.data_ptr<bool>();
    // Grain: enough rows per task to amortise the scratch, few enough to balance two or more threads.
    const int64_t grain = std::max<int64_t>(1, 4096 / T);
    const int bits = bucket_bits(T);
    electra_fast::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      Scratch s;
      s.resize(T, bits);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t off = b * T;
        mask_row<id_t>(ids + off, am ? am + off : nullptr, ws ? ws + off : nullptr, o + off, l + off, m + off, b, T,
                       bits, p, s);
      }
    });
  });
  return {out, labels, masked};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  m.def("mask_tokens(Tensor input_ids, Tensor? attention_mask, Tensor? word_starts, Tensor specials, "
        "Tensor count_table, int seed, int mask_token_id, int n_random, int sel_thr, int mask_thr, int rand_thr, "
        "bool count) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(electra_fast_cpp, CPU, m) { m.impl("mask_tokens", &mask_tokens); }

}  // namespace electra_fast
