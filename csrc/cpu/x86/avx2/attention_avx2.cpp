// AVX2 key-tile scores / axpy for the shared attention body.
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

template <typename KvT>
struct Kern {
  // Two tiles at a time: four independent 8-lane FMA chains.
  static void tile_scores(const float* q, const KvT* tiles, int64_t n, int64_t Dh, float scale, float* out) {
    const __m256 sc = _mm256_set1_ps(scale);
    const int64_t ts = Dh * kKTile;
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
      const KvT* k = tiles + i * ts;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < Dh; ++d) {
        const __m256 b = _mm256_broadcast_ss(q + d);
        a0 = _mm256_fmadd_ps(b, load8(k + d * kKTile), a0);
        a1 = _mm256_fmadd_ps(b, load8(k + d * kKTile + 8), a1);
        a2 = _mm256_fmadd_ps(b, load8(k + ts + d * kKTile), a2);
        a3 = _mm256_fmadd_ps(b, load8(k + ts + d * kKTile + 8), a3);
      }
      float* o = out + i * kKTile;
      _mm256_storeu_ps(o, _mm256_mul_ps(a0, sc));
      _mm256_storeu_ps(o + 8, _mm256_mul_ps(a1, sc));
      _mm256_storeu_ps(o + 16, _mm256_mul_ps(a2, sc));
      _mm256_storeu_ps(o + 24, _mm256_mul_ps(a3, sc));
    }
    for (; i < n; ++i) {
      const KvT* k = tiles + i * ts;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0;
      for (int64_t d = 0; d < Dh; ++d) {
        const __m256 b = _mm256_broadcast_ss(q + d);
        a0 = _mm256_fmadd_ps(b, load8(k + d * kKTile), a0);
        a1 = _mm256_fmadd_ps(b, load8(k + d * kKTile + 8), a1);
      }
      _mm256_storeu_ps(out + i * kKTile, _mm256_mul_ps(a0, sc));
      _mm256_storeu_ps(out + i * kKTile + 8, _mm256_mul_ps(a1, sc));
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

}  // namespace

void attention_one(const AttentionArgs& a, int64_t t, int64_t h, float* scores) {
  attention_one_dispatch<Kern>(a, t, h, scores);
}

}  // namespace dovetail::avx2
