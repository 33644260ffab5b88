// AVX-512 (F/BW/VL/VNNI) linear kernels. Quantized weights: unsigned codes x int8
// activations with vpdpbusd, two blocks per 512-bit register; float weights: fp32 FMAs.
#include <immintrin.h>

#include "cpu/ops.h"
#include "cpu/x86/avx2_common.h"
#include "cpu/quant_common.h"

namespace dovetail::avx512 {

namespace {

// Unpack one stored quantized row into unsigned codes[K] and scales dw/cw [nb].
void unpack_row(WType t, const uint8_t* row, int64_t K, uint8_t* codes, float* dw, float* cw) {
  const int64_t nb = K / kQBlock;
  const int ub = gguf_unit_bytes(t), off = t == WType::Q4_1 ? 4 : 2;
  const __m128i lo_mask = _mm_set1_epi8(0x0f);
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * ub;
    uint16_t h;
    std::memcpy(&h, blk, 2);
    const float d = _cvtsh_ss(h);
    dw[b] = d;
    if (t == WType::Q4_1) {
      std::memcpy(&h, blk + 2, 2);
      cw[b] = _cvtsh_ss(h);
    } else {
      cw[b] = (t == WType::Q8_0 ? -128.0f : -8.0f) * d;
    }
    if (t == WType::Q8_0) {
      const __m256i c = _mm256_loadu_si256((const __m256i*)(blk + off));
      _mm256_storeu_si256((__m256i*)(codes + b * 32), _mm256_xor_si256(c, flip));
    } else {
      const __m128i c = _mm_loadu_si128((const __m128i*)(blk + off));
      const __m128i lo = _mm_and_si128(c, lo_mask);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(c, 4), lo_mask);
      _mm256_storeu_si256((__m256i*)(codes + b * 32), _mm256_set_m128i(hi, lo));
    }
  }
}

// Register-blocked integer kernel: a tile of NR weight rows x TR activation rows keeps
// NR*TR accumulators of 16 lanes. Each weight row is unpacked once (to L1) for all T rows
// and each activation block pair is loaded once for the NR rows, so a 16-row call streams
// W once and spends its time in vpdpbusd. Every output (n, t) is computed by the same
// instruction sequence whatever the tile shape or T (batch invariance):
//   acc  = sum_p float(dpbusd(codes_p, q_p)) * (dwx_p * dx_p)     (lanes: 8 per block)
//   acc += cw[b..b+16) * ds[b..b+16)                               (the offset terms)
//   y    = reduce_add(acc)
constexpr int kNR = 4, kTR = 4;

// Low half + high half (a lane shuffle: GCC 12 warns spuriously on the extract intrinsics).
inline __m256 fold(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_castps512_ps256(_mm512_shuffle_f32x4(v, v, 0xEE)));
}

// The eight lane sums of v[0..8): [sum(v0), ..., sum(v7)], one fixed tree per vector.
inline __m256 hsum8(const __m256* v) {
  const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 a = _mm256_hadd_ps(s01, s23), b = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

struct RowPack {  // one unpacked weight row
  const uint8_t* codes;
  const float* dwx;  // [npair + 1, 16]
  const float* cw;   // [nb] (+16 zero padding)
};

template <int NR, int TR>
inline void tile(const RowPack* rp, const QActs* qa, int64_t t0, int64_t K, float* y, int64_t ldy, int64_t r0) {
  const int64_t nb = K / kQBlock, npair = nb / 2;
  __m512 acc[NR][TR];
  for (int n = 0; n < NR; ++n)
    for (int t = 0; t < TR; ++t) acc[n][t] = _mm512_setzero_ps();
  const int8_t* q[TR];
  const float* dx[TR];
  const float* ds[TR];
  for (int t = 0; t < TR; ++t) {
    q[t] = qa->q.data() + (t0 + t) * K;
    dx[t] = qa->dx.data() + (t0 + t) * nb * 8;
    ds[t] = qa->ds.data() + (t0 + t) * nb;
  }
  for (int64_t p = 0; p < npair; ++p) {
    __m512i c[NR];
    __m512 s[NR];
    for (int n = 0; n < NR; ++n) {
      c[n] = _mm512_loadu_si512(rp[n].codes + p * 64);
      s[n] = _mm512_load_ps(rp[n].dwx + p * 16);
    }
    for (int t = 0; t < TR; ++t) {
      const __m512i qv = _mm512_loadu_si512(q[t] + p * 64);
      const __m512 dv = _mm512_loadu_ps(dx[t] + p * 16);
      for (int n = 0; n < NR; ++n) {
        const __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[n], qv);
        acc[n][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(s[n], dv), acc[n][t]);
      }
    }
  }
  if (nb & 1) {  // last block alone, in lanes 0..7
    const int64_t b = nb - 1;
    for (int t = 0; t < TR; ++t) {
      const __m512i qv = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_loadu_si256((const __m256i*)(q[t] + b * 32)), 0);
      const __m512 dv = _mm512_insertf32x8(_mm512_setzero_ps(), _mm256_loadu_ps(dx[t] + b * 8), 0);
      for (int n = 0; n < NR; ++n) {
        const __m512i cv = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_loadu_si256((const __m256i*)(rp[n].codes + b * 32)), 0);
        const __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), cv, qv);
        acc[n][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(_mm512_load_ps(rp[n].dwx + npair * 16), dv),
                                    acc[n][t]);
      }
    }
  }
  for (int64_t b = 0; b < nb; b += 16) {
    const __mmask16 m = nb - b >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (nb - b)) - 1);
    for (int t = 0; t < TR; ++t) {
      const __m512 dsv = _mm512_maskz_loadu_ps(m, ds[t] + b);
      for (int n = 0; n < NR; ++n) acc[n][t] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, rp[n].cw + b), dsv, acc[n][t]);
    }
  }
  // Lane sums, eight accumulators at a time (zero-padded): each sum's tree is fixed.
  constexpr int NA = NR * TR, NG = (NA + 7) / 8;
  __m256 f[NG * 8];
  for (int i = 0; i < NG * 8; ++i)
    f[i] = i < NA ? fold(acc[i / TR][i % TR]) : _mm256_setzero_ps();
  alignas(32) float sums[NG * 8];
  for (int g = 0; g < NG; ++g) _mm256_store_ps(sums + g * 8, hsum8(f + g * 8));
  for (int i = 0; i < NA; ++i) y[(t0 + i % TR) * ldy + r0 + i / TR] = sums[i];
}

template <int NR>
inline void row_tile(const RowPack* rp, const QActs* qa, int64_t T, int64_t K, float* y, int64_t ldy, int64_t r0) {
  int64_t t = 0;
  for (; t + kTR <= T; t += kTR) tile<NR, kTR>(rp, qa, t, K, y, ldy, r0);
  switch (T - t) {
    case 3: tile<NR, 3>(rp, qa, t, K, y, ldy, r0); break;
    case 2: tile<NR, 2>(rp, qa, t, K, y, ldy, r0); break;
    case 1: tile<NR, 1>(rp, qa, t, K, y, ldy, r0); break;
    default: break;
  }
}

void linear_quant(const PackedWeight& w, const QActs* qa, int64_t T, float* y, int64_t ldy,
                  int64_t r0, int64_t r1) {
  const int64_t K = w.cols, nb = K / kQBlock, npair = nb / 2;
  const int64_t dwx_n = (npair + 1) * 16, cw_n = (nb + 31) / 16 * 16;  // 64-byte multiples
  static thread_local Buffer<uint8_t> code_buf;
  static thread_local Buffer<float> scale_buf;
  uint8_t* codes = tls_scratch(code_buf, (size_t)kNR * (K + 64));
  float* scales = tls_scratch(scale_buf, (size_t)kNR * (dwx_n + 2 * cw_n));
  RowPack rp[kNR];
  for (int64_t r = r0; r < r1; r += kNR) {
    const int nr = (int)std::min<int64_t>(kNR, r1 - r);
    for (int n = 0; n < nr; ++n) {
      uint8_t* c = codes + n * (K + 64);
      float* dwx = scales + n * (dwx_n + 2 * cw_n);
      float* dw = dwx + dwx_n;
      float* cw = dw + cw_n;
      unpack_row(w.type, w.row(r + n), K, c, dw, cw);
      for (int64_t p = 0; p < npair; ++p)
        _mm512_store_ps(dwx + p * 16, _mm512_insertf32x8(_mm512_set1_ps(dw[2 * p]), _mm256_set1_ps(dw[2 * p + 1]), 1));
      if (nb & 1) _mm512_store_ps(dwx + npair * 16, _mm512_set1_ps(dw[nb - 1]));
      rp[n] = {c, dwx, cw};
    }
    switch (nr) {
      case 4: row_tile<4>(rp, qa, T, K, y, ldy, r); break;
      case 3: row_tile<3>(rp, qa, T, K, y, ldy, r); break;
      case 2: row_tile<2>(rp, qa, T, K, y, ldy, r); break;
      default: row_tile<1>(rp, qa, T, K, y, ldy, r); break;
    }
  }
}

// Float weights: the row converted to fp32 once, then one FMA chain per activation row.
void linear_float(const PackedWeight& w, const float* x, int64_t T, float* y, int64_t ldy,
                  int64_t r0, int64_t r1) {
  const int64_t K = w.cols;
  static thread_local Buffer<float> row_buf;
  float* wr = tls_scratch(row_buf, (size_t)K + 16);
  const int64_t k16 = K / 16 * 16;
  const __mmask16 m = (__mmask16)((1u << (K - k16)) - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const float* wp;
    if (w.type == WType::F32) {
      wp = reinterpret_cast<const float*>(w.row(r));
    } else {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(w.row(r));
      int64_t k = 0;
      for (; k < k16; k += 16) {
        const __m256i h = _mm256_loadu_si256((const __m256i*)(src + k));
        const __m512 f = w.type == WType::F16
                             ? _mm512_cvtph_ps(h)
                             : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        _mm512_storeu_ps(wr + k, f);
      }
      for (; k < K; ++k) wr[k] = w.type == WType::F16 ? _cvtsh_ss(src[k]) : bf16_to_fp32(src[k]);
      wp = wr;
    }
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * K;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < k16; k += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(xt + k), _mm512_loadu_ps(wp + k), acc);
      if (k16 < K) acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xt + k16), _mm512_maskz_loadu_ps(m, wp + k16), acc);
      y[t * ldy + r] = _mm512_reduce_add_ps(acc);
    }
  }
}

}  // namespace

void linear_rows(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                 int64_t ldy, int64_t r0, int64_t r1) {
  if (is_quantized(w.type))
    linear_quant(w, qa, T, y, ldy, r0, r1);
  else
    linear_float(w, x, T, y, ldy, r0, r1);
}

}  // namespace dovetail::avx512
