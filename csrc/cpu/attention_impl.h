// The attention body for one (token, head), shared by the scalar and AVX2 paths. `Kern`
// supplies
//   void  tile_scores(const float* q, const KvT* tiles, int64_t n, int64_t Dh, float scale,
//                     float* out)   scores of the n * kKTile keys of n key tiles, times scale
//   void  axpy(float* out, float p, const KvT* v, int64_t Dh)     out += p * v
//   float exp(float)
// Scores are computed for every slot up to the token's last visible one, then the visible
// ones are listed in slot order (prefix, then ancestors), so a token sees the same sequence
// of operations whether its ancestors are committed or in the batch.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/ops.h"
#include "cpu/quant_common.h"

namespace dovetail {

template <typename KvT, typename Kern>
inline void attention_one_impl(const AttentionArgs& a, int64_t t, int64_t h, float* scores) {
  const int64_t Dh = a.Dh, group = a.H / a.KV, kvh = h / group;
  const float* q = a.q + (t * a.H + h) * Dh;
  const KvT* kbase = static_cast<const KvT*>(a.k) + kvh * a.S * Dh;
  const KvT* vbase = static_cast<const KvT*>(a.v) + kvh * a.S * Dh;
  const uint64_t* bits = a.anc + t * a.anc_words;
  const float scale = 1.0f / std::sqrt((float)Dh);
  const int64_t last = a.n_prev + t;

  // Pass 1: scores of every slot up to the last visible one; keep the visible ones.
  Kern::tile_scores(q, kbase, attention_stride(a.n_past + last + 1) / kKTile, Dh, scale, scores);
  int64_t n = a.n_past;
  for (int64_t j = 0; j <= last; ++j)
    if ((bits[j >> 6] >> (j & 63)) & 1u) scores[n++] = scores[a.n_past + j];
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = scores[i] > mx ? scores[i] : mx;
  // Pass 2: softmax weights (sequential sum keeps the order fixed).
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    scores[i] = Kern::exp(scores[i] - mx);
    sum += scores[i];
  }
  const float inv = 1.0f / sum;
  // Pass 3: weighted sum of values.
  float* out = a.out + (t * a.H + h) * Dh;
  std::memset(out, 0, sizeof(float) * Dh);
  n = 0;
  for (int64_t s = 0; s < a.n_past; ++s) Kern::axpy(out, scores[n++] * inv, vbase + s * Dh, Dh);
  for (int64_t j = 0; j <= last; ++j) {
    if (!((bits[j >> 6] >> (j & 63)) & 1u)) continue;
    Kern::axpy(out, scores[n++] * inv, vbase + (a.n_past + j) * Dh, Dh);
  }
}

template <template <typename> class Kern>
inline void attention_one_dispatch(const AttentionArgs& a, int64_t t, int64_t h, float* scores) {
  if (a.kv_type == KvType::F32)
    attention_one_impl<float, Kern<float>>(a, t, h, scores);
  else
    attention_one_impl<uint16_t, Kern<uint16_t>>(a, t, h, scores);
}

// The value rows a weighted sum visits, in order: slot(i) = base + (idx ? idx[i] : i).
struct ValueSlots {
  int64_t base, n;
  const int32_t* idx;
  int64_t operator()(int64_t i) const { return base + (idx ? idx[i] : i); }
};

// f(std::integral_constant<int, nv>{}) for 1 <= nv <= 8.
template <typename F>
inline void with_nv(int64_t nv, F&& f) {
  switch (nv) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// Rows 0 .. nr - 1 of out (each offset by f0) and p in groups of RG sharing one pass over
// the values: f(std::integral_constant<int, RG>{}, o, pr) for each full group, then
// f(std::integral_constant<int, 1>{}, o, pr) for each row left over.
template <int RG, typename F>
inline void for_row_groups(float* const* out, const float* const* p, int64_t nr, int64_t f0, F&& f) {
  float* o[RG];
  int64_t r = 0;
  for (; r + RG <= nr; r += RG) {
    for (int j = 0; j < RG; ++j) o[j] = out[r + j] + f0;
    f(std::integral_constant<int, RG>{}, o, p + r);
  }
  if constexpr (RG > 1) {
    for (; r < nr; ++r) {
      o[0] = out[r] + f0;
      f(std::integral_constant<int, 1>{}, o, p + r);
    }
  }
}

// The SIMD paths' driver for a run of query rows r0 .. r1 of KV head kvh (at most 16), row
// r = (token r / G, head kvh * G + r % G), G = H / KV. `Rows` supplies
//   kTiles, scores<KT>(q, nr, tiles, Dh, scale, out)   out[r][16 j + l] for the KT key tiles
//       at `tiles`, one FMA chain per (row, key) in feature order (each tile read once for
//       all nr rows); KT is kTiles or 1
//   softmax(s, n)                                   in place over a row's n listed scores
//   kLanes, values<NV>(out, p, nr, vbase, slots, Dh, f0)   features [f0, f0 + NV kLanes)
//       (or to Dh) of out[r] += p[r][i] v[slots(i)] for i = 0 .. slots.n - 1 in order (each
//       value row read once for all nr rows); NV <= 8
// Scores are computed for every slot, then each row's visible scratch keys are moved up
// behind its prefix, so a row's list, and every sum over it, is the same whatever the batch.
template <typename KvT, typename Rows>
void attention_rows_run(const AttentionArgs& a, int64_t kvh, int64_t r0, int64_t r1) {
  const int64_t Dh = a.Dh, G = a.H / a.KV, R = r1 - r0, W = a.n_prev + a.T;
  const int64_t st = attention_stride(a.n_past + W);
  const KvT* kbase = static_cast<const KvT*>(a.k) + kvh * a.S * Dh;
  const KvT* vbase = static_cast<const KvT*>(a.v) + kvh * a.S * Dh;
  static thread_local Buffer<float> score_buf;
  static thread_local std::vector<int32_t> vis;  // visible scratch rows, per row
  float* scores = tls_scratch(score_buf, (size_t)(R * st));
  vis.resize((size_t)(R * W));
  const float* q[16];
  float* sc[16];
  float* out[16];
  const int32_t* vr[16];
  int64_t nvis[16];
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = (r0 + r) / G, h = kvh * G + (r0 + r) % G;
    q[r] = a.q + (t * a.H + h) * Dh;
    out[r] = a.out + (t * a.H + h) * Dh;
    sc[r] = scores + r * st;
    vr[r] = vis.data() + r * W;
    const uint64_t* bits = a.anc + t * a.anc_words;
    int64_t n = 0;
    for (int64_t j = 0; j <= a.n_prev + t; ++j)
      if ((bits[j >> 6] >> (j & 63)) & 1u) vis[r * W + n++] = (int32_t)j;
    nvis[r] = n;
  }
  const float scale = 1.0f / std::sqrt((float)Dh);
  const int64_t tiles = st / kKTile, tile = Dh * kKTile;
  float* o[16];
  int64_t i0 = 0;
  auto at = [&](int64_t i) {
    for (int64_t r = 0; r < R; ++r) o[r] = sc[r] + i * kKTile;
    return o;
  };
  for (; i0 + Rows::kTiles <= tiles; i0 += Rows::kTiles)
    Rows::template scores<Rows::kTiles>(q, R, kbase + i0 * tile, Dh, scale, at(i0));
  for (; i0 < tiles; ++i0) Rows::template scores<1>(q, R, kbase + i0 * tile, Dh, scale, at(i0));
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = 0; i < nvis[r]; ++i) sc[r][a.n_past + i] = sc[r][a.n_past + vr[r][i]];
    Rows::softmax(sc[r], a.n_past + nvis[r]);
    std::memset(out[r], 0, sizeof(float) * Dh);
  }
  // The prefix for all rows at once, then each row's visible scratch rows in order; the
  // features in chunks of at most 8 registers per row.
  auto values = [&](float* const* o, const float* const* p, int64_t nr, const ValueSlots& slots) {
    for (int64_t f0 = 0; f0 < Dh; f0 += 8 * Rows::kLanes) {
      const int64_t nv = std::min<int64_t>(8, (Dh - f0 + Rows::kLanes - 1) / Rows::kLanes);
      with_nv(nv, [&](auto NV) { Rows::template values<decltype(NV)::value>(o, p, nr, vbase, slots, Dh, f0); });
    }
  };
  values(out, sc, R, ValueSlots{0, a.n_past, nullptr});
  for (int64_t r = 0; r < R; ++r) {
    const float* p = sc[r] + a.n_past;
    values(out + r, &p, 1, ValueSlots{a.n_past, nvis[r], vr[r]});
  }
}

}  // namespace dovetail
