// AVX2 helpers shared by the ISA files (cpu/x86/avx2 and cpu/x86/avx512, both built with
// -mavx2). Include only from those files.
#pragma once
#include <immintrin.h>

namespace dovetail::x86 {

// Sum of the 8 lanes, always in the same order.
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// dst[j, i] = src[i, j] for a rows x cols block: 8 x 8 tiles transposed in registers
// (unpack, shuffle, 128-bit lane swap), edges scalar.
inline void transpose_f32(const float* src, long lds, int rows, int cols, float* dst, long ldd) {
  const int r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int i = 0; i < r8; i += 8)
    for (int j = 0; j < c8; j += 8) {
      __m256 r[8], t[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + (i + k) * lds + j);
      for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
      }
      for (int k = 0; k < 8; k += 4) {
        r[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int k = 0; k < 4; ++k) {
        _mm256_storeu_ps(dst + (j + k) * ldd + i, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
        _mm256_storeu_ps(dst + (j + k + 4) * ldd + i, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
      }
    }
  for (int i = 0; i < rows; ++i)
    for (int j = (i < r8 ? c8 : 0); j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
}

}  // namespace dovetail::x86
