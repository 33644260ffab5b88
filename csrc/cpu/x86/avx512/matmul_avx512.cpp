// AVX-512 (F/BW/VL/VNNI) linear kernels. Quantized weights: unsigned codes x int8
// activations with vpdpbusd over 16-row panels; bf16 weights: vdpbf16ps over 16-row panels
// (linear_rows_dpbf16), or its sums as two FMAs where the CPU lacks it (linear_rows);
// f32 / f16 weights: fp32 FMAs over 16-row panels.
#include <immintrin.h>

#include <algorithm>
#include <type_traits>

#include "common/gelu.h"
#include "common/softcap.h"
#include "cpu/ops.h"
#include "cpu/x86/avx2_common.h"
#include "cpu/quant_common.h"
#include "cpu/x86/avx512_common.h"

namespace dovetail::avx512 {

namespace {

// Quantized weights, panel layout (quant_common.h): the 16 lanes of a register are 16 weight
// rows. For each block b of 32 columns and each token t, eight vpdpbusd (the token's 4
// activation bytes broadcast) give the exact integer block sums of the 16 rows; then
//   acc[b & 1] = fma(float(isum), dw[b] * da[t, b], acc[b & 1])
//   acc[b & 1] = fma(cw[b], ds[t, b], acc[b & 1])        (the per-block offset term)
// and y[t, rows] = acc[0] + acc[1]. Each output is one lane's sequence of operations, the
// same whatever T, the token tile or the thread split (batch invariance), with no
// horizontal sums. A token tile of up to kTT tokens reuses each unpacked block panel.
constexpr int kTT = 8;

// Tiles of tokens [t, t + TT): whole tiles of kTT, then the rest as one tile;
// tile<TT>(t) runs one. (An explicit switch: the same dispatch through a generic lambda made
// the quantized kernel 7-9% slower at T = 1 to 3.)
#define DT_TOKEN_TILES(T, TILE)                  \
  do {                                           \
    int64_t t_ = 0;                              \
    for (; t_ + kTT <= (T); t_ += kTT) TILE(kTT, t_); \
    switch ((T) - t_) {                          \
      case 7: TILE(7, t_); break;                \
      case 6: TILE(6, t_); break;                \
      case 5: TILE(5, t_); break;                \
      case 4: TILE(4, t_); break;                \
      case 3: TILE(3, t_); break;                \
      case 2: TILE(2, t_); break;                \
      case 1: TILE(1, t_); break;                \
      default: break;                            \
    }                                            \
  } while (0)

// acc += dpbusd(codes, the 4 signed bytes at q broadcast to every lane), with the broadcast
// folded into the instruction's memory operand (GCC otherwise issues a separate
// vpbroadcastd, which competes with the dot products for the vector ports).
inline __m512i dpbusd_bcast(__m512i acc, __m512i codes, const int32_t* q) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(codes), "m"(*q));
  return acc;
}

template <WType WT>
inline void load_codes(const uint8_t* bp, __m512i* c) {
  if constexpr (WT == WType::Q8_0) {
    for (int s = 0; s < 8; ++s) c[s] = _mm512_loadu_si512(bp + 64 * s);
  } else {
    const __m512i lo = _mm512_set1_epi8(0x0f);
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512(bp + 64 * j);
      c[j] = _mm512_and_si512(v, lo);
      c[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo);
    }
  }
}

// One block panel against the TT tokens of a tile: acc[i] += the block's terms for token i.
template <WType WT, int TT>
inline void panel_block(const uint8_t* bp, const int8_t* qb, const float* db, const float* dsb, __m512* acc) {
  const int64_t cb = panel_code_bytes(WT);
  prefetch_ahead(bp, panel_block_bytes(WT));
  __m512i c[8];
  load_codes<WT>(bp, c);
  const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(bp + cb)));
  __m512 cw;
  if constexpr (WT == WType::Q4_1)
    cw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(bp + cb + 32)));
  else
    cw = _mm512_mul_ps(dw, _mm512_set1_ps(WT == WType::Q8_0 ? -128.0f : -8.0f));
  for (int i = 0; i < TT; ++i) {
    const int32_t* q = reinterpret_cast<const int32_t*>(qb + i * kQBlock);
    __m512i s0 = dpbusd_bcast(_mm512_setzero_si512(), c[0], q + 0);
    __m512i s1 = dpbusd_bcast(_mm512_setzero_si512(), c[1], q + 1);
    s0 = dpbusd_bcast(s0, c[2], q + 2);
    s1 = dpbusd_bcast(s1, c[3], q + 3);
    s0 = dpbusd_bcast(s0, c[4], q + 4);
    s1 = dpbusd_bcast(s1, c[5], q + 5);
    s0 = dpbusd_bcast(s0, c[6], q + 6);
    s1 = dpbusd_bcast(s1, c[7], q + 7);
    const __m512 isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
    acc[i] = _mm512_fmadd_ps(isum, _mm512_mul_ps(dw, _mm512_set1_ps(db[i])), acc[i]);
    acc[i] = _mm512_fmadd_ps(cw, _mm512_set1_ps(dsb[i]), acc[i]);
  }
}

template <WType WT, int TT>
inline void panel_tile(const PackedWeight& w, const QActs* qa, int64_t p, int64_t g, float* y, int64_t ldy) {
  const int64_t nb = w.cols / kQBlock, pb = panel_block_bytes(WT);
  __m512 even[TT], odd[TT];  // blocks b even / odd: two independent chains per output
  for (int i = 0; i < TT; ++i) even[i] = odd[i] = _mm512_setzero_ps();
  const uint8_t* bp = block_panel(w, p, 0);
  const int8_t* qb = qa->qi.data() + g * nb * kActTile * kQBlock;
  const float* db = qa->di.data() + g * nb * kActTile;
  const float* dsb = qa->dsi.data() + g * nb * kActTile;
  constexpr int64_t qs = kActTile * kQBlock, ss = kActTile;
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    panel_block<WT, TT>(bp + b * pb, qb + b * qs, db + b * ss, dsb + b * ss, even);
    panel_block<WT, TT>(bp + (b + 1) * pb, qb + (b + 1) * qs, db + (b + 1) * ss, dsb + (b + 1) * ss, odd);
  }
  if (b < nb) panel_block<WT, TT>(bp + b * pb, qb + b * qs, db + b * ss, dsb + b * ss, even);
  const int64_t n0 = p * kPanel, valid = std::min<int64_t>(kPanel, w.rows - n0);
  const __mmask16 m = (__mmask16)((1u << valid) - 1);
  for (int i = 0; i < TT; ++i)
    _mm512_mask_storeu_ps(y + (g * kActTile + i) * ldy + n0, m, _mm512_add_ps(even[i], odd[i]));
}

template <WType WT>
void linear_panels(const PackedWeight& w, const QActs* qa, int64_t T, float* y, int64_t ldy, int64_t p0, int64_t p1) {
  static_assert(kTT == kActTile, "one token tile per interleaved activation tile");
  for (int64_t p = p0; p < p1; ++p) {
#define DT_TILE(TT, t) panel_tile<WT, TT>(w, qa, p, (t) / kTT, y, ldy)
    DT_TOKEN_TILES(T, DT_TILE);
#undef DT_TILE
  }
}

void linear_quant(const PackedWeight& w, const QActs* qa, int64_t T, float* y, int64_t ldy,
                  int64_t r0, int64_t r1) {
  // The dispatcher hands out whole panels (r0 a multiple of 16; r1 the end of one or N).
  const int64_t p0 = r0 / kPanel, p1 = panel_count(r1);
  switch (w.type) {
    case WType::Q8_0: linear_panels<WType::Q8_0>(w, qa, T, y, ldy, p0, p1); break;
    case WType::Q4_0: linear_panels<WType::Q4_0>(w, qa, T, y, ldy, p0, p1); break;
    default: linear_panels<WType::Q4_1>(w, qa, T, y, ldy, p0, p1); break;
  }
}

// Float weights over 16-row panels (quant_common.h). One step is a column (f32, f16: one
// FMA per token with the token's x[k] broadcast; f16 columns converted once per tile) or a
// column pair (bf16: one vdpbf16ps per token with the token's bf16 pair broadcast, 2 x 16
// products; without kDp, the same sums as two FMAs, the weight pairs split once per step).
// Even and odd steps go to two sums (two independent chains per output, as in
// scalar::linear_float), added at the end. A tile of up to kTT tokens shares each weight
// load. The broadcasts are folded into the instructions' memory operands.
inline __m512 fma_bcast(__m512 acc, __m512 w, const float* x) {
  asm("vfmadd231ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
  return acc;
}
inline __m512 fma_bcast(__m512 acc, __m512 w, const uint32_t* x) {  // bf16 pairs: vdpbf16ps
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
  return acc;
}

// Step k of a panel: 16 fp32 values (f32, f16) or 16 bf16 pairs (bf16).
template <WType WT>
inline __m512 load_step(const void* panel, int64_t k) {
  if constexpr (WT == WType::F16)
    return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(panel) + k * kPanel)));
  else  // f32 columns, or bf16 pairs (64 bytes either way)
    return _mm512_load_ps(static_cast<const float*>(panel) + k * kPanel);
}

// The bf16 step without vdpbf16ps: the weight pairs split once (weight_step<true>), the
// token's pair broadcast and split, two FMAs.
inline __m512 fma_bcast(__m512 acc, const x86::Bf16Halves& w, const uint32_t* x) {
  return x86::dot_bf16(acc, w, x86::split_bf16(_mm512_set1_epi32((int)*x)));
}
template <bool kSplit>
inline auto weight_step(__m512 w) {
  if constexpr (kSplit)
    return x86::split_bf16(_mm512_castps_si512(w));
  else
    return w;
}

// X: float (f32, f16) or uint32_t (bf16 pairs); steps: K columns, or K2 pairs (even).
// kDp: bf16 through vdpbf16ps (ignored for f32 and f16).
template <WType WT, int TT, bool kDp, typename X>
inline void float_tile(const void* panel, int64_t steps, const X* x, float* y, int64_t ldy, int64_t n0,
                       __mmask16 m) {
  constexpr bool kSplit = WT == WType::BF16 && !kDp;
  // (Every loop over the tile is unrolled: a rolled one makes GCC keep the sums on the stack.)
  __m512 even[TT], odd[TT];
#pragma GCC unroll 8
  for (int i = 0; i < TT; ++i) even[i] = odd[i] = _mm512_setzero_ps();
  int64_t k = 0;
  constexpr int64_t step_bytes = WT == WType::F16 ? 32 : 64;
  for (; k + 2 <= steps; k += 2) {
    prefetch_ahead(static_cast<const uint8_t*>(panel) + k * step_bytes, 2 * step_bytes);
    const auto w0 = weight_step<kSplit>(load_step<WT>(panel, k));
    const auto w1 = weight_step<kSplit>(load_step<WT>(panel, k + 1));
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i) {
      even[i] = fma_bcast(even[i], w0, x + i * steps + k);
      odd[i] = fma_bcast(odd[i], w1, x + i * steps + k + 1);
    }
  }
  if (k < steps) {
    const auto w0 = weight_step<kSplit>(load_step<WT>(panel, k));
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i) even[i] = fma_bcast(even[i], w0, x + i * steps + k);
  }
#pragma GCC unroll 8
  for (int i = 0; i < TT; ++i) _mm512_mask_storeu_ps(y + i * ldy + n0, m, _mm512_add_ps(even[i], odd[i]));
}

template <WType WT, bool kDp>
void linear_float(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y, int64_t ldy,
                  int64_t r0, int64_t r1) {
  using E = std::conditional_t<WT == WType::F32, float, uint16_t>;      // stored element
  using X = std::conditional_t<WT == WType::BF16, uint32_t, float>;     // activation step
  const int64_t steps = WT == WType::BF16 ? qa->K2 : w.cols;
  const X* xs;
  if constexpr (WT == WType::BF16)
    xs = qa->b.data();
  else
    xs = x;
  for (int64_t p = r0 / kPanel; p < panel_count(r1); ++p) {
    const E* panel = float_panel<E>(w, p);
    const int64_t n0 = p * kPanel, valid = std::min<int64_t>(kPanel, w.rows - n0);
    const __mmask16 m = (__mmask16)((1u << valid) - 1);
#define DT_TILE(TT, t) float_tile<WT, TT, kDp>(panel, steps, xs + (t) * steps, y + (t) * ldy, ldy, n0, m)
    DT_TOKEN_TILES(T, DT_TILE);
#undef DT_TILE
  }
}

}  // namespace

namespace {

template <bool kDp>
void linear_rows_impl(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                      int64_t ldy, int64_t r0, int64_t r1) {
  if (is_quantized(w.type))
    linear_quant(w, qa, T, y, ldy, r0, r1);
  else if (w.type == WType::BF16)
    linear_float<WType::BF16, kDp>(w, x, qa, T, y, ldy, r0, r1);
  else if (w.type == WType::F16)
    linear_float<WType::F16, false>(w, x, qa, T, y, ldy, r0, r1);
  else
    linear_float<WType::F32, false>(w, x, qa, T, y, ldy, r0, r1);
}

}  // namespace

void linear_rows(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                 int64_t ldy, int64_t r0, int64_t r1) {
  linear_rows_impl<false>(w, x, qa, T, y, ldy, r0, r1);
}

void linear_rows_dpbf16(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                        int64_t ldy, int64_t r0, int64_t r1) {
  linear_rows_impl<true>(w, x, qa, T, y, ldy, r0, r1);
}

namespace {

// v[j] -> lane j: the maximum (floats without NaN) or the sum (int32) of each of 16
// registers, by pairwise interleaving (45 instructions where 16 separate horizontal
// reductions take about 130). Both operations are exact in any order.
template <typename V, typename Op, typename Lo32, typename Hi32, typename Lo64, typename Hi64, typename Lanes>
inline V transpose_reduce(V* v, Op op, Lo32 lo32, Hi32 hi32, Lo64 lo64, Hi64 hi64, Lanes lanes) {
  V w[8], u[4], z[2];
  for (int k = 0; k < 8; ++k) w[k] = op(lo32(v[2 * k], v[2 * k + 1]), hi32(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) u[k] = op(lo64(w[2 * k], w[2 * k + 1]), hi64(w[2 * k], w[2 * k + 1]));
  for (int k = 0; k < 2; ++k) z[k] = op(lanes(u[2 * k], u[2 * k + 1], 0x88), lanes(u[2 * k], u[2 * k + 1], 0xDD));
  return op(lanes(z[0], z[1], 0x88), lanes(z[0], z[1], 0xDD));
}

inline __m512 max_of_each(__m512* v) {
  return transpose_reduce(
      v, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); },
      [](__m512 a, __m512 b) { return _mm512_unpacklo_ps(a, b); },
      [](__m512 a, __m512 b) { return _mm512_unpackhi_ps(a, b); },
      [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); },
      [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); },
      [](__m512 a, __m512 b, int imm) {
        return imm == 0x88 ? _mm512_shuffle_f32x4(a, b, 0x88) : _mm512_shuffle_f32x4(a, b, 0xDD);
      });
}

inline __m512i sum_of_each(__m512i* v) {
  return transpose_reduce(
      v, [](__m512i a, __m512i b) { return _mm512_add_epi32(a, b); },
      [](__m512i a, __m512i b) { return _mm512_unpacklo_epi32(a, b); },
      [](__m512i a, __m512i b) { return _mm512_unpackhi_epi32(a, b); },
      [](__m512i a, __m512i b) { return _mm512_unpacklo_epi64(a, b); },
      [](__m512i a, __m512i b) { return _mm512_unpackhi_epi64(a, b); },
      [](__m512i a, __m512i b, int imm) {
        return imm == 0x88 ? _mm512_shuffle_i32x4(a, b, 0x88) : _mm512_shuffle_i32x4(a, b, 0xDD);
      });
}

}  // namespace

// Activation quantization (scalar::quantize_block's twin, bit for bit), 16 blocks at a
// time: the horizontal maxima and sums taken together, the two divisions made as vectors
// (IEEE division, lane by lane). max_ps returns its second operand when either is NaN, so
// NaN inputs are skipped in the max as std::fmax does, and a NaN product clamps to -127 as
// fmin(127, fmax(-127, NaN)) does.
void quantize_row(const float* x, int64_t nb, int8_t* q, int64_t q_stride, float* d, float* ds, int64_t stride) {
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f), zero = _mm512_setzero_ps();
  for (int64_t g = 0; g < nb; g += 16) {
    const int n = (int)std::min<int64_t>(16, nb - g);
    __m512 m[16];
    for (int j = 0; j < 16; ++j) {
      if (j < n) {
        const float* xb = x + (g + j) * kQBlock;
        m[j] = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xb)), zero);
        m[j] = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xb + 16)), m[j]);
      } else {
        m[j] = zero;
      }
    }
    const __m512 amax = max_of_each(m);
    const __m512 dv = _mm512_div_ps(amax, hi);
    const __m512 idv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(amax, zero, _CMP_GT_OQ), hi, amax);
    alignas(64) float ids[16];
    _mm512_store_ps(ids, idv);
    __m512i sums[16];
    for (int j = 0; j < 16; ++j) {
      if (j >= n) {
        sums[j] = _mm512_setzero_si512();
        continue;
      }
      const float* xb = x + (g + j) * kQBlock;
      const __m512 id = _mm512_set1_ps(ids[j]);
      auto codes = [&](__m512 v) {
        v = _mm512_roundscale_ps(_mm512_mul_ps(v, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
      };
      const __m512i ia = codes(_mm512_loadu_ps(xb)), ib = codes(_mm512_loadu_ps(xb + 16));
      int8_t* qb = q + (g + j) * q_stride;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(ia));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(ib));
      sums[j] = _mm512_add_epi32(ia, ib);
    }
    alignas(64) float dd[16], dss[16];
    _mm512_store_ps(dd, dv);
    _mm512_store_ps(dss, _mm512_mul_ps(dv, _mm512_cvtepi32_ps(sum_of_each(sums))));
    for (int j = 0; j < n; ++j) {
      d[(g + j) * stride] = dd[j];
      ds[(g + j) * stride] = dss[j];
    }
  }
}

void round_bf16(const float* x, int64_t n, uint32_t* out) {
  const __m512i abs = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000),
                half = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), quiet = _mm512_set1_epi32(0x40);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    const __m512i u = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, x + i));
    const __m512i hi = _mm512_srli_epi32(u, 16);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half, _mm512_and_si512(hi, one))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs), inf);
    r = _mm512_mask_or_epi32(r, nan, hi, quiet);
    _mm256_mask_storeu_epi16(out + i / 2, m, _mm512_cvtepi32_epi16(r));
  }
}

namespace {

// out = g / (1 + exp(-a(g))) * u with a(g) = g (SwiGLU) or g (kGeluA + kGeluB g^2) (GeGLU).
template <bool kGelu>
void gated(const float* g, const float* u, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  const __m512 ga = _mm512_set1_ps(kGeluA), gb = _mm512_set1_ps(kGeluB);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
    const __m512 a = kGelu ? _mm512_mul_ps(gv, _mm512_fmadd_ps(gb, _mm512_mul_ps(gv, gv), ga)) : gv;
    const __m512 e = x86::exp_ps(_mm512_sub_ps(zero, a));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), uv));
  }
}

}  // namespace

void swiglu(const float* g, const float* u, float* out, int64_t n) { gated<false>(g, u, out, n); }
void geglu(const float* g, const float* u, float* out, int64_t n) { gated<true>(g, u, out, n); }

void softcap(float* x, int64_t n, float cap) {  // common/softcap.h's form, lane by lane, the tail too
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f), c = _mm512_set1_ps(cap);
  const __m512 k = _mm512_set1_ps(softcap_k(cap));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    const __m512 e = x86::exp_ps(_mm512_mul_ps(k, _mm512_maskz_loadu_ps(m, x + i)));
    _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(c, _mm512_sub_ps(_mm512_div_ps(two, _mm512_add_ps(one, e)), one)));
  }
}

}  // namespace dovetail::avx512
