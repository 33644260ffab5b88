// Prompt lookup: draft tokens copied from the context. When the context's last n tokens
// (max_n down to min_n) occurred before, the tokens that followed their latest occurrence
// are proposed as a chain, verified like a drafted tree (dovetail_ext.lookup documents the
// method; this is its implementation for Python and the C API alike).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace dovetail {

struct LookupParams {
  int64_t min_n = 3, max_n = 4, max_tokens = 6;
};

struct CorpusParams {
  int64_t min_n = 3, max_n = 6, max_tokens = 4, min_count = 4;
  double min_frac = 0.7;
};

// Corpus lookup: draft tokens from a fixed body of text (typically the target's own replies
// to many prompts), for the steps where the context itself does not repeat. Its windows of
// max_n + max_tokens tokens are sorted once (a suffix array cut at that depth), so the
// occurrences of any n-gram are one range of it, ordered by what followed them. A chain
// grows from the longest suffix of the context (max_n down to min_n) that occurred at least
// min_count times with a next token: each next token is the one that most of the matching
// occurrences continued with (the smallest id on a tie), taken while it is at least
// min_count of them and at least min_frac of those that go on, and only those continue.
class TokenCorpus {
 public:
  TokenCorpus(std::vector<int32_t> tokens, const CorpusParams& params);  // throws ValueError

  // The chain for a context ending in ctx[n - 1]: at most min(limit, max_tokens) tokens
  // into out (room for max_tokens); returns their count (0: no suffix qualified).
  int64_t propose(const int32_t* ctx, int64_t n, int64_t limit, int32_t* out) const;

  const std::vector<int32_t>& tokens() const { return tokens_; }
  const CorpusParams& params() const { return params_; }

 private:
  // The token at offset k of the window at position p (-1 past the corpus end).
  int32_t at(int32_t p, int64_t k) const { return p + k < (int64_t)tokens_.size() ? tokens_[p + k] : -1; }
  // The range of windows whose first n tokens are q[0..n), within [lo, hi).
  std::pair<int64_t, int64_t> range(const int32_t* q, int64_t n, int64_t lo, int64_t hi) const;

  CorpusParams params_;
  std::vector<int32_t> tokens_, order_;  // order_: window start positions, sorted by window
};

class NgramLookup {
 public:
  explicit NgramLookup(const LookupParams& params);  // throws ValueError on bad params

  // Append n tokens to the context.
  void extend(const int32_t* tokens, int64_t n);
  // The chain after the latest earlier occurrence of the longest matching suffix, continued
  // periodically where it runs into the suffix: min(limit, max_tokens) tokens into out
  // (room for max_tokens); returns their count (0: no suffix of min_n tokens or more
  // occurred before, or limit <= 0).
  // With a corpus set, a context without a match proposes the corpus's chain instead.
  int64_t propose(int64_t limit, int32_t* out) const;
  void clear();
  void set_corpus(std::shared_ptr<const TokenCorpus> corpus) { corpus_ = std::move(corpus); }
  const std::shared_ptr<const TokenCorpus>& corpus() const { return corpus_; }
  // Whether the last chain proposed came from the corpus.
  bool last_from_corpus() const { return last_from_corpus_; }

  const std::vector<int32_t>& tokens() const { return tokens_; }
  const LookupParams& params() const { return params_; }

 private:
  std::string key(int64_t end, int64_t n) const;  // the n tokens before index end, as bytes

  LookupParams params_;
  std::vector<int32_t> tokens_;
  // n-gram -> index of the token after its latest occurrence. An n-gram is entered once its
  // continuation exists, so the suffix being matched never finds itself.
  std::unordered_map<std::string, int64_t> next_;
  std::shared_ptr<const TokenCorpus> corpus_;
  mutable bool last_from_corpus_ = false;
};

}  // namespace dovetail
