// Row-wise and element-wise ops (RMSNorm, RoPE, SwiGLU, GeGLU). Each row is reduced in a
// fixed order, so results do not depend on how many rows there are.
#include <cmath>

#include "common/cpu_features.h"
#include "common/dgf_math.h"
#include "common/gelu.h"
#include "common/softcap.h"
#include "cpu/ops.h"

namespace dovetail {

// A row's sum of squares in 16 lanes (element i goes to lane i % 16), the lanes then added
// in order. The lanes are independent, so the compiler vectorizes the loop at any vector
// width with the same bits; a single running sum was a chain of D dependent additions
// (0.6 us per 576-wide row, ~4% of a 4-token target call, run while the other threads wait).
namespace {
float sum_squares(const float* x, int64_t D) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[i + l] * x[i + l];
  for (int l = 0; i < D; ++i, ++l) acc[l] += x[i] * x[i];
  float ss = 0.0f;
  for (int l = 0; l < kLanes; ++l) ss += acc[l];
  return ss;
}
}  // namespace

void rmsnorm(const float* x, const float* w, float* y, int64_t T, int64_t D, float eps) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * D;
    const float inv = 1.0f / std::sqrt(sum_squares(xr, D) / (float)D + eps);
    float* yr = y + t * D;
    for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

void rope_inplace(float* x, int64_t T, int64_t H, int64_t Dh, int64_t ld, const int32_t* positions,
                  const float* cos_tab, const float* sin_tab) {
  const int64_t half = Dh / 2;
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cos_tab + (int64_t)positions[t] * half;
    const float* s = sin_tab + (int64_t)positions[t] * half;
    for (int64_t h = 0; h < H; ++h) {
      float* v = x + t * ld + h * Dh;
      for (int64_t i = 0; i < half; ++i) {
        const float x0 = v[i], x1 = v[i + half];
        v[i] = x0 * c[i] - x1 * s[i];
        v[i + half] = x1 * c[i] + x0 * s[i];
      }
    }
  }
}

void rope_tables(double theta, int64_t Dh, int64_t S, std::vector<float>& cos_tab, std::vector<float>& sin_tab,
                 const float* factors, double mscale) {
  const int64_t half = Dh / 2;
  cos_tab.assign((size_t)(S * half), 0.0f);
  sin_tab.assign((size_t)(S * half), 0.0f);
  for (int64_t i = 0; i < half; ++i) {
    double inv_freq = std::pow(theta, -2.0 * (double)i / (double)Dh);
    if (factors) inv_freq /= (double)factors[i];
    for (int64_t pos = 0; pos < S; ++pos) {
      const double ang = (double)pos * inv_freq;
      cos_tab[pos * half + i] = (float)(std::cos(ang) * mscale);
      sin_tab[pos * half + i] = (float)(std::sin(ang) * mscale);
    }
  }
}

void swiglu(const float* g, const float* u, float* out, int64_t n) {
  switch (active_isa()) {
    case Isa::Avx512:
    case Isa::Avx512Bf16: return avx512::swiglu(g, u, out, n);
    case Isa::Avx2:
    case Isa::AvxVnni: return avx2::swiglu(g, u, out, n);
    case Isa::Scalar: break;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

void geglu(const float* g, const float* u, float* out, int64_t n) {
  switch (active_isa()) {
    case Isa::Avx512:
    case Isa::Avx512Bf16: return avx512::geglu(g, u, out, n);
    case Isa::Avx2:
    case Isa::AvxVnni: return avx2::geglu(g, u, out, n);
    case Isa::Scalar: break;
  }
  for (int64_t i = 0; i < n; ++i)
    out[i] = g[i] / (1.0f + std::exp(-gelu_arg(g[i]))) * u[i];
}

void softcap(float* x, int64_t n, float cap) {
  switch (active_isa()) {
    case Isa::Avx512:
    case Isa::Avx512Bf16: return avx512::softcap(x, n, cap);
    case Isa::Avx2:
    case Isa::AvxVnni: return avx2::softcap(x, n, cap);
    case Isa::Scalar: break;
  }
  const float k = softcap_k(cap);
  for (int64_t i = 0; i < n; ++i) x[i] = softcap_value(x[i], cap, k);
}

void dgf_silu_rows(const float* a, float* h2, int64_t D) {
  for (int64_t i = 0; i < D; ++i) h2[i] = dgf_silu(a[i]);
}

void dgf_mix_rows(const float* h1, const float* h2, const float* zpre, float* g, int64_t D) {
  for (int64_t i = 0; i < D; ++i) g[i] = dgf_mix(h1[i], h2[i], zpre[i]);
}

}  // namespace dovetail
