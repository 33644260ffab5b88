// Prompt lookup: draft tokens copied from the context. When the context's last n tokens
// (max_n down to min_n) occurred before, the tokens that followed their latest occurrence
// are proposed as a chain, verified like a drafted tree (dovetail_ext.lookup documents the
// method; this is its implementation for Python and the C API alike).
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace dovetail {

struct LookupParams {
  int64_t min_n = 3, max_n = 4, max_tokens = 6;
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
  int64_t propose(int64_t limit, int32_t* out) const;
  void clear();

  const std::vector<int32_t>& tokens() const { return tokens_; }
  const LookupParams& params() const { return params_; }

 private:
  std::string key(int64_t end, int64_t n) const;  // the n tokens before index end, as bytes

  LookupParams params_;
  std::vector<int32_t> tokens_;
  // n-gram -> index of the token after its latest occurrence. An n-gram is entered once its
  // continuation exists, so the suffix being matched never finds itself.
  std::unordered_map<std::string, int64_t> next_;
};

}  // namespace dovetail
