// linear(): y = x W^T over every stored weight format. Scalar reference kernel and the
// dispatcher; the AVX2 / AVX-512 kernels live in cpu/x86/.
//
// Each output row n is computed by one thread, the weights are read once per panel of 16
// rows for a tile of activation rows, and the per-element reduction order depends only on
// K: this is what makes the engine batch invariant.
#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "common/thread_pool.h"
#include "cpu/ops.h"
#include "cpu/quant_common.h"

namespace dovetail {

namespace scalar {

// Float weights, one output at a time: two sums of fused multiply-adds, over the even and
// the odd columns in order, added at the end (as the vector kernels keep them). bf16:
// vdpbf16ps's arithmetic on column pairs, even pairs to one sum and odd pairs to the other;
// per pair j, sum += w[2j+1] * x[2j+1] then sum += w[2j] * x[2j] (the product of two bf16
// values is exact in fp32, so each fused step rounds as the instruction does).
void linear_float(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y, int64_t ldy,
                  int64_t r0, int64_t r1) {
  const int64_t K = w.cols;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = float_index(w.type, r, 0, K);
    for (int64_t t = 0; t < T; ++t) {
      float sum[2] = {0.0f, 0.0f};
      if (w.type == WType::BF16) {
        const uint16_t* wr = float_panel<uint16_t>(w, 0) + base;
        const uint32_t* xt = qa->b.data() + t * qa->K2;
        for (int64_t j = 0; j < qa->K2; ++j) {
          const uint16_t* wj = wr + j * 2 * kPanel;
          float& s = sum[j & 1];
          s = std::fma(bf16_to_fp32(wj[1]), bf16_to_fp32((uint16_t)(xt[j] >> 16)), s);
          s = std::fma(bf16_to_fp32(wj[0]), bf16_to_fp32((uint16_t)(xt[j] & 0xffffu)), s);
        }
      } else {
        const float* xt = x + t * K;
        for (int64_t k = 0; k < K; ++k) {
          const float wk = w.type == WType::F32 ? float_panel<float>(w, 0)[base + k * kPanel]
                                                : fp16_to_fp32(float_panel<uint16_t>(w, 0)[base + k * kPanel]);
          sum[k & 1] = std::fma(wk, xt[k], sum[k & 1]);
        }
      }
      y[t * ldy + r] = sum[0] + sum[1];
    }
  }
}

void linear_rows(const PackedWeight& w, const float* x, const QActs* qa, int64_t T, float* y,
                 int64_t ldy, int64_t r0, int64_t r1) {
  if (!is_quantized(w.type)) return linear_float(w, x, qa, T, y, ldy, r0, r1);
  const int64_t K = w.cols;
  const int64_t nb = K / kQBlock;
  static thread_local Buffer<uint8_t> code_buf;
  static thread_local Buffer<float> scale_buf;
  uint8_t* codes = tls_scratch(code_buf, (size_t)K);
  float* dw = tls_scratch(scale_buf, (size_t)(2 * nb));
  float* cw = dw + nb;
  for (int64_t r = r0; r < r1; ++r) {
    unpack_row_scalar(w, r, codes, dw, cw);
    for (int64_t t = 0; t < T; ++t) {
      float acc = 0.0f, corr = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t slot = act_slot(t, b, nb);
        const int8_t* q = qa->qi.data() + slot * kQBlock;
        int32_t isum = 0;
        for (int i = 0; i < kQBlock; ++i) isum += (int32_t)codes[b * kQBlock + i] * q[i];
        acc += qa->di[slot] * dw[b] * (float)isum;
        corr += cw[b] * qa->dsi[slot];
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
    case Isa::Avx512Bf16: fn = avx512::linear_rows_dpbf16; break;
    case Isa::Avx2: fn = avx2::linear_rows; break;
    // (the VEX form where the CPU has AVX-VNNI, else the EVEX form of AVX512_VNNI + VL)
    case Isa::AvxVnni: fn = cpu_features().avxvnni ? avx2::linear_rows_vnni : avx2::linear_rows_vnni_evex; break;
    case Isa::Scalar: break;
  }
  // Rows are split in contiguous chunks of whole panels so each thread
  // streams its part of W; below ~64K multiply-adds, handing work to another thread costs
  // more than it saves. One chunk per thread: one long stream each (measured against two
  // and eight chunks per thread, which were up to 5% and 10-17% slower at T = 1 to 16).
  const int64_t N = w.rows;
  const bool tiny = N * w.cols * T < (1 << 16);
  parallel_range(tiny ? 1 : nthreads, panel_count(N), 1, [&](int64_t p0, int64_t p1) {
    fn(w, x, qa, T, y, ldy, p0 * kPanel, std::min(N, p1 * kPanel));
  }, 1);
}

}  // namespace dovetail
