// AVX2 reductions over one row of a vocabulary: argmax, and the shifted exponentials with
// their sum (the softmax normalizer) for sampling and the draft's top-k.
#include <immintrin.h>

#include "cpu/ops.h"
#include "cpu/x86/avx2_common.h"

namespace dovetail::avx2 {

int64_t argmax(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(x[0]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float mx = lanes[0];
  for (int j = 1; j < 8; ++j) mx = lanes[j] > mx ? lanes[j] : mx;
  for (int64_t j = i; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
  const __m256 target = _mm256_set1_ps(mx);
  for (i = 0; i + 8 <= n; i += 8) {
    const int eq = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
    if (eq) return i + __builtin_ctz((unsigned)eq);
  }
  for (; i < n; ++i)
    if (x[i] == mx) return i;
  return 0;
}

bool exp_shift_sum(const float* x, int64_t n, float m, float s, float* e, double* lanes) {
  const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(s), vmin = _mm256_set1_ps(exp_poly::kMin);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256d acc[4];
  for (int j = 0; j < 4; ++j) acc[j] = _mm256_loadu_pd(lanes + 4 * j);
  int bad = 0;
  // 16 values per round in two halves, so that value i always lands in lane i % 16 (the
  // scalar and AVX-512 paths' order of additions).
  for (int64_t i = 0; i < n; i += 16) {
    for (int h = 0; h < 2; ++h) {
      const int64_t j = i + 8 * h, left = n - j;
      const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(left < 8 ? (left < 0 ? 0 : left) : 8)), iota);
      const __m256 kf = _mm256_castsi256_ps(k);
      const __m256 z = _mm256_mul_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, k), vm), vs);
      bad |= _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(z, z, _CMP_UNORD_Q), kf));
      const __m256 v = _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(z, vmin, _CMP_GE_OQ), kf), x86::exp_ps(z));
      if (e) _mm256_maskstore_ps(e + j, k, v);
      acc[2 * h] = _mm256_add_pd(acc[2 * h], _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
      acc[2 * h + 1] = _mm256_add_pd(acc[2 * h + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
  }
  for (int j = 0; j < 4; ++j) _mm256_storeu_pd(lanes + 4 * j, acc[j]);
  return bad == 0;
}

}  // namespace dovetail::avx2
