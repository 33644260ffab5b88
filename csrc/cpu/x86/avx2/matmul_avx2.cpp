// AVX2 + FMA linear kernels. Quantized weights: pmaddubsw integer dot products over 16-row
// panels (q8_0 uses the sign trick so 16-bit pair sums cannot saturate); float weights:
// fp32 FMAs over the same panels (bf16: vdpbf16ps's sums).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/gelu.h"
#include "common/softcap.h"
#include "cpu/ops.h"
#include "cpu/x86/avx2_common.h"
#include "cpu/quant_common.h"

namespace dovetail::avx2 {

namespace {

// Quantized weights, panel layout (quant_common.h), 8 rows per register (a panel is two
// halves). For block b and token t the exact integer block sums of 8 rows come from the
// 8 code dwords with the token's dword broadcast, by one of three integer dot products
// (Dot); all three give the same sums, so the same bits:
//   Maddubs (AVX2): pmaddubsw; q4: codes <= 15, so the eight 16-bit pair sums add up
//     without saturating (<= 30480); q8_0: signed weights |w| x sign(a, w) (pairs <= 32512),
//     widened per dword;
//   VnniVex / VnniEvex (Isa::AvxVnni): vpdpbusd on 256-bit registers, 4 products a lane
//     summed into 32 bits (q8_0: |w| x sign(a, w) as above). VEX is AVX-VNNI's encoding,
//     EVEX that of AVX512_VNNI + VL; the instruction and its results are the same.
// Then, per output lane (one sequence whatever T or the tile: batch invariance):
//   acc[b & 1] = fma(float(isum), dw * da[t, b], acc[b & 1]);  q4: acc[b & 1] += cw * ds[t, b]
// and y = acc[0] + acc[1].
constexpr int kTT2 = 4;

enum class Dot { Maddubs, VnniVex, VnniEvex };

// acc += vpdpbusd(u, s): per 32-bit lane, the four unsigned bytes of u times the four
// signed bytes of s. Inline assembly picks the encoding (the compiler flags of this file
// are AVX2's); "x" keeps the operands in ymm0-15, which both encodings reach.
template <Dot D>
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
  if constexpr (D == Dot::VnniVex)
    asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
  else
    asm("%{evex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
  return acc;
}

template <WType WT>
inline void load_codes8(const uint8_t* bp, int half, __m256i* c) {
  const uint8_t* base = bp + half * 32;  // rows 8*half .. 8*half+7 of each 64-byte dword group
  if constexpr (WT == WType::Q8_0) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int s = 0; s < 8; ++s) c[s] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(base + 64 * s)), flip);
  } else {
    const __m256i lo = _mm256_set1_epi8(0x0f);
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(base + 64 * j));
      c[j] = _mm256_and_si256(v, lo);
      c[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo);
    }
  }
}

// The exact integer sums of one block of 8 rows (codes c, q8_0: signed) and one token's
// 32 activation bytes q.
template <WType WT, Dot D>
inline __m256i block_isum(const __m256i* c, const int32_t* q) {
  if constexpr (D == Dot::Maddubs) {
    const __m256i ones = _mm256_set1_epi16(1);
    if constexpr (WT == WType::Q8_0) {
      __m256i isum = _mm256_setzero_si256();
      for (int s = 0; s < 8; ++s) {
        const __m256i a = _mm256_set1_epi32(q[s]);
        const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(c[s], c[s]), _mm256_sign_epi8(a, c[s]));
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
      }
      return isum;
    } else {
      __m256i p = _mm256_maddubs_epi16(c[0], _mm256_set1_epi32(q[0]));
      for (int s = 1; s < 8; ++s) p = _mm256_add_epi16(p, _mm256_maddubs_epi16(c[s], _mm256_set1_epi32(q[s])));
      return _mm256_madd_epi16(p, ones);
    }
  } else {
    // Two chains (even and odd dwords), added at the end: integer sums, exact in any order.
    __m256i s2[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int s = 0; s < 8; ++s) {
      const __m256i a = _mm256_set1_epi32(q[s]);
      if constexpr (WT == WType::Q8_0)
        s2[s & 1] = dpbusd<D>(s2[s & 1], _mm256_sign_epi8(c[s], c[s]), _mm256_sign_epi8(a, c[s]));
      else
        s2[s & 1] = dpbusd<D>(s2[s & 1], c[s], a);
    }
    return _mm256_add_epi32(s2[0], s2[1]);
  }
}

template <WType WT, Dot D, int TT>
inline void half_block(const uint8_t* bp, int half, const int8_t* qb, const float* db, const float* dsb, __m256* acc) {
  const int64_t cb = panel_code_bytes(WT);
  if (half == 0) prefetch_ahead(bp, panel_block_bytes(WT));  // (the second half reads the same lines)
  __m256i c[8];
  load_codes8<WT>(bp, half, c);
  const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(bp + cb + 16 * half)));
  for (int i = 0; i < TT; ++i) {
    const __m256i isum = block_isum<WT, D>(c, reinterpret_cast<const int32_t*>(qb + i * kQBlock));
    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_set1_ps(db[i])), acc[i]);
    if constexpr (WT != WType::Q8_0) {
      const __m256 cw = WT == WType::Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(bp + cb + 32 + 16 * half)))
                                          : _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f));
      acc[i] = _mm256_fmadd_ps(cw, _mm256_set1_ps(dsb[i]), acc[i]);
    }
  }
}

// Rows r0 .. r0 + valid - 1 (one half of panel p) for the TT tokens of activation tile g
// from sub on: exactly TT tokens' work, so a short tail of tokens costs only its own.
template <WType WT, Dot D, int TT>
inline void half_tile(const PackedWeight& w, const QActs* qa, int64_t p, int64_t g, int half, int64_t sub,
                      int64_t r0, int64_t valid, float* y, int64_t ldy) {
  const int64_t nb = w.cols / kQBlock, pb = panel_block_bytes(WT);
  constexpr int64_t qs = kActTile * kQBlock;
  __m256 even[TT], odd[TT];
  for (int i = 0; i < TT; ++i) even[i] = odd[i] = _mm256_setzero_ps();
  const uint8_t* bp = block_panel(w, p, 0);
  const int8_t* qb = qa->qi.data() + g * nb * qs + sub * kQBlock;
  const float* db = qa->di.data() + g * nb * kActTile + sub;
  const float* dsb = qa->dsi.data() + g * nb * kActTile + sub;
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    half_block<WT, D, TT>(bp + b * pb, half, qb + b * qs, db + b * kActTile, dsb + b * kActTile, even);
    half_block<WT, D, TT>(bp + (b + 1) * pb, half, qb + (b + 1) * qs, db + (b + 1) * kActTile,
                          dsb + (b + 1) * kActTile, odd);
  }
  if (b < nb) half_block<WT, D, TT>(bp + b * pb, half, qb + b * qs, db + b * kActTile, dsb + b * kActTile, even);
  alignas(32) float out[8];
  for (int64_t i = 0; i < TT; ++i) {
    _mm256_store_ps(out, _mm256_add_ps(even[i], odd[i]));
    std::memcpy(y + (g * kActTile + sub + i) * ldy + r0, out, sizeof(float) * valid);
  }
}

template <WType WT, Dot D>
inline void panel_tile(const PackedWeight& w, const QActs* qa, int64_t p, int64_t g, float* y, int64_t ldy) {
  const int64_t n0 = p * kPanel;
  for (int half = 0; half < 2; ++half) {
    const int64_t r0 = n0 + 8 * half, valid = std::min<int64_t>(8, w.rows - r0);
    if (valid <= 0) break;
    for (int64_t sub = 0; sub < kActTile; sub += kTT2) {  // token sub-tiles of the activation tile
      const int64_t tt = std::min<int64_t>(kTT2, qa->T - g * kActTile - sub);
      if (tt <= 0) break;
      switch (tt) {
        case 1: half_tile<WT, D, 1>(w, qa, p, g, half, sub, r0, valid, y, ldy); break;
        case 2: half_tile<WT, D, 2>(w, qa, p, g, half, sub, r0, valid, y, ldy); break;
        case 3: half_tile<WT, D, 3>(w, qa, p, g, half, sub, r0, valid, y, ldy); break;
        default: half_tile<WT, D, kTT2>(w, qa, p, g, half, sub, r0, valid, y, ldy); break;
      }
    }
  }
}

template <WType WT, Dot D>
void linear_panels(const PackedWeight& w, const QActs* qa, int64_t T, float* y, int64_t ldy, int64_t p0, int64_t p1) {
  static_assert(kActTile % kTT2 == 0, "token sub-tiles must divide the activation tile");
  const int64_t tiles = (T + kActTile - 1) / kActTile;
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t g = 0; g < tiles; ++g) panel_tile<WT, D>(w, qa, p, g, y, ldy);
}

template <Dot D>
void linear_quant(const PackedWeight& w, const QActs* qa, int64_t T, float* y, int64_t ldy,
                  int64_t r0, int64_t r1) {
  const int64_t p0 = r0 / kPanel, p1 = panel_count(r1);  // whole panels (see linear())
  switch (w.type) {
    case WType::Q8_0: linear_panels<WType::Q8_0, D>(w, qa, T, y, ldy, p0, p1); break;
    case WType::Q4_0: linear_panels<WType::Q4_0, D>(w, qa, T, y, ldy, p0, p1); break;
    default: linear_panels<WType::Q4_1, D>(w, qa, T, y, ldy, p0, p1); break;
  }
}

// Float weights over the same 16-row panels, 8 rows per register, tiles of up to 2 tokens;
// the sums and their order are scalar::linear_float's (so also the AVX-512 kernels'): per
// output, even and odd columns (f32, f16) or column pairs (bf16) in two FMA chains. bf16
// takes the two halves of each 32-bit pair apart with a shift and a mask, and adds the odd
// column's product first, as vdpbf16ps does.
template <WType WT, int TT>
inline void float_tile(const PackedWeight& w, int64_t p, const float* x, const QActs* qa, int64_t t0, float* y,
                       int64_t ldy) {
  const __m256i himask = _mm256_set1_epi32((int)0xffff0000u);
  const int64_t steps = WT == WType::BF16 ? qa->K2 : w.cols;  // column pairs or columns
  __m256 acc[TT][2][2];  // [token][rows 0-7 / 8-15][even / odd step]
  for (int i = 0; i < TT; ++i)
    for (int h = 0; h < 2; ++h) acc[i][h][0] = acc[i][h][1] = _mm256_setzero_ps();
  constexpr int64_t step_bytes = WT == WType::F16 ? 32 : 64;  // one column, or a bf16 column pair
  const uint8_t* stream = w.data.data() + p * steps * step_bytes;
  for (int64_t j = 0; j < steps; ++j) {
    const int par = (int)(j & 1);
    prefetch_ahead(stream + j * step_bytes, step_bytes);
    if constexpr (WT == WType::BF16) {
      const uint16_t* panel = float_panel<uint16_t>(w, p) + j * 2 * kPanel;
      __m256 wlo[2], whi[2];
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_load_si256((const __m256i*)(panel + 16 * h));
        wlo[h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        whi[h] = _mm256_castsi256_ps(_mm256_and_si256(v, himask));
      }
      for (int i = 0; i < TT; ++i) {
        const __m256i xv = _mm256_set1_epi32((int)qa->b[(t0 + i) * steps + j]);
        const __m256 xlo = _mm256_castsi256_ps(_mm256_slli_epi32(xv, 16));
        const __m256 xhi = _mm256_castsi256_ps(_mm256_and_si256(xv, himask));
        for (int h = 0; h < 2; ++h) {
          acc[i][h][par] = _mm256_fmadd_ps(whi[h], xhi, acc[i][h][par]);
          acc[i][h][par] = _mm256_fmadd_ps(wlo[h], xlo, acc[i][h][par]);
        }
      }
    } else {
      __m256 wv[2];
      for (int h = 0; h < 2; ++h) {
        if constexpr (WT == WType::F16)
          wv[h] = _mm256_cvtph_ps(_mm_load_si128((const __m128i*)(float_panel<uint16_t>(w, p) + j * kPanel + 8 * h)));
        else
          wv[h] = _mm256_load_ps(float_panel<float>(w, p) + j * kPanel + 8 * h);
      }
      for (int i = 0; i < TT; ++i) {
        const __m256 xv = _mm256_broadcast_ss(x + (t0 + i) * steps + j);
        for (int h = 0; h < 2; ++h) acc[i][h][par] = _mm256_fmadd_ps(wv[h], xv, acc[i][h][par]);
      }
    }
  }
  const int64_t n0 = p * kPanel, valid = std::min<int64_t>(kPanel, w.rows - n0);
  for (int i = 0; i < TT; ++i) {
    alignas(32) float out[kPanel];
    for (int h = 0; h < 2; ++h) _mm256_store_ps(out + 8 * h, _mm256_add_ps(acc[i][h][0], acc[i][h][1]));
    std::memcpy(y + (t0 + i) * ldy + n0, out, sizeof(float) * valid);
  }
}

template <WType WT>
void linear_float(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y, int64_t ldy,
                  int64_t r0, int64_t r1) {
  for (int64_t p = r0 / kPanel; p < panel_count(r1); ++p) {
    int64_t t = 0;
    for (; t + 2 <= T; t += 2) float_tile<WT, 2>(w, p, x, qa, t, y, ldy);
    if (t < T) float_tile<WT, 1>(w, p, x, qa, t, y, ldy);
  }
}

template <Dot D>
void linear_rows_with(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y, int64_t ldy,
                      int64_t r0, int64_t r1) {
  if (is_quantized(w.type))
    linear_quant<D>(w, qa, T, y, ldy, r0, r1);
  else if (w.type == WType::BF16)
    linear_float<WType::BF16>(w, x, qa, T, y, ldy, r0, r1);
  else if (w.type == WType::F16)
    linear_float<WType::F16>(w, x, qa, T, y, ldy, r0, r1);
  else
    linear_float<WType::F32>(w, x, qa, T, y, ldy, r0, r1);
}

}  // namespace

void linear_rows(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                 int64_t ldy, int64_t r0, int64_t r1) {
  linear_rows_with<Dot::Maddubs>(w, x, qa, T, y, ldy, r0, r1);
}
void linear_rows_vnni(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                      int64_t ldy, int64_t r0, int64_t r1) {
  linear_rows_with<Dot::VnniVex>(w, x, qa, T, y, ldy, r0, r1);
}
void linear_rows_vnni_evex(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                           int64_t ldy, int64_t r0, int64_t r1) {
  linear_rows_with<Dot::VnniEvex>(w, x, qa, T, y, ldy, r0, r1);
}

// Activation quantization (scalar::quantize_block's twin, bit for bit; NaN handling as in
// the AVX-512 version: max_ps returns its second operand when either is NaN).
int quantize_block(const float* x, int8_t* q, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    m = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), m);
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float amax = _mm_cvtss_f32(m4);
  *d = amax / 127.0f;
  const __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  __m256i c[4], sum = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    c[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    sum = _mm256_add_epi32(sum, c[i]);
  }
  // packs work per 128-bit lane: the dwords come out as c0[0:4] c1[0:4] c2[0:4] c3[0:4]
  // c0[4:8] c1[4:8] c2[4:8] c3[4:8]; the permutation restores c0 c1 c2 c3 order.
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
  return _mm_cvtsi128_si32(s4);
}

namespace {

// g / (1 + exp(-a(g))) * u with a(g) = g (SwiGLU) or g (kGeluA + kGeluB g^2) (GeGLU).
template <bool kGelu>
__m256 gated8(__m256 g, __m256 u) {
  const __m256 a = kGelu ? _mm256_mul_ps(g, _mm256_fmadd_ps(_mm256_set1_ps(kGeluB), _mm256_mul_ps(g, g),
                                                            _mm256_set1_ps(kGeluA)))
                         : g;
  const __m256 e = x86::exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), a));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

template <bool kGelu>
void gated(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, gated8<kGelu>(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
  if (i < n) {  // the tail through the same vector code
    alignas(32) float gb[8] = {}, ub[8] = {}, ob[8];
    for (int64_t j = i; j < n; ++j) gb[j - i] = g[j], ub[j - i] = u[j];
    _mm256_store_ps(ob, gated8<kGelu>(_mm256_load_ps(gb), _mm256_load_ps(ub)));
    for (int64_t j = i; j < n; ++j) out[j] = ob[j - i];
  }
}

}  // namespace

void swiglu(const float* g, const float* u, float* out, int64_t n) { gated<false>(g, u, out, n); }
void geglu(const float* g, const float* u, float* out, int64_t n) { gated<true>(g, u, out, n); }

void softcap(float* x, int64_t n, float cap) {  // common/softcap.h's form, lane by lane, the tail too
  const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), c = _mm256_set1_ps(cap);
  const __m256 k = _mm256_set1_ps(softcap_k(cap));
  auto eight = [&](__m256 v) {
    const __m256 e = x86::exp_ps(_mm256_mul_ps(k, v));
    return _mm256_mul_ps(c, _mm256_sub_ps(_mm256_div_ps(two, _mm256_add_ps(one, e)), one));
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, eight(_mm256_loadu_ps(x + i)));
  if (i < n) {
    alignas(32) float b[8] = {};
    for (int64_t j = i; j < n; ++j) b[j - i] = x[j];
    _mm256_store_ps(b, eight(_mm256_load_ps(b)));
    for (int64_t j = i; j < n; ++j) x[j] = b[j - i];
  }
}

}  // namespace dovetail::avx2
