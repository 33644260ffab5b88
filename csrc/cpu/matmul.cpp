// linear(): y = x W^T over every stored weight format. Scalar reference kernel and the
// dispatcher; the AVX2 / AVX-512 kernels live in cpu/x86/.
//
// Each output row n is computed by one thread, the weight row is read once for all T
// activation rows, and the per-element reduction order depends only on K: this is what
// makes the engine batch invariant.
#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "common/thread_pool.h"
#include "cpu/ops.h"
#include "cpu/quant_common.h"

namespace dovetail {

namespace scalar {

// bf16 weights: vdpbf16ps's arithmetic, one output at a time. Per pair j of columns,
// sum += w[2j+1] * x[2j+1] then sum += w[2j] * x[2j], each a fused multiply-add (the product
// of two bf16 values is exact in fp32, so this is the instruction's rounding); even pairs go
// to one sum and odd pairs to another, added at the end, as the vector kernels keep them.
void linear_bf16(const PackedWeight& w, const QActs* qa, int64_t T, float* y, int64_t ldy, int64_t r0,
                 int64_t r1) {
  const int64_t K2 = qa->K2;
  const uint16_t* wd = reinterpret_cast<const uint16_t*>(w.data.data());
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* wr = wd + bf16_index(r, 0, K2);
    for (int64_t t = 0; t < T; ++t) {
      const uint32_t* xt = qa->b.data() + t * K2;
      float sum[2] = {0.0f, 0.0f};
      for (int64_t j = 0; j < K2; ++j) {
        const uint16_t* wj = wr + j * 2 * kPanel;
        float& s = sum[j & 1];
        s = std::fma(bf16_to_fp32(wj[1]), bf16_to_fp32((uint16_t)(xt[j] >> 16)), s);
        s = std::fma(bf16_to_fp32(wj[0]), bf16_to_fp32((uint16_t)(xt[j] & 0xffffu)), s);
      }
      y[t * ldy + r] = sum[0] + sum[1];
    }
  }
}

void linear_rows(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                 int64_t ldy, int64_t r0, int64_t r1) {
  const int64_t K = w.cols;
  if (w.type == WType::BF16) return linear_bf16(w, qa, T, y, ldy, r0, r1);
  if (!is_quantized(w.type)) {
    static thread_local Buffer<float> row_buf;
    float* wr = tls_scratch(row_buf, (size_t)K);
    for (int64_t r = r0; r < r1; ++r) {
      dequantize_row(w, r, wr);  // exact: f16/bf16 -> f32 is lossless
      for (int64_t t = 0; t < T; ++t) {
        const float* xt = x + t * K;
        float acc = 0.0f;
        for (int64_t k = 0; k < K; ++k) acc += xt[k] * wr[k];
        y[t * ldy + r] = acc;
      }
    }
    return;
  }
  const int64_t nb = K / kQBlock;
  static thread_local Buffer<uint8_t> code_buf;
  static thread_local Buffer<float> scale_buf;
  uint8_t* codes = tls_scratch(code_buf, (size_t)K);
  float* dw = tls_scratch(scale_buf, (size_t)(2 * nb));
  float* cw = dw + nb;
  for (int64_t r = r0; r < r1; ++r) {
    unpack_row_scalar(w, r, codes, dw, cw);
    for (int64_t t = 0; t < T; ++t) {
      const int8_t* q = qa->q.data() + t * K;
      const float* da = qa->d.data() + t * nb;
      const float* ds = qa->ds.data() + t * nb;
      float acc = 0.0f, corr = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t isum = 0;
        for (int i = 0; i < kQBlock; ++i) isum += (int32_t)codes[b * kQBlock + i] * q[b * kQBlock + i];
        acc += da[b] * dw[b] * (float)isum;
        corr += cw[b] * ds[b];
      }
      y[t * ldy + r] = acc + corr;
    }
  }
}

}  // namespace scalar

void linear(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
            int64_t ldy, int nthreads) {
  if (T <= 0) return;
  if (is_quantized(w.type))
    DT_CHECK(qa && qa->T >= T && qa->K == w.cols, "linear: quantized activations missing or of the wrong shape");
  if (w.type == WType::BF16)
    DT_CHECK(qa && qa->T >= T && qa->K == w.cols && qa->K2 == bf16_pairs(w.cols),
             "linear: bf16 activations missing or of the wrong shape");
  using Fn = void (*)(const PackedWeight&, const float*, const QActs*, int64_t, float*, int64_t,
                      int64_t, int64_t);
  Fn fn = scalar::linear_rows;
  switch (active_isa()) {
    case Isa::Avx512: fn = avx512::linear_rows; break;
    case Isa::Avx2: fn = avx2::linear_rows; break;
    case Isa::Scalar: break;
  }
  // Rows are split in contiguous chunks (whole panels of quantized weights) so each thread
  // streams its part of W; below ~64K multiply-adds, handing work to another thread costs
  // more than it saves. One chunk per thread: one long stream each (measured against two
  // and eight chunks per thread, which were up to 5% and 10-17% slower at T = 1 to 16).
  const int64_t N = w.rows, unit = is_quantized(w.type) || w.type == WType::BF16 ? kPanel : 1;
  const bool tiny = N * w.cols * T < (1 << 16);
  parallel_range(tiny ? 1 : nthreads, (N + unit - 1) / unit, 16 / unit, [&](int64_t p0, int64_t p1) {
    fn(w, x, qa, T, y, ldy, p0 * unit, std::min(N, p1 * unit));
  }, 1);
}

}  // namespace dovetail
