// AVX-512 dot / axpy for the shared attention body (head dims that are multiples of 16
// run fully vectorized; the remainder uses masked loads).
#include <immintrin.h>

#include <cmath>

#include "cpu/attention_impl.h"

namespace dovetail::avx512 {

namespace {

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

template <typename KvT>
struct Kern {
  static float dot(const float* q, const KvT* k, int64_t Dh) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < Dh; i += 16) {
      const __mmask16 m = Dh - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Dh - i)) - 1);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), load16(k + i, m), acc);
    }
    return _mm512_reduce_add_ps(acc);
  }
  static void axpy(float* out, float p, const KvT* v, int64_t Dh) {
    const __m512 pv = _mm512_set1_ps(p);
    for (int64_t i = 0; i < Dh; i += 16) {
      const __mmask16 m = Dh - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Dh - i)) - 1);
      _mm512_mask_storeu_ps(out + i, m, _mm512_fmadd_ps(pv, load16(v + i, m), _mm512_maskz_loadu_ps(m, out + i)));
    }
  }
  static float exp(float x) { return std::exp(x); }
};

}  // namespace

void attention_one(const AttentionArgs& a, int64_t t, int64_t h, float* scores) {
  attention_one_dispatch<Kern>(a, t, h, scores);
}

}  // namespace dovetail::avx512
