// The sampling distribution over a vocabulary (temperature, top-k, top-p) and the shifted
// exponential sums it and the draft's top-k share. One vector pass gives every token's
// weight e and their sum; the filters then look only at the head of the distribution, the
// tokens with e >= t for a cut t lowered 256-fold at a time until it holds what they need.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>

#include "common/cpu_features.h"
#include "common/error.h"
#include "cpu/ops.h"
#include "cpu/x86/exp_poly.h"

namespace dovetail {

bool exp_shift_sum(const float* x, int64_t n, float m, float s, float* e, double* lanes) {
  switch (active_isa()) {
    case Isa::Avx512:
    case Isa::Avx512Bf16: return avx512::exp_shift_sum(x, n, m, s, e, lanes);
    case Isa::Avx2:
    case Isa::AvxVnni: return avx2::exp_shift_sum(x, n, m, s, e, lanes);
    case Isa::Scalar: break;
  }
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    const float z = (x[i] - m) * s;
    ok &= !std::isnan(z);
    const float v = z >= exp_poly::kMin ? exp_poly::exp_scalar(z) : 0.0f;
    if (e) e[i] = v;
    lanes[i % 16] += v;
  }
  return ok;
}

double lane_total(const double* lanes) {
  double t = 0.0;
  for (int j = 0; j < 16; ++j) t += lanes[j];
  return t;
}

namespace {

constexpr float kFirstCut = 0x1p-8f;  // e of the row's maximum is exactly 1

// The tokens with e >= t, in id order (t = 0 gives all of them).
void at_least(const float* e, int64_t V, float t, std::vector<int32_t>& out) {
  out.clear();
  for (int64_t i = 0; i < V; ++i)
    if (e[i] >= t) out.push_back((int32_t)i);
}

double sum_of(const float* e, const std::vector<int32_t>& ids) {
  double t = 0.0;
  for (int32_t i : ids) t += e[i];
  return t;
}

// Sorts ids (given in increasing order) by descending e, ties by id. e >= 0, so its bits
// order as unsigned integers: the key is their complement. Long lists go through a stable
// radix sort (3 passes of 11 bits, passes where every key has the same digit skipped),
// several times faster than a comparison sort; short ones through std::sort on packed keys.
void sort_by_weight(const float* e, std::vector<int32_t>& ids) {
  const size_t n = ids.size();
  thread_local std::vector<uint64_t> packed;
  packed.resize(n);
  for (size_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, &e[ids[j]], sizeof bits);
    packed[j] = (uint64_t)(~bits) << 32 | (uint32_t)ids[j];
  }
  if (n <= 512) {
    std::sort(packed.begin(), packed.end());
  } else {
    thread_local std::vector<uint64_t> other;
    other.resize(n);
    for (int shift = 32; shift < 64; shift += 11) {
      uint32_t count[2048] = {};
      for (uint64_t k : packed) ++count[(k >> shift) & 2047];
      if (count[(packed[0] >> shift) & 2047] == n) continue;  // one digit: already in order
      uint32_t at = 0;
      for (uint32_t& c : count) at += std::exchange(c, at);
      for (uint64_t k : packed) other[count[(k >> shift) & 2047]++] = k;
      packed.swap(other);
    }
  }
  for (size_t j = 0; j < n; ++j) ids[j] = (int32_t)(uint32_t)packed[j];
}

}  // namespace

void sampling_dist(const float* x, int64_t V, double temperature, int64_t top_k, double top_p,
                   std::vector<int32_t>& ids, std::vector<double>& probs) {
  DT_CHECK(V >= 1, "logits need at least one entry");
  DT_CHECK(std::isfinite(temperature) && temperature > 0.0, "temperature must be a finite number > 0");
  DT_CHECK(top_k >= 0, "top_k must be >= 0");
  DT_CHECK(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1]");
  const float s = (float)(1.0 / temperature);
  DT_CHECK(std::isfinite(s), "temperature " + std::to_string(temperature) +
                                 " is too small to sample with (1 / temperature overflows float32); "
                                 "temperature 0 decodes greedily");
  DT_CHECK(s > 0.0f, "temperature " + std::to_string(temperature) +
                         " is too large to sample with (1 / temperature underflows float32)");
  int64_t top = 0;
  argmax_rows(x, 1, V, &top);
  const float m = x[top];
  DT_CHECK(!std::isnan(m), "logits contain NaN");
  DT_CHECK(m != INFINITY, "logits contain +inf");
  DT_CHECK(m != -INFINITY, "every logit is -inf: there is no token to sample");

  thread_local std::vector<float> ebuf;
  thread_local std::vector<int32_t> kept;
  thread_local std::vector<float> vals;
  if ((int64_t)ebuf.size() < V) ebuf.resize((size_t)V);
  float* e = ebuf.data();
  double lanes[16] = {};
  DT_CHECK(exp_shift_sum(x, V, m, s, e, lanes), "logits contain NaN");

  bool all = true;  // no filter has applied: every token is kept
  double total = lane_total(lanes);
  if (top_k > 0 && top_k < V) {
    for (float t = kFirstCut;; t *= 0x1p-8f) {  // t reaches 0 after underflow: all tokens
      at_least(e, V, t, kept);
      if ((int64_t)kept.size() >= top_k) break;
    }
    vals.resize(kept.size());
    for (size_t j = 0; j < kept.size(); ++j) vals[j] = e[kept[j]];
    std::nth_element(vals.begin(), vals.begin() + (top_k - 1), vals.end(), std::greater<float>());
    const float kth = vals[(size_t)top_k - 1];
    kept.erase(std::remove_if(kept.begin(), kept.end(), [&](int32_t i) { return e[i] < kth; }), kept.end());
    all = false;
    total = sum_of(e, kept);
  }
  if (top_p < 1.0) {
    // Descending e (ties by id); with no top-k, the head e >= t grown until the mass before
    // its end reaches top_p, so that no token outside it can be kept.
    size_t n = 0;
    for (float t = kFirstCut;; t *= 0x1p-8f) {
      if (all) {
        at_least(e, V, t, kept);
        if (sum_of(e, kept) < top_p * total && (int64_t)kept.size() < V) continue;  // too little mass
      }
      sort_by_weight(e, kept);
      double before = 0.0;
      for (n = 0; n < kept.size() && before < top_p; ++n) before += (double)e[kept[n]] / total;
      if (!all || before >= top_p || (int64_t)kept.size() == V) break;
    }
    const float last = e[kept[n - 1]];
    while (n < kept.size() && e[kept[n]] == last) ++n;  // its ties stay too
    kept.resize(n);
    if (n <= 4096) {
      std::sort(kept.begin(), kept.end());
    } else {  // back to id order by one pass over the vocabulary
      thread_local std::vector<uint8_t> mark;
      mark.assign((size_t)V, 0);
      for (int32_t i : kept) mark[i] = 1;
      kept.clear();
      for (int64_t i = 0; i < V; ++i)
        if (mark[i]) kept.push_back((int32_t)i);
    }
    all = false;
    total = sum_of(e, kept);
  }
  const size_t n_out = all ? (size_t)V : kept.size();
  ids.resize(n_out);
  probs.resize(n_out);
  size_t j = 0;
  for (size_t r = 0; r < n_out; ++r) {
    const int32_t i = all ? (int32_t)r : kept[r];
    ids[j] = i;
    probs[j] = e[i] / total;
    j += e[i] > 0.0f;
  }
  ids.resize(j);
  probs.resize(j);
}

int32_t draw_from(const std::vector<int32_t>& ids, const std::vector<double>& probs, double u) {
  DT_CHECK(!ids.empty() && ids.size() == probs.size(), "a distribution needs a nonempty support");
  DT_CHECK(u >= 0.0 && u < 1.0, "u must be in [0, 1)");
  thread_local std::vector<double> cdf;  // one pass of running sums, then a binary search
  cdf.resize(probs.size());
  double run = 0.0;
  for (size_t j = 0; j < probs.size(); ++j) cdf[j] = run += probs[j];
  const size_t j = std::upper_bound(cdf.begin(), cdf.end(), u * run) - cdf.begin();
  return j < ids.size() ? ids[j] : ids.back();
}

}  // namespace dovetail
