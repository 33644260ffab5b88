// AVX-512 tree attention: the kernels of attention_impl.h's chunked driver. Per row:
//   s_i = (q . k_i) / sqrt(Dh)      over the visible keys i (prefix, then ancestors, in slot order)
//   p_i = exp(s_i - max) / sum      out = sum_i p_i v_i
// computed in chunks of keys whose softmax states are merged in order (attention_impl.h).
// Keys come in tiles of 16 slots, transposed (ops.h), so the scores of 16 keys are 16 lanes
// of one FMA chain over the features: no horizontal sums, and each tile is loaded once for
// up to 4 rows. The weighted sum of values also serves up to 4 rows per value load.
// Every row is computed by the same instruction sequence whatever its neighbours, the batch
// size or the thread split (batch invariance): a score is one sequential FMA chain (the
// scalar path's too); a chunk's exp sum runs over its part of the compacted list of visible
// keys in 16-wide lanes from the chunk's start; its weighted sum of values is sequential in
// that list's order.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/attention_impl.h"
#include "cpu/quant_common.h"
#include "cpu/x86/avx512_common.h"

namespace dovetail::avx512 {

namespace {

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

using x86::exp_ps;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

inline __m256 fold(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_castps512_ps256(_mm512_shuffle_f32x4(v, v, 0xEE)));
}
inline __m256 hsum8(const __m256* v) {
  const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 a = _mm256_hadd_ps(s01, s23), b = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Scores of KT key tiles (from `tiles`) for RG query rows: out[r][16 j + l] = scale *
// sum_d q[r][d] k[16 j + l][d], one FMA chain per (row, key) in feature order.
template <typename KvT, int RG, int KT>
inline void tile_scores_rows(const float* const* q, const KvT* tiles, int64_t Dh, float scale, float* const* out) {
  __m512 acc[RG][KT];
  for (int r = 0; r < RG; ++r)
    for (int j = 0; j < KT; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t ts = Dh * kKTile;
  for (int64_t d = 0; d < Dh; ++d) {
    __m512 k[KT];
    for (int j = 0; j < KT; ++j) k[j] = load16(tiles + j * ts + d * kKTile);
    for (int r = 0; r < RG; ++r) {
      const __m512 b = _mm512_set1_ps(q[r][d]);
      for (int j = 0; j < KT; ++j) acc[r][j] = _mm512_fmadd_ps(b, k[j], acc[r][j]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < RG; ++r)
    for (int j = 0; j < KT; ++j) _mm512_storeu_ps(out[r] + j * kKTile, _mm512_mul_ps(acc[r][j], sc));
}

// out[r][0 .. width) += sum over i of p[r][i] v[slots(i)] (rows of ld values) for RG rows,
// sequentially in i; width <= 16 NV.
template <typename KvT, int NV, int RG>
inline void weighted_values_rows(float* const* out, const float* const* p, const KvT* vbase, int64_t ld,
                                 int64_t width, const ValueSlots& slots) {
  __mmask16 m[NV];
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) m[i] = tail_mask(width - 16 * i);
  // The loops around the key loop are unrolled whole: indexed with a loop counter there,
  // the accumulators got a stack copy that GCC then stored on every key (3x slower).
  __m512 acc[RG][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_maskz_loadu_ps(m[i], out[r] + 16 * i);
  // Masked loads only where the width needs them: the value rows come from memory, and
  // with every load masked the loop ran a third slower on cold rows.
  auto run = [&](auto full) {
    for (int64_t j = 0; j < slots.n; ++j) {
      const KvT* row = vbase + slots(j) * ld;
      __m512 v[NV];
      for (int i = 0; i < NV; ++i) v[i] = decltype(full)::value ? load16(row + 16 * i) : load16(row + 16 * i, m[i]);
      for (int r = 0; r < RG; ++r) {
        const __m512 b = _mm512_set1_ps(p[r][j]);
        for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_fmadd_ps(b, v[i], acc[r][i]);
      }
    }
  };
  if (width >= 16 * NV)
    run(std::true_type{});
  else
    run(std::false_type{});
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) _mm512_mask_storeu_ps(out[r] + 16 * i, m[i], acc[r][i]);
}

template <typename KvT>
struct Rows {
  static constexpr int kTiles = 4;  // 16 independent chains for 4 rows
  template <int KT>
  static void scores(const float* const* q, int64_t nr, const KvT* tiles, int64_t Dh, float scale,
                     float* const* out) {
    int64_t r = 0;
    for (; r + 4 <= nr; r += 4) tile_scores_rows<KvT, 4, KT>(q + r, tiles, Dh, scale, out + r);
    for (; r < nr; ++r) tile_scores_rows<KvT, 1, KT>(q + r, tiles, Dh, scale, out + r);
  }
  static float exp_sum(float* s, int64_t n, float* max) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 16)
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail_mask(n - i), s + i));
    *max = _mm512_reduce_max_ps(mx);
    const __m512 mv = _mm512_set1_ps(*max);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + i), mv)));
      _mm512_mask_storeu_ps(s + i, m, e);
      sum = _mm512_add_ps(sum, e);
    }
    __m256 f[8] = {fold(sum), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    return _mm256_cvtss_f32(hsum8(f));
  }
  static void merge(float* run, const float* rec, int64_t Dh) {
    const float m = std::max(run[0], rec[0]);
    float xy[16];
    _mm512_storeu_ps(xy, exp_ps(_mm512_setr_ps(run[0] - m, rec[0] - m, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)));
    run[0] = m;
    run[1] = std::fma(rec[1], xy[1], run[1] * xy[0]);
    const __m512 x = _mm512_set1_ps(xy[0]), y = _mm512_set1_ps(xy[1]);
    for (int64_t d = 0; d < Dh; d += 16) {
      const __mmask16 k = tail_mask(Dh - d);
      const __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, run + 2 + d), x);
      _mm512_mask_storeu_ps(run + 2 + d, k, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, rec + 2 + d), y, a));
    }
  }
  static constexpr int kLanes = 16;
  // Features [f0, f0 + 16 NV) (or to Dh) of every row; groups of 4 rows (2 when NV > 4)
  // share each value load.
  template <int NV>
  static void values(float* const* out, const float* const* p, int64_t nr, const KvT* vbase, const ValueSlots& slots,
                     int64_t Dh, int64_t f0) {
    for_row_groups<NV <= 4 ? 4 : 2>(out, p, nr, f0, [&](auto rg, float* const* o, const float* const* pr) {
      weighted_values_rows<KvT, NV, decltype(rg)::value>(o, pr, vbase + f0, Dh, Dh - f0, slots);
    });
  }
};

}  // namespace

void attention_rows(const AttentionArgs& a, int64_t kvh, int64_t r0, int64_t r1) {
  AttentionEntries<Rows>::rows(a, kvh, r0, r1);
}

void attention_chunk(const AttentionArgs& a, int64_t kvh, int64_t c, float* parts, int64_t nc, int64_t* counts) {
  AttentionEntries<Rows>::chunk(a, kvh, c, parts, nc, counts);
}

void attention_merge(const AttentionArgs& a, float* parts, int64_t nc, const int64_t* counts) {
  AttentionEntries<Rows>::merge(a, parts, nc, counts);
}

}  // namespace dovetail::avx512
