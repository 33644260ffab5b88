// Row kernels of the DaViT helpers in plain C++ (no intrinsics). Each ISA translation unit
// includes this header and is compiled with its own flags, so the compiler vectorises the
// channel loops at that width. Internal linkage keeps the per-ISA copies apart (an inline
// function shared across TUs built with different flags could resolve to the wrong one).
#pragma once
#include <cmath>

namespace dovetail::davit {
namespace {  // one private copy per ISA translation unit, on purpose

// LayerNorm of one row of C: two passes (mean, then centred variance) as PyTorch does,
// statistics in double so rows up to 4C wide add no error of their own.
inline void ln_row(const float* x, int C, const float* g, const float* b, float eps, float* y) {
  double mean = 0.0;
  for (int c = 0; c < C; ++c) mean += x[c];
  mean /= C;
  double var = 0.0;
  for (int c = 0; c < C; ++c) {
    const double t = x[c] - mean;
    var += t * t;
  }
  var /= C;
  const float inv = (float)(1.0 / std::sqrt(var + eps)), mu = (float)mean;
  for (int c = 0; c < C; ++c) y[c] = (x[c] - mu) * inv * g[c] + b[c];
}

// One output row (image row yy) of ConvPosEnc on a [H, W, C] image:
// y = x + bias + sum over the 3x3 taps inside the image; wt is [tap][C].
inline void cpe_row(const float* img, int H, int W, int C, int yy, const float* wt, const float* bias,
                    float* out) {
  for (int xx = 0; xx < W; ++xx) {
    float* o = out + (long)xx * C;
    const float* xc = img + ((long)yy * W + xx) * C;
    for (int c = 0; c < C; ++c) o[c] = bias[c] + xc[c];
    for (int dy = -1; dy <= 1; ++dy) {
      const int sy = yy + dy;
      if (sy < 0 || sy >= H) continue;
      for (int dx = -1; dx <= 1; ++dx) {
        const int sx = xx + dx;
        if (sx < 0 || sx >= W) continue;
        const float* __restrict src = img + ((long)sy * W + sx) * C;
        const float* __restrict w = wt + (long)((dy + 1) * 3 + (dx + 1)) * C;
        float* __restrict oc = o;
        for (int c = 0; c < C; ++c) oc[c] += w[c] * src[c];
      }
    }
  }
}

}  // namespace
}  // namespace dovetail::davit
