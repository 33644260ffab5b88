// AVX2 tree attention: the row-run kernels (attention_impl.h's driver; keys in transposed
// 16-slot tiles, two 8-lane halves per tile) when Dh is a multiple of 8, and key-tile scores /
// axpy for the per-(token, head) body otherwise.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "cpu/attention_impl.h"
#include "cpu/x86/avx2_common.h"

namespace dovetail::avx2 {

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline float load1(float x) { return x; }
inline float load1(uint16_t x) { return bf16_to_fp32(x); }

// Scores of KT key tiles for RG query rows (two 8-lane halves per tile): out[r][16 j + l] =
// scale * sum_d q[r][d] k[16 j + l][d], one FMA chain per (row, key) in feature order.
template <typename KvT, int RG, int KT>
inline void tile_scores_rows(const float* const* q, const KvT* tiles, int64_t Dh, float scale, float* const* out) {
  __m256 acc[RG][KT][2];
  for (int r = 0; r < RG; ++r)
    for (int j = 0; j < KT; ++j) acc[r][j][0] = acc[r][j][1] = _mm256_setzero_ps();
  const int64_t ts = Dh * kKTile;
  for (int64_t d = 0; d < Dh; ++d) {
    __m256 k[KT][2];
    for (int j = 0; j < KT; ++j) {
      k[j][0] = load8(tiles + j * ts + d * kKTile);
      k[j][1] = load8(tiles + j * ts + d * kKTile + 8);
    }
    for (int r = 0; r < RG; ++r) {
      const __m256 b = _mm256_broadcast_ss(q[r] + d);
      for (int j = 0; j < KT; ++j) {
        acc[r][j][0] = _mm256_fmadd_ps(b, k[j][0], acc[r][j][0]);
        acc[r][j][1] = _mm256_fmadd_ps(b, k[j][1], acc[r][j][1]);
      }
    }
  }
  const __m256 sc = _mm256_set1_ps(scale);
  for (int r = 0; r < RG; ++r)
    for (int j = 0; j < KT; ++j) {
      _mm256_storeu_ps(out[r] + j * kKTile, _mm256_mul_ps(acc[r][j][0], sc));
      _mm256_storeu_ps(out[r] + j * kKTile + 8, _mm256_mul_ps(acc[r][j][1], sc));
    }
}

template <typename KvT>
struct Kern {
  // Two tiles at a time: four independent 8-lane FMA chains.
  static void tile_scores(const float* q, const KvT* tiles, int64_t n, int64_t Dh, float scale, float* out) {
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
      float* o = out + i * kKTile;
      tile_scores_rows<KvT, 1, 2>(&q, tiles + i * Dh * kKTile, Dh, scale, &o);
    }
    for (; i < n; ++i) {
      float* o = out + i * kKTile;
      tile_scores_rows<KvT, 1, 1>(&q, tiles + i * Dh * kKTile, Dh, scale, &o);
    }
  }
  static void axpy(float* out, float p, const KvT* v, int64_t Dh) {
    const __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= Dh; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, load8(v + i), _mm256_loadu_ps(out + i)));
    for (; i < Dh; ++i) out[i] += p * load1(v[i]);
  }
  static float exp(float x) { return std::exp(x); }
};

// out[r][0 .. 8 NV) += sum over i of p[r][i] v[slots(i)] (rows of ld values) for RG rows,
// sequentially in i.
template <typename KvT, int NV, int RG>
inline void weighted_values_rows(float* const* out, const float* const* p, const KvT* vbase, int64_t ld,
                                 const ValueSlots& slots) {
  // Unrolled whole around the key loop (see the AVX-512 twin).
  __m256 acc[RG][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm256_loadu_ps(out[r] + 8 * i);
  for (int64_t j = 0; j < slots.n; ++j) {
    const KvT* row = vbase + slots(j) * ld;
    __m256 v[NV];
    for (int i = 0; i < NV; ++i) v[i] = load8(row + 8 * i);
    for (int r = 0; r < RG; ++r) {
      const __m256 b = _mm256_broadcast_ss(p[r] + j);
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm256_fmadd_ps(b, v[i], acc[r][i]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out[r] + 8 * i, acc[r][i]);
}

template <typename KvT>
struct Rows {
  static constexpr int kTiles = 2;  // 8 independent chains for 2 rows
  template <int KT>
  static void scores(const float* const* q, int64_t nr, const KvT* tiles, int64_t Dh, float scale,
                     float* const* out) {
    int64_t r = 0;
    for (; r + 2 <= nr; r += 2) tile_scores_rows<KvT, 2, KT>(q + r, tiles, Dh, scale, out + r);
    if (r < nr) tile_scores_rows<KvT, 1, KT>(q + r, tiles, Dh, scale, out + r);
  }
  static float exp_sum(float* s, int64_t n, float* max) {
    const int64_t n8 = n / 8 * 8;
    float tail[8];
    for (int i = 0; i < 8; ++i) tail[i] = n8 + i < n ? s[n8 + i] : -INFINITY;
    __m256 mx = _mm256_loadu_ps(tail);
    for (int64_t i = 0; i < n8; i += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + i));
    float m8[8];
    _mm256_storeu_ps(m8, mx);
    float m = m8[0];
    for (int i = 1; i < 8; ++i) m = m8[i] > m ? m8[i] : m;
    *max = m;
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < n8; i += 8) {
      const __m256 e = x86::exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
      _mm256_storeu_ps(s + i, e);
      sum = _mm256_add_ps(sum, e);
    }
    const __m256 et = x86::exp_ps(_mm256_sub_ps(_mm256_loadu_ps(tail), mv));  // padding: exp(-inf) = 0
    sum = _mm256_add_ps(sum, et);
    _mm256_storeu_ps(tail, et);
    for (int64_t i = n8; i < n; ++i) s[i] = tail[i - n8];
    return x86::hsum256(sum);
  }
  static void merge(float* run, const float* rec, int64_t Dh) {
    const float m = std::max(run[0], rec[0]);
    float xy[8];
    _mm256_storeu_ps(xy, x86::exp_ps(_mm256_setr_ps(run[0] - m, rec[0] - m, 0, 0, 0, 0, 0, 0)));
    run[0] = m;
    run[1] = std::fma(rec[1], xy[1], run[1] * xy[0]);
    const __m256 x = _mm256_set1_ps(xy[0]), y = _mm256_set1_ps(xy[1]);
    for (int64_t d = 0; d < Dh; d += 8) {  // Dh is a multiple of 8 on this path
      const __m256 a = _mm256_mul_ps(_mm256_loadu_ps(run + 2 + d), x);
      _mm256_storeu_ps(run + 2 + d, _mm256_fmadd_ps(_mm256_loadu_ps(rec + 2 + d), y, a));
    }
  }
  static constexpr int kLanes = 8;
  // Features [f0, f0 + 8 NV) of every row; pairs of rows share each value load when the
  // accumulators fit in the 16 registers.
  template <int NV>
  static void values(float* const* out, const float* const* p, int64_t nr, const KvT* vbase, const ValueSlots& slots,
                     int64_t Dh, int64_t f0) {
    for_row_groups<NV <= 4 ? 2 : 1>(out, p, nr, f0, [&](auto rg, float* const* o, const float* const* pr) {
      weighted_values_rows<KvT, NV, decltype(rg)::value>(o, pr, vbase + f0, Dh, slots);
    });
  }
};

}  // namespace

void attention_one(const AttentionArgs& a, int64_t t, int64_t h, float* scores) {
  attention_one_dispatch<Kern>(a, t, h, scores);
}

void attention_rows(const AttentionArgs& a, int64_t kvh, int64_t r0, int64_t r1) {
  AttentionEntries<Rows>::rows(a, kvh, r0, r1);
}

void attention_chunk(const AttentionArgs& a, int64_t kvh, int64_t c, float* parts, int64_t nc, int64_t* counts) {
  AttentionEntries<Rows>::chunk(a, kvh, c, parts, nc, counts);
}

void attention_merge(const AttentionArgs& a, float* parts, int64_t nc, const int64_t* counts) {
  AttentionEntries<Rows>::merge(a, parts, nc, counts);
}

}  // namespace dovetail::avx2
