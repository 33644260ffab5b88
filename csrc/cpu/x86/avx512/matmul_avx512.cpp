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

using x86::hsum256;

// sum_b cw[b] * ds[b] over nb blocks.
inline float block_dot(const float* cw, const float* ds, int64_t nb) {
  __m512 acc = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 16 <= nb; b += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(cw + b), _mm512_loadu_ps(ds + b), acc);
  if (b < nb) {
    const __mmask16 m = (__mmask16)((1u << (nb - b)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, cw + b), _mm512_maskz_loadu_ps(m, ds + b), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// One activation row against one unpacked weight row: the same instruction sequence for
// every row and every batch size (batch invariance). Per block pair p:
//   acc += float(dpbusd(codes_p, q_p)) * (dw_p * da_p)   (16 lanes, 8 per block)
inline float dot_row(const uint8_t* codes, const float* dwx, const int8_t* q, const float* dx, const float* cw,
                     const float* ds, int64_t nb) {
  const int64_t npair = nb / 2;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t p = 0; p < npair; ++p) {
    const __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(codes + p * 64),
                                             _mm512_loadu_si512(q + p * 64));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(_mm512_load_ps(dwx + p * 16), _mm512_loadu_ps(dx + p * 16)), acc);
  }
  float tail = 0.0f;
  if (nb & 1) {
    const int64_t b = nb - 1;
    const __m256i isum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_loadu_si256((const __m256i*)(codes + b * 32)),
                                             _mm256_loadu_si256((const __m256i*)(q + b * 32)));
    tail = hsum256(_mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(_mm256_load_ps(dwx + npair * 16),
                                                                          _mm256_loadu_ps(dx + b * 8))));
  }
  return _mm512_reduce_add_ps(acc) + tail + block_dot(cw, ds, nb);
}

void linear_quant(const PackedWeight& w, const QActs* qa, int64_t T, float* y, int64_t ldy,
                  int64_t r0, int64_t r1) {
  const int64_t K = w.cols, nb = K / kQBlock, npair = nb / 2;
  static thread_local Buffer<uint8_t> code_buf;
  static thread_local Buffer<float> scale_buf;
  static thread_local Buffer<float> dwx_buf;
  uint8_t* codes = tls_scratch(code_buf, (size_t)K + 64);
  float* dw = tls_scratch(scale_buf, (size_t)(2 * nb + 16));
  float* cw = dw + nb;
  float* dwx = tls_scratch(dwx_buf, (size_t)(npair + 1) * 16);  // dw of each block over 8 lanes
  for (int64_t r = r0; r < r1; ++r) {
    unpack_row(w.type, w.row(r), K, codes, dw, cw);
    for (int64_t p = 0; p < npair; ++p)
      _mm512_store_ps(dwx + p * 16, _mm512_insertf32x8(_mm512_set1_ps(dw[2 * p]), _mm256_set1_ps(dw[2 * p + 1]), 1));
    if (nb & 1) _mm512_store_ps(dwx + npair * 16, _mm512_set1_ps(dw[nb - 1]));
    for (int64_t t = 0; t < T; ++t)
      y[t * ldy + r] = dot_row(codes, dwx, qa->q.data() + t * K, qa->dx.data() + t * nb * 8, cw,
                               qa->ds.data() + t * nb, nb);
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
