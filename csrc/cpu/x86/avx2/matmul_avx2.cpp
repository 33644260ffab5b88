// AVX2 + FMA linear kernels. Quantized weights: pmaddubsw integer dot products (q8_0
// uses the sign trick so 16-bit pair sums cannot saturate); float weights: fp32 FMAs.
#include <immintrin.h>

#include "cpu/ops.h"
#include "cpu/x86/avx2_common.h"
#include "cpu/quant_common.h"

namespace dovetail::avx2 {

namespace {

using x86::hsum256;

inline __m256i mask_tail(int64_t n) {  // first n of 8 int32 lanes set
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), idx);
}

void linear_quant(const PackedWeight& w, const QActs* qa, int64_t T, float* y, int64_t ldy,
                  int64_t r0, int64_t r1) {
  const int64_t K = w.cols, nb = K / kQBlock;
  const bool q8 = w.type == WType::Q8_0;
  static thread_local Buffer<uint8_t> code_buf;
  static thread_local Buffer<float> scale_buf;
  uint8_t* codes = tls_scratch(code_buf, (size_t)K + 32);
  float* dw = tls_scratch(scale_buf, (size_t)(2 * nb + 8));
  float* cw = dw + nb;
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  for (int64_t r = r0; r < r1; ++r) {
    unpack_row_scalar(w, r, codes, dw, cw);
    for (int64_t t = 0; t < T; ++t) {
      const int8_t* q = qa->q.data() + t * K;
      const float* da = qa->d.data() + t * nb;
      const float* ds = qa->ds.data() + t * nb;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const __m256i c = _mm256_loadu_si256((const __m256i*)(codes + b * 32));
        const __m256i a = _mm256_loadu_si256((const __m256i*)(q + b * 32));
        __m256i pairs;
        if (q8) {  // signed weights: |w| x sign(a, w) keeps pair sums within int16
          const __m256i ws = _mm256_xor_si256(c, flip);
          pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(ws, ws), _mm256_sign_epi8(a, ws));
        } else {
          pairs = _mm256_maddubs_epi16(c, a);
        }
        const __m256i isum = _mm256_madd_epi16(pairs, ones16);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(da[b] * dw[b]), acc);
      }
      float corr = 0.0f;
      if (!q8) {  // q8_0 took the signed dot product above: no offset to correct
        __m256 cacc = _mm256_setzero_ps();
        int64_t b = 0;
        for (; b + 8 <= nb; b += 8) cacc = _mm256_fmadd_ps(_mm256_loadu_ps(cw + b), _mm256_loadu_ps(ds + b), cacc);
        if (b < nb) {
          const __m256i m = mask_tail(nb - b);
          cacc = _mm256_fmadd_ps(_mm256_maskload_ps(cw + b, m), _mm256_maskload_ps(ds + b, m), cacc);
        }
        corr = hsum256(cacc);
      }
      y[t * ldy + r] = hsum256(acc) + corr;
    }
  }
}

void linear_float(const PackedWeight& w, const float* x, int64_t T, float* y, int64_t ldy,
                  int64_t r0, int64_t r1) {
  const int64_t K = w.cols, k8 = K / 8 * 8;
  static thread_local Buffer<float> row_buf;
  float* wr = tls_scratch(row_buf, (size_t)K + 8);
  const __m256i m = mask_tail(K - k8);
  for (int64_t r = r0; r < r1; ++r) {
    const float* wp;
    if (w.type == WType::F32) {
      wp = reinterpret_cast<const float*>(w.row(r));
    } else {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(w.row(r));
      int64_t k = 0;
      for (; k < k8; k += 8) {
        const __m128i h = _mm_loadu_si128((const __m128i*)(src + k));
        const __m256 f = w.type == WType::F16
                             ? _mm256_cvtph_ps(h)
                             : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        _mm256_storeu_ps(wr + k, f);
      }
      for (; k < K; ++k) wr[k] = w.type == WType::F16 ? _cvtsh_ss(src[k]) : bf16_to_fp32(src[k]);
      wp = wr;
    }
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * K;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = 0; k < k8; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(xt + k), _mm256_loadu_ps(wp + k), acc);
      if (k8 < K) acc = _mm256_fmadd_ps(_mm256_maskload_ps(xt + k8, m), _mm256_maskload_ps(wp + k8, m), acc);
      y[t * ldy + r] = hsum256(acc);
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

}  // namespace dovetail::avx2
