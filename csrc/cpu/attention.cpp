// Tree / causal attention over the KV cache: scalar kernels and the dispatcher.
#include <omp.h>

#include <cmath>

#include "common/error.h"
#include "cpu/attention_impl.h"
#include "cpu/ops.h"

namespace dovetail {

namespace {

inline float kv_load(float x) { return x; }
inline float kv_load(uint16_t x) { return bf16_to_fp32(x); }

template <typename KvT>
struct ScalarKern {
  static float dot(const float* q, const KvT* k, int64_t Dh) {
    float acc = 0.0f;
    for (int64_t i = 0; i < Dh; ++i) acc += q[i] * kv_load(k[i]);
    return acc;
  }
  static void axpy(float* out, float p, const KvT* v, int64_t Dh) {
    for (int64_t i = 0; i < Dh; ++i) out[i] += p * kv_load(v[i]);
  }
  static float exp(float x) { return std::exp(x); }
};

}  // namespace

namespace scalar {
void attention_one(const AttentionArgs& a, int64_t t, int64_t h, float* scores) {
  attention_one_dispatch<ScalarKern>(a, t, h, scores);
}
}  // namespace scalar

void attention(const AttentionArgs& a, int nthreads) {
  using Fn = void (*)(const AttentionArgs&, int64_t, int64_t, float*);
  Fn fn = scalar::attention_one;
  switch (active_isa()) {
    case Isa::Avx512: fn = avx512::attention_one; break;
    case Isa::Avx2: fn = avx2::attention_one; break;
    case Isa::Scalar: break;
  }
  const int64_t work = a.T * a.H, stride = a.n_past + a.n_prev + a.T;
  const bool tiny = work * stride * a.Dh < (1 << 15);  // a parallel region would cost more
  const int nt = tiny ? 1 : (int)std::min<int64_t>(nthreads, work);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t i = 0; i < work; ++i) fn(a, i / a.H, i % a.H, a.scratch + (int64_t)omp_get_thread_num() * stride);
}

}  // namespace dovetail
