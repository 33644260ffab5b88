// AVX2 dot / axpy for the shared attention body.
#include <immintrin.h>

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

using x86::hsum256;

template <typename KvT>
struct Kern {
  static float dot(const float* q, const KvT* k, int64_t Dh) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= Dh; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), acc);
    float s = hsum256(acc);
    for (; i < Dh; ++i) s += q[i] * load1(k[i]);
    return s;
  }
  static void axpy(float* out, float p, const KvT* v, int64_t Dh) {
    const __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= Dh; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, load8(v + i), _mm256_loadu_ps(out + i)));
    for (; i < Dh; ++i) out[i] += p * load1(v[i]);
  }
  static float exp(float x) { return std::exp(x); }
};

}  // namespace

void attention_one(const AttentionArgs& a, int64_t t, int64_t h, float* scores) {
  attention_one_dispatch<Kern>(a, t, h, scores);
}

}  // namespace dovetail::avx2
