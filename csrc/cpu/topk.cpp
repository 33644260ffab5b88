// Top-k of log-softmax per row, for tree expansion: one pass for the max, one vector pass
// for the sum of exponentials (exp_shift_sum), one selection pass keeping a sorted k-list. Argmax per row,
// for greedy verification.
#include <algorithm>
#include <cmath>

#include "common/cpu_features.h"
#include "common/thread_pool.h"
#include "cpu/ops.h"

namespace dovetail {

void topk_log_softmax(const float* logits, int64_t n, int64_t V, int64_t k, int32_t* ids, float* logp,
                      int nthreads) {
  parallel_range(n * V >= (1 << 16) ? nthreads : 1, n, 1, [&](int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = logits + r * V;
    int64_t top = 0;
    argmax_rows(x, 1, V, &top);
    const float mx = x[top];
    double lanes[16] = {};
    (void)exp_shift_sum(x, V, mx, 1.0f, nullptr, lanes);  // (draft logits are finite)
    const float lse = mx + (float)std::log(lane_total(lanes));
    int32_t* id = ids + r * k;
    float* val = logp + r * k;
    int64_t have = 0;
    for (int64_t i = 0; i < V; ++i) {
      const float v = x[i];
      if (have == k && v <= val[k - 1]) continue;  // strictly better than the worst kept
      int64_t pos = have < k ? have++ : k - 1;
      while (pos > 0 && val[pos - 1] < v) {  // equal values keep the earlier (lower) id first
        val[pos] = val[pos - 1];
        id[pos] = id[pos - 1];
        --pos;
      }
      val[pos] = v;
      id[pos] = (int32_t)i;
    }
    for (int64_t j = 0; j < k; ++j) val[j] -= lse;
  }
  });
}

void argmax_rows(const float* x, int64_t n, int64_t V, int64_t* out) {
  const Isa isa = active_isa();
  for (int64_t r = 0; r < n; ++r) {
    const float* row = x + r * V;
    switch (isa) {
      case Isa::Avx512:
      case Isa::Avx512Bf16: out[r] = avx512::argmax(row, V); continue;
      case Isa::Avx2:
      case Isa::AvxVnni: out[r] = avx2::argmax(row, V); continue;
      case Isa::Scalar: break;
    }
    int64_t best = 0;
    for (int64_t i = 1; i < V; ++i)
      if (x[r * V + i] > row[best]) best = i;
    out[r] = best;
  }
}

}  // namespace dovetail
