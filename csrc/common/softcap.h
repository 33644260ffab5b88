// Gemma 2's soft-capping, cap tanh(x / cap), in the one form shared by the CPU kernels (the
// vector paths compute it lane by lane) and the device engines:
//   softcap(x) = cap (2 / (1 + exp(k x)) - 1),  k = -2 / cap.
#pragma once
#include <cmath>

#include "common/hd.h"

namespace dovetail {

DT_HD float softcap_k(float cap) { return -2.0f / cap; }
DT_HD float softcap_value(float x, float cap, float k) { return cap * (2.0f / (1.0f + expf(k * x)) - 1.0f); }

}  // namespace dovetail
