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
#include <cmath>
#include <cstring>

#include "cpu/ops.h"

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

}  // namespace dovetail
