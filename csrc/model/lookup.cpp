#include "model/lookup.h"

#include <algorithm>
#include <cstring>

#include "common/error.h"

namespace dovetail {

namespace {
// ValueError naming `what` unless 1 <= min_n <= max_n <= 64 (the suffix lengths matched).
void check_suffix_lengths(const char* what, int64_t min_n, int64_t max_n) {
  const std::string w = what;
  DT_CHECK(min_n >= 1, w + " min_n must be a positive integer, got " + std::to_string(min_n));
  DT_CHECK(max_n >= min_n, w + " max_n (" + std::to_string(max_n) + ") must be at least min_n (" +
                               std::to_string(min_n) + ")");
  DT_CHECK(max_n <= 64, w + " max_n must be at most 64, got " + std::to_string(max_n));
}
}  // namespace

TokenCorpus::TokenCorpus(std::vector<int32_t> tokens, const CorpusParams& p)
    : params_(p), tokens_(std::move(tokens)) {
  check_suffix_lengths("corpus", p.min_n, p.max_n);
  DT_CHECK(p.max_tokens >= 1 && p.max_tokens <= 64,
           "corpus max_tokens must be in [1, 64], got " + std::to_string(p.max_tokens));
  DT_CHECK(p.min_count >= 1, "corpus min_count must be a positive integer, got " + std::to_string(p.min_count));
  DT_CHECK(p.min_frac >= 0.0 && p.min_frac <= 1.0, "corpus min_frac must be in [0, 1], got " + std::to_string(p.min_frac));
  DT_CHECK(tokens_.size() < (size_t)INT32_MAX, "corpus holds too many tokens: " + std::to_string(tokens_.size()));
  for (size_t i = 0; i < tokens_.size(); ++i)
    DT_CHECK(tokens_[i] >= 0, "corpus token " + std::to_string(i) + " is negative: " + std::to_string(tokens_[i]));
  const int64_t K = p.max_n + p.max_tokens, N = (int64_t)tokens_.size();
  order_.resize(N);
  // Windows compared from offset k0 on, token by token (-1 past the end sorts first);
  // equal windows by position, so the order is the same on every run.
  const auto window_less = [&](int64_t k0) {
    return [this, K, k0](int32_t a, int32_t b) {
      for (int64_t k = k0; k < K; ++k) {
        const int32_t x = at(a, k), y = at(b, k);
        if (x != y) return x < y;
        if (x < 0) break;
      }
      return a < b;
    };
  };
  const int32_t top = N ? *std::max_element(tokens_.begin(), tokens_.end()) : 0;
  if (top >= (1 << 21) - 1) {  // ids too wide to pack: compare windows directly
    for (int64_t i = 0; i < N; ++i) order_[i] = (int32_t)i;
    std::sort(order_.begin(), order_.end(), window_less(0));
    return;
  }
  // The first three tokens of each window packed in 21 bits each (id + 1; 0 past the end)
  // sort as one integer; only windows that share them are compared further.
  std::vector<std::pair<uint64_t, int32_t>> keyed(N);
  for (int64_t i = 0; i < N; ++i) {
    uint64_t key = 0;
    for (int64_t k = 0; k < 3; ++k) key = (key << 21) | (uint64_t)(k < K ? at((int32_t)i, k) + 1 : 0);
    keyed[i] = {key, (int32_t)i};
  }
  std::sort(keyed.begin(), keyed.end());
  for (int64_t i = 0; i < N; ++i) order_[i] = keyed[i].second;
  const auto rest = window_less(3);
  for (int64_t i = 0; i < N;) {
    int64_t j = i + 1;
    while (j < N && keyed[j].first == keyed[i].first) ++j;
    if (j - i > 1 && K > 3) std::sort(order_.begin() + i, order_.begin() + j, rest);
    i = j;
  }
}

std::pair<int64_t, int64_t> TokenCorpus::range(const int32_t* q, int64_t n, int64_t lo, int64_t hi) const {
  // -1: the window's first n tokens sort before q, 1: after, 0: they are q.
  const auto cmp = [&](int32_t p) {
    for (int64_t k = 0; k < n; ++k) {
      const int32_t x = at(p, k);
      if (x != q[k]) return x < q[k] ? -1 : 1;
    }
    return 0;
  };
  const auto b = order_.begin();
  const auto first = std::partition_point(b + lo, b + hi, [&](int32_t p) { return cmp(p) < 0; });
  const auto last = std::partition_point(first, b + hi, [&](int32_t p) { return cmp(p) == 0; });
  return {first - b, last - b};
}

int64_t TokenCorpus::propose(const int32_t* ctx, int64_t n, int64_t limit, int32_t* out) const {
  const int64_t cap = std::min(limit, params_.max_tokens), N = (int64_t)order_.size();
  if (cap <= 0 || N == 0 || n <= 0) return 0;
  const auto b = order_.begin();
  // The windows in [lo, hi) that go on past offset k (those that end sort first).
  const auto going_on = [&](int64_t lo, int64_t hi, int64_t k) {
    return std::partition_point(b + lo, b + hi, [&](int32_t p) { return at(p, k) < 0; }) - b;
  };
  int64_t lo = 0, hi = 0, k = 0;
  for (int64_t m = std::min(params_.max_n, n); m >= params_.min_n; --m) {
    const auto r = range(ctx + n - m, m, 0, N);
    if (r.second - going_on(r.first, r.second, m) >= params_.min_count) {
      lo = r.first, hi = r.second, k = m;
      break;
    }
  }
  if (k == 0) return 0;
  int64_t count = 0;
  while (count < cap) {
    lo = going_on(lo, hi, k);
    const int64_t total = hi - lo;
    if (total < params_.min_count) break;
    // The runs of one next token are contiguous: the longest, the first (smallest id) on a tie.
    int64_t best = 0, best_lo = lo;
    for (int64_t i = lo; i < hi;) {
      const int32_t t = at(order_[i], k);
      const int64_t j = std::partition_point(b + i, b + hi, [&](int32_t p) { return at(p, k) == t; }) - b;
      if (j - i > best) best = j - i, best_lo = i;
      if (best >= hi - j) break;  // no run left can be longer
      i = j;
    }
    if (best < params_.min_count || (double)best < params_.min_frac * (double)total) break;
    out[count++] = at(order_[best_lo], k);
    lo = best_lo, hi = best_lo + best, ++k;
  }
  return count;
}

NgramLookup::NgramLookup(const LookupParams& p) : params_(p) {
  check_suffix_lengths("lookup", p.min_n, p.max_n);
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
  last_from_corpus_ = false;
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
  const int64_t c = corpus_ ? corpus_->propose(tokens_.data(), L, cap, out) : 0;
  last_from_corpus_ = c > 0;
  return c;
}

void NgramLookup::clear() {
  tokens_.clear();
  next_.clear();
}

}  // namespace dovetail
