// Dynamic Gating Fusion math shared by the CUDA kernels and the host (tested on the CPU).
//
// For one channel c of one row: h1 = (f W1)[c], a = (e W2)[c] (pre-activation token path),
// zpre = ([h1; h2] Wz)[c]. Then h2 = SiLU(a), z = sigmoid(zpre), g = z*h1 + (1-z)*h2.
#pragma once
#include <cmath>

#include "common/hd.h"

namespace dovetail {

DT_HD float dgf_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
DT_HD float dgf_silu(float x) { return x * dgf_sigmoid(x); }
// Convex mix of the feature path h1 and the token path h2 under gate pre-activation zpre.
DT_HD float dgf_mix(float h1, float h2, float zpre) {
  const float z = dgf_sigmoid(zpre);
  return z * h1 + (1.0f - z) * h2;
}

}  // namespace dovetail
