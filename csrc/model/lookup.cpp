#include "model/lookup.h"

#include <algorithm>
#include <cstring>

#include "common/error.h"

namespace dovetail {

NgramLookup::NgramLookup(const LookupParams& p) : params_(p) {
  DT_CHECK(p.min_n >= 1, "lookup min_n must be a positive integer, got " + std::to_string(p.min_n));
  DT_CHECK(p.max_n >= p.min_n, "lookup max_n (" + std::to_string(p.max_n) + ") must be at least min_n (" +
                                   std::to_string(p.min_n) + ")");
  DT_CHECK(p.max_n <= 64, "lookup max_n must be at most 64, got " + std::to_string(p.max_n));
  DT_CHECK(p.max_tokens >= 1, "lookup max_tokens must be a positive integer, got " + std::to_string(p.max_tokens));
}

std::string NgramLookup::key(int64_t end, int64_t n) const {
  return std::string(reinterpret_cast<const char*>(tokens_.data() + end - n), sizeof(int32_t) * n);
}

void NgramLookup::extend(const int32_t* tokens, int64_t n) {
  DT_CHECK(n == 0 || tokens, "lookup tokens missing");
  tokens_.reserve(tokens_.size() + n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = (int64_t)tokens_.size();
    tokens_.push_back(tokens[i]);
    for (int64_t m = params_.min_n; m <= std::min(params_.max_n, p); ++m) next_[key(p, m)] = p;
  }
}

int64_t NgramLookup::propose(int64_t limit, int32_t* out) const {
  const int64_t cap = std::min(limit, params_.max_tokens), L = (int64_t)tokens_.size();
  if (cap <= 0) return 0;
  for (int64_t m = std::min(params_.max_n, L); m >= params_.min_n; --m) {
    const auto it = next_.find(key(L, m));
    if (it == next_.end()) continue;
    // What followed the occurrence, and past the context's end the chain itself: where the
    // occurrence overlaps the suffix (a run, a loop), the text repeats with period L - j,
    // as an overlapping copy in LZ77 does.
    const int64_t j = it->second, period = L - j;
    for (int64_t k = 0; k < cap; ++k) out[k] = k < period ? tokens_[j + k] : out[k - period];
    return cap;
  }
  return 0;
}

void NgramLookup::clear() {
  tokens_.clear();
  next_.clear();
}

}  // namespace dovetail
