// AVX-512 reductions over one row of a vocabulary: argmax, and the shifted exponentials
// with their sum (the softmax normalizer) for sampling and the draft's top-k.
#include <immintrin.h>

#include "cpu/ops.h"
#include "cpu/x86/avx512_common.h"

namespace dovetail::avx512 {

int64_t argmax(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(x[0]);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
  float mx = _mm512_reduce_max_ps(m);
  for (int64_t j = i; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
  const __m512 target = _mm512_set1_ps(mx);
  for (i = 0; i + 16 <= n; i += 16) {
    const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), target, _CMP_EQ_OQ);
    if (eq) return i + __builtin_ctz((unsigned)eq);
  }
  for (; i < n; ++i)
    if (x[i] == mx) return i;
  return 0;
}

bool exp_shift_sum(const float* x, int64_t n, float m, float s, float* e, double* lanes) {
  const __m512 vm = _mm512_set1_ps(m), vs = _mm512_set1_ps(s), vmin = _mm512_set1_ps(exp_poly::kMin);
  __m512d lo = _mm512_loadu_pd(lanes), hi = _mm512_loadu_pd(lanes + 8);
  __mmask16 bad = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    const __m512 z = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vm), vs);
    bad |= _mm512_mask_cmp_ps_mask(k, z, z, _CMP_UNORD_Q);
    const __m512 v = _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(k, z, vmin, _CMP_GE_OQ), x86::exp_ps(z));
    if (e) _mm512_mask_storeu_ps(e + i, k, v);
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
  }
  _mm512_storeu_pd(lanes, lo);
  _mm512_storeu_pd(lanes + 8, hi);
  return bad == 0;
}

}  // namespace dovetail::avx512
