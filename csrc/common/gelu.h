// GELU's tanh approximation (Gemma's gelu_pytorch_tanh), shared by the CPU kernels and the
// device engines, in the form of a sigmoid:
//   gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) = g / (1 + exp(-a(g)))
//   with a(g) = g (kGeluA + kGeluB g^2), kGeluA = 2 sqrt(2/pi), kGeluB = kGeluA x 0.044715.
#pragma once
#include <cmath>

#include "common/hd.h"

namespace dovetail {

constexpr float kGeluA = 1.5957691216057308f, kGeluB = 0.0713548162726009f;

DT_HD float gelu_arg(float g) { return g * fmaf(kGeluB, g * g, kGeluA); }

}  // namespace dovetail
