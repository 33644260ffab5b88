// AVX2 + FMA versions of the DaViT tile routines (built with -mavx2 -mfma only here).
// GEMM micro-tile: 6 rows x 16 columns (two ymm accumulators per row, 12 in all; 16 ymm
// registers leave room for two B vectors and one broadcast). Column tails use maskload.
#include "cpu/x86/avx2_common.h"
#include <immintrin.h>

#include <algorithm>

#include "cpu/davit.h"
#include "cpu/davit_rows.h"

namespace dovetail::davit::avx2 {

namespace {

// exp(x) to ~1 ulp: range reduction by ln2, Cephes degree-5 polynomial, 2^n via the exponent.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // n is in [-126, 128) after the clamp, so 2^n is a normal float built from its exponent bits.
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Exact-form GELU; erf by Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7), as in the AVX-512 file.
inline __m256 gelu_ps(__m256 x) {
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 signbit = _mm256_set1_ps(-0.f);
  const __m256 az = _mm256_andnot_ps(signbit, z);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.f),
                                 _mm256_fmadd_ps(az, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = exp_ps(_mm256_mul_ps(_mm256_xor_ps(az, signbit), az));
  const __m256 erf_abs = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.f));
  const __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(z, signbit));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.f), erf));
}

// Lane mask for the first n (0..8) lanes.
inline __m256i tail_mask(int n) {
  n = std::clamp(n, 0, 8);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <int MR, bool UNIT>
void micro(int nr, const GemmTile& t, int i0, int j0) {
  const __m256i m0 = tail_mask(nr), m1 = tail_mask(nr - 8);
  const bool full = nr == 16;
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  const float* ap[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) ap[i] = t.a[i0 + i];
  const float* b = t.b_panel ? t.b + (j0 / kPanel) * t.b_panel + j0 % kPanel : t.b + j0;
  const long ldb = t.b_panel ? kPanel : t.ldb;
  // Unit-stride A (every projection) lets the compiler fold k into the broadcast address.
  const long cs = UNIT ? 1 : t.a_cs;
  const int K = t.k;  // a local bound: no reload of t.k on every step
  if (full) {
    for (int k = 0; k < K; ++k) {
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const __m256 av = _mm256_broadcast_ss(ap[i] + k * cs);
        acc0[i] = _mm256_fmadd_ps(av, b0, acc0[i]);
        acc1[i] = _mm256_fmadd_ps(av, b1, acc1[i]);
      }
      b += ldb;
    }
  } else {
    for (int k = 0; k < K; ++k) {
      const __m256 b0 = _mm256_maskload_ps(b, m0), b1 = _mm256_maskload_ps(b + 8, m1);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const __m256 av = _mm256_broadcast_ss(ap[i] + k * cs);
        acc0[i] = _mm256_fmadd_ps(av, b0, acc0[i]);
        acc1[i] = _mm256_fmadd_ps(av, b1, acc1[i]);
      }
      b += ldb;
    }
  }
  __m256 bias0 = _mm256_setzero_ps(), bias1 = _mm256_setzero_ps();
  if (t.bias) {
    bias0 = _mm256_maskload_ps(t.bias + j0, m0);
    bias1 = _mm256_maskload_ps(t.bias + j0 + 8, m1);
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    __m256 v0 = _mm256_add_ps(acc0[i], bias0), v1 = _mm256_add_ps(acc1[i], bias1);
    if (t.res) {
      v0 = _mm256_add_ps(v0, _mm256_maskload_ps(t.res[i0 + i] + j0, m0));
      v1 = _mm256_add_ps(v1, _mm256_maskload_ps(t.res[i0 + i] + j0 + 8, m1));
    }
    if (t.gelu) {
      v0 = gelu_ps(v0);
      v1 = gelu_ps(v1);
    }
    float* c = t.c[i0 + i] + j0;
    _mm256_maskstore_ps(c, m0, v0);
    _mm256_maskstore_ps(c + 8, m1, v1);
  }
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace

template <bool UNIT>
void gemm_tile_impl(const GemmTile& t) {
  constexpr int MR = 6, NR = 16;
  for (int j0 = 0; j0 < t.n; j0 += NR) {
    const int nr = std::min(NR, t.n - j0);
    int i0 = 0;
    for (; i0 + MR <= t.m; i0 += MR) micro<MR, UNIT>(nr, t, i0, j0);
    switch (t.m - i0) {
      case 5: micro<5, UNIT>(nr, t, i0, j0); break;
      case 4: micro<4, UNIT>(nr, t, i0, j0); break;
      case 3: micro<3, UNIT>(nr, t, i0, j0); break;
      case 2: micro<2, UNIT>(nr, t, i0, j0); break;
      case 1: micro<1, UNIT>(nr, t, i0, j0); break;
      default: break;
    }
  }
}

void gemm_tile(const GemmTile& t) {
  if (t.a_cs == 1)
    gemm_tile_impl<true>(t);
  else
    gemm_tile_impl<false>(t);
}

void softmax_rows(float* s, int rows, int n, long ld, float scale) {
  const __m256 sc = _mm256_set1_ps(scale), lowest = _mm256_set1_ps(-3.0e38f);
  for (int r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    __m256 mx = lowest;
    for (int j = 0; j < n; j += 8) {
      const __m256i m = tail_mask(n - j);
      mx = _mm256_max_ps(mx, _mm256_blendv_ps(lowest, _mm256_maskload_ps(row + j, m), _mm256_castsi256_ps(m)));
    }
    const __m256 vmax = _mm256_set1_ps(hmax(mx));
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) {
      const __m256i m = tail_mask(n - j);
      const __m256 e = _mm256_and_ps(exp_ps(_mm256_mul_ps(sc, _mm256_sub_ps(_mm256_maskload_ps(row + j, m), vmax))),
                                     _mm256_castsi256_ps(m));
      sum = _mm256_add_ps(sum, e);
      _mm256_maskstore_ps(row + j, m, e);
    }
    const __m256 inv = _mm256_set1_ps(1.f / hsum(sum));
    for (int j = 0; j < n; j += 8) {
      const __m256i m = tail_mask(n - j);
      _mm256_maskstore_ps(row + j, m, _mm256_mul_ps(_mm256_maskload_ps(row + j, m), inv));
    }
  }
}

void layer_norm_row(const float* x, int C, const float* g, const float* b, float eps, float* y) {
  ln_row(x, C, g, b, eps, y);
}

void cpe_row(const float* img, int H, int W, int C, int yy, const float* wt, const float* bias, float* out) {
  davit::cpe_row(img, H, W, C, yy, wt, bias, out);
}

void transpose(const float* src, long lds, int rows, int cols, float* dst, long ldd) {
  x86::transpose_f32(src, lds, rows, cols, dst, ldd);
}

}  // namespace dovetail::davit::avx2
