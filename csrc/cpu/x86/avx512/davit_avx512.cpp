// AVX-512 versions of the DaViT tile routines (built with -mavx512f/bw/vl/dq only here).
// GEMM micro-tile: 6 rows x 64 columns (four zmm accumulators per row, 24 in all); column
// tails use masked loads/stores, row and column tails smaller instantiations of the template.
// GCC 12 warns -W(maybe-)uninitialized inside its own AVX-512 intrinsics (the undefined-vector
// placeholder they pass through; GCC bug 105593, fixed in 13): a header false positive.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include "cpu/x86/avx2_common.h"
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/davit.h"
#include "cpu/ops.h"
#include "cpu/davit_rows.h"
#include "cpu/x86/avx512_common.h"

namespace dovetail::davit::avx512 {

namespace {

using x86::exp_ps;

// Exact-form GELU 0.5 x (1 + erf(x / sqrt2)); erf by Abramowitz-Stegun 7.1.26
// (|error| <= 1.5e-7, below fp32 resolution of the GELU output for |x| >= 1e-1).
inline __m512 gelu_ps(__m512 x) {
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  const __m512 az = _mm512_abs_ps(z);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f),
                                 _mm512_fmadd_ps(az, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 e = exp_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), az), az));
  __m512 erf_abs = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.f));
  // copy the sign of z
  const __m512 sign = _mm512_and_ps(z, _mm512_set1_ps(-0.f));
  const __m512 erf = _mm512_or_ps(erf_abs, sign);
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.f), erf));
}

// Rows per micro-tile: 6 rows x 4 zmm accumulators + 4 B vectors + 1 broadcast of 32
// registers; 6 row pointers keep the A addresses in general registers (12 would spill).
constexpr int kMR = 6;

inline __mmask16 tail_mask(int n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

// Epilogue shared by the fp32 and bf16 tiles: + bias, + residual, GELU, masked store.
template <int MR, int NV>
inline void store_tile(const GemmTile& t, __m512 (&acc)[MR][NV], int i0, int j0, __mmask16 last) {
  __m512 bias[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const __mmask16 m = v == NV - 1 ? last : (__mmask16)0xFFFF;
    bias[v] = t.bias ? _mm512_maskz_loadu_ps(m, t.bias + j0 + 16 * v) : _mm512_setzero_ps();
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* c = t.c[i0 + i] + j0;
    const float* r = t.res ? t.res[i0 + i] + j0 : nullptr;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? last : (__mmask16)0xFFFF;
      __m512 x = _mm512_add_ps(acc[i][v], bias[v]);
      if (r) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, r + 16 * v));
      if (t.gelu) x = gelu_ps(x);
      _mm512_mask_storeu_ps(c + 16 * v, m, x);
    }
  }
}

// One micro-tile: MR rows x NV*16 columns (NV <= 4), accumulators in registers. Only the
// last vector of a row can be partial (mask `last`).
template <int MR, int NV, bool UNIT>
void micro(int nr, const GemmTile& t, int i0, int j0) {
  const __mmask16 last = tail_mask(nr - 16 * (NV - 1));
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  const float* ap[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) ap[i] = t.a[i0 + i];
  const float* bp[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const int j = j0 + 16 * v;
    bp[v] = t.b_panel ? t.b + (j / kPanel) * t.b_panel + j % kPanel : t.b + j;
  }
  const long ldb = t.b_panel ? kPanel : t.ldb;
  // Unit-stride A (every projection) lets the compiler fold k into the broadcast address.
  const long cs = UNIT ? 1 : t.a_cs;
  const int K = t.k;  // a local bound: no reload of t.k on every step
  for (int k = 0; k < K; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      bv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, bp[v] + k * ldb) : _mm512_loadu_ps(bp[v] + k * ldb);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(ap[i][k * cs]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
  store_tile<MR, NV>(t, acc, i0, j0, last);
}

template <int MR, bool UNIT>
void micro_cols(int nr, const GemmTile& t, int i0, int j0) {
  switch ((nr + 15) / 16) {
    case 4: micro<MR, 4, UNIT>(nr, t, i0, j0); break;
    case 3: micro<MR, 3, UNIT>(nr, t, i0, j0); break;
    case 2: micro<MR, 2, UNIT>(nr, t, i0, j0); break;
    default: micro<MR, 1, UNIT>(nr, t, i0, j0); break;
  }
}

}  // namespace

// Row tail: the largest instantiation that fits the remaining rows.
template <int R, bool UNIT>
void row_tail(int rows, int nr, const GemmTile& t, int i0, int j0) {
  if constexpr (R > 0) {
    if (rows == R)
      micro_cols<R, UNIT>(nr, t, i0, j0);
    else
      row_tail<R - 1, UNIT>(rows, nr, t, i0, j0);
  }
}

template <bool UNIT>
void gemm_tile_impl(const GemmTile& t) {
  constexpr int MR = kMR, NR = 64;
  for (int j0 = 0; j0 < t.n; j0 += NR) {
    const int nr = std::min(NR, t.n - j0);
    int i0 = 0;
    for (; i0 + MR <= t.m; i0 += MR) micro_cols<MR, UNIT>(nr, t, i0, j0);
    row_tail<MR - 1, UNIT>(t.m - i0, nr, t, i0, j0);
  }
}

// ---- bf16 tile: vdpbf16ps on bf16 pairs, fp32 sums (or its sums as two FMAs) --------------
namespace {

// MR rows x NV*16 columns. kDp: vdpbf16ps, a holds the MR rows' activations as bf16 pairs
// (k2 per row). Otherwise a holds the pairs split into fp32 halves once per row block, per
// row the odd elements' k2 then the even elements' k2, and each weight vector is split once
// per pair step: per row and vector two FMAs with the halves broadcast, x86::dot_bf16's sums.
template <int MR, int NV, bool kDp>
void micro_bf16(int nr, const GemmTile& t, const uint32_t* a, int k2, int i0, int j0) {
  const __mmask16 last = tail_mask(nr - 16 * (NV - 1));
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  const uint16_t* bp[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const int j = j0 + 16 * v;
    bp[v] = t.b16 + (j / kPanel) * t.b16_panel + (j % kPanel) * 2;
  }
  const float* ah = reinterpret_cast<const float*>(a);
  for (int kp = 0; kp < k2; ++kp) {
    decltype(x86::bf16_operand<kDp>(_mm512_setzero_si512())) bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      bv[v] = x86::bf16_operand<kDp>(
          _mm512_maskz_loadu_epi32(v == NV - 1 ? last : (__mmask16)0xFFFF, bp[v] + kp * 2 * kPanel));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      if constexpr (kDp) {
        const __m512i av = _mm512_set1_epi32((int)a[i * k2 + kp]);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[i][v] = x86::dot_bf16(acc[i][v], av, bv[v]);
      } else {
        const float* h = ah + 2 * i * k2 + kp;  // (h[k2]: the pair's even element)
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) {
          acc[i][v] = _mm512_fmadd_ps(_mm512_set1_ps(h[0]), bv[v].hi, acc[i][v]);
          acc[i][v] = _mm512_fmadd_ps(_mm512_set1_ps(h[k2]), bv[v].lo, acc[i][v]);
        }
      }
    }
  }
  store_tile<MR, NV>(t, acc, i0, j0, last);
}

// Up to 64 columns. Without vdpbf16ps, 32 at a time: the split halves need the registers.
template <int MR, bool kDp>
void micro_bf16_cols(int nr, const GemmTile& t, const uint32_t* a, int k2, int i0, int j0) {
  if constexpr (!kDp) {
    if (nr > 32) {
      micro_bf16<MR, 2, false>(32, t, a, k2, i0, j0);
      micro_bf16_cols<MR, false>(nr - 32, t, a, k2, i0, j0 + 32);
    } else if (nr > 16) {
      micro_bf16<MR, 2, false>(nr, t, a, k2, i0, j0);
    } else {
      micro_bf16<MR, 1, false>(nr, t, a, k2, i0, j0);
    }
  } else {
    switch ((nr + 15) / 16) {
      case 4: micro_bf16<MR, 4, true>(nr, t, a, k2, i0, j0); break;
      case 3: micro_bf16<MR, 3, true>(nr, t, a, k2, i0, j0); break;
      case 2: micro_bf16<MR, 2, true>(nr, t, a, k2, i0, j0); break;
      default: micro_bf16<MR, 1, true>(nr, t, a, k2, i0, j0); break;
    }
  }
}

template <int R, bool kDp>
void bf16_row_tail(int rows, int nr, const GemmTile& t, const uint32_t* a, int k2, int i0, int j0) {
  if constexpr (R > 0) {
    if (rows == R)
      micro_bf16_cols<R, kDp>(nr, t, a, k2, i0, j0);
    else
      bf16_row_tail<R - 1, kDp>(rows, nr, t, a, k2, i0, j0);
  }
}

template <bool kDp>
void gemm_tile_bf16_impl(const GemmTile& t) {
  constexpr int MR = kMR, NR = 64;
  const int k2 = (t.k + 1) / 2;
  // kDp: the bf16 pairs; otherwise their fp32 halves (two 32-bit words a pair).
  thread_local std::vector<uint32_t> a16;
  const size_t words = (size_t)MR * k2 * (kDp ? 1 : 2);
  if (a16.size() < words) a16.resize(words);
  for (int i0 = 0; i0 < t.m; i0 += MR) {
    const int mr = std::min(MR, t.m - i0);
    for (int i = 0; i < mr; ++i) {
      uint32_t* row = a16.data() + (size_t)i * k2 * (kDp ? 1 : 2);
      bf16_pair_row(t.a[i0 + i], t.a_cs, t.k, row, k2);
      if constexpr (!kDp)  // in place: the odd elements' halves stay at [0, k2), the even go to [k2, 2 k2)
        for (int j = 0; j < k2; j += 16) {
          const __mmask16 m = tail_mask(std::min(16, k2 - j));
          const x86::Bf16Halves h = x86::split_bf16(_mm512_maskz_loadu_epi32(m, row + j));
          _mm512_mask_storeu_ps(row + j, m, h.hi);
          _mm512_mask_storeu_ps(row + k2 + j, m, h.lo);
        }
    }
    for (int j0 = 0; j0 < t.n; j0 += NR) {
      const int nr = std::min(NR, t.n - j0);
      if (mr == MR)
        micro_bf16_cols<MR, kDp>(nr, t, a16.data(), k2, i0, j0);
      else
        bf16_row_tail<MR - 1, kDp>(mr, nr, t, a16.data(), k2, i0, j0);
    }
  }
}

}  // namespace

void gemm_tile_bf16(const GemmTile& t) { gemm_tile_bf16_impl<false>(t); }
void gemm_tile_dpbf16(const GemmTile& t) { gemm_tile_bf16_impl<true>(t); }

void gemm_tile(const GemmTile& t) {
  if (t.a_cs == 1)
    gemm_tile_impl<true>(t);
  else
    gemm_tile_impl<false>(t);
}

namespace {

// R rows of up to NV*16 values each, held in registers from load to store. Several rows
// at once: one row's max -> exp -> sum -> scale chain is latency-bound (~100 cycles), and
// interleaving independent rows hides it.
template <int NV, int R>
void softmax_rows_regs(float* s, long ld, int n, __m512 sc) {
  __m512 v[R][NV];
  __m512 mx[R], sum[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    mx[r] = _mm512_set1_ps(-3.0e38f);
    sum[r] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) {
      v[r][k] = _mm512_mask_loadu_ps(_mm512_set1_ps(-3.0e38f), tail_mask(n - 16 * k), s + r * ld + 16 * k);
      mx[r] = _mm512_max_ps(mx[r], v[r][k]);
    }
    mx[r] = _mm512_set1_ps(_mm512_reduce_max_ps(mx[r]));
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) {
      v[r][k] = _mm512_maskz_mov_ps(tail_mask(n - 16 * k), exp_ps(_mm512_mul_ps(sc, _mm512_sub_ps(v[r][k], mx[r]))));
      sum[r] = _mm512_add_ps(sum[r], v[r][k]);
    }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum[r]));
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k)
      _mm512_mask_storeu_ps(s + r * ld + 16 * k, tail_mask(n - 16 * k), _mm512_mul_ps(v[r][k], inv));
  }
}

template <int NV>
void softmax_block(float* s, int rows, long ld, int n, __m512 sc) {
  constexpr int R = NV <= 2 ? 4 : NV <= 4 ? 3 : 1;
  int r = 0;
  for (; r + R <= rows; r += R) softmax_rows_regs<NV, R>(s + r * ld, ld, n, sc);
  for (; r < rows; ++r) softmax_rows_regs<NV, 1>(s + r * ld, ld, n, sc);
}

}  // namespace

void softmax_rows(float* s, int rows, int n, long ld, float scale) {
  const __m512 sc = _mm512_set1_ps(scale);
  switch ((n + 15) / 16) {
    case 1: return softmax_block<1>(s, rows, ld, n, sc);
    case 2: return softmax_block<2>(s, rows, ld, n, sc);
    case 3: return softmax_block<3>(s, rows, ld, n, sc);
    case 4: return softmax_block<4>(s, rows, ld, n, sc);
    case 5: case 6: case 7: case 8: return softmax_block<8>(s, rows, ld, n, sc);
    default: break;
  }
  for (int r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    __m512 mx = _mm512_set1_ps(-3.0e38f);
    for (int j = 0; j < n; j += 16) {
      const __mmask16 m = tail_mask(n - j);
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-3.0e38f), m, row + j));
    }
    const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
      const __mmask16 m = tail_mask(n - j);
      const __m512 e = exp_ps(_mm512_mul_ps(sc, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), vmax)));
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
      _mm512_mask_storeu_ps(row + j, m, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int j = 0; j < n; j += 16) {
      const __mmask16 m = tail_mask(n - j);
      _mm512_mask_storeu_ps(row + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), inv));
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

}  // namespace dovetail::davit::avx512
