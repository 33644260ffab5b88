// Per-element math of the device draft engine, shared by its CUDA kernels and its host
// backend (the CPU tests run these same functions). Everything is fp32 unless named bf16.
#pragma once
#include <cstdint>

#include "common/dgf_math.h"
#include "common/dtype.h"
#include "common/gelu.h"
#include "common/hd.h"
#include "common/softcap.h"

namespace dovetail::dev {

using bf16_t = uint16_t;

// Rotate-half RoPE of one pair (x0 = v[i], x1 = v[i + Dh/2]) by the angle with cos c, sin s.
DT_HD void rope_pair(float& x0, float& x1, float c, float s) {
  const float a = x0, b = x1;
  x0 = a * c - b * s;
  x1 = b * c + a * s;
}

DT_HD float swiglu(float g, float u) { return g / (1.0f + expf(-g)) * u; }
// A scaled attention score, soft-capped (Gemma 2; common/softcap.h) when cap > 0.
DT_HD float softcap_score(float z, float cap) { return cap > 0 ? softcap_value(z, cap, softcap_k(cap)) : z; }
DT_HD float geglu(float g, float u) { return g / (1.0f + expf(-gelu_arg(g))) * u; }

// Ancestor bit j of a token's bitset.
DT_HD bool bit_set(const uint64_t* bits, int64_t j) { return (bits[j >> 6] >> (j & 63)) & 1u; }

// Whether key j of a call (committed slot j < n_past, or scratch slot j - n_past: the batch
// token of that index) is inside the sliding window of a token at position pos.
DT_HD bool in_window(int window, int pos, int j, int n_past, const int32_t* positions) {
  return window <= 0 || (j < n_past ? j : positions[j - n_past]) > pos - window;
}

// Online softmax: a running (max m, sum l) and value accumulator acc[Dh] over the keys seen
// so far. Adding a key with score s: returns the factor that rescales the old acc and l, and
// the weight p of the new key; the caller does acc = acc * scale + p * v.
struct OnlineSoftmax {
  float m = -INFINITY, l = 0.0f;
  DT_HD void add(float s, float& scale, float& p) {
    const float m2 = s > m ? s : m;
    scale = expf(m - m2);  // exp(-inf) = 0 on the first key
    p = expf(s - m2);
    l = l * scale + p;
    m = m2;
  }
};

// Top-k order: larger value first, equal values by lower index (as the CPU top-k).
DT_HD bool topk_before(float v1, int32_t i1, float v2, int32_t i2) { return v1 > v2 || (v1 == v2 && i1 < i2); }

}  // namespace dovetail::dev
