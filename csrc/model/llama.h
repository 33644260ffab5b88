// The LLaMA target engine: one forward over a batch of T new tokens with explicit
// positions and per-token ancestor sets serves prefill, decode and tree verification.
//
//   forward(tokens[T], positions[T], ancestors[T,T]) -> logits rows, feature rows
//   commit(kept)   keep chosen batch rows in the KV cache, compacted after the prefix
//
// A batch token t attends to the committed prefix [0, n_past) and to the batch tokens j
// with ancestors[t, j] set (j <= t, the diagonal always set). Features are the hidden
// states after the final RMSNorm (the LM head's input).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/ops.h"
#include "model/kv_cache.h"

namespace dovetail {

struct LlamaParams {
  int64_t vocab = 0, dim = 0, ffn = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0;
  float rope_theta = 10000.0f, eps = 1e-5f;
};

struct EngineOptions {
  int64_t context = 2048;   // KV slots (committed + scratch)
  int64_t max_batch = 128;  // largest T of one forward
  int threads = 1;
  KvType kv_type = KvType::F32;
};

// A tensor handed over by the loader: raw storage, [rows, cols] (cols = 1-D length).
struct WeightView {
  WType type = WType::F32;
  int64_t rows = 0, cols = 0;
  const void* data = nullptr;
  size_t nbytes = 0;
};

// forward / commit / truncate lock the engine: concurrent callers are serialized.
class LlamaEngine {
 public:
  LlamaEngine(const LlamaParams& p, const EngineOptions& o, const std::map<std::string, WeightView>& weights);

  // logit_rows / feature_rows index the batch; outputs are [n_logits, vocab] and
  // [n_features, dim] fp32. `ancestors` is a [T, T] 0/1 matrix or null for causal.
  void forward(const int32_t* tokens, const int32_t* positions, int64_t T, const uint8_t* ancestors,
               const int64_t* logit_rows, int64_t n_logits, float* logits,
               const int64_t* feature_rows, int64_t n_features, float* features);
  // Keep batch rows `kept` (strictly increasing) of the last forward.
  void commit(const int64_t* kept, int64_t n);
  // Forget committed tokens past `n` (n <= n_past).
  void truncate(int64_t n);

  int64_t n_past() const { return n_past_; }
  int64_t pending() const { return pending_; }
  const LlamaParams& params() const { return p_; }
  const EngineOptions& options() const { return o_; }
  void set_threads(int n);  // thread-safe; takes effect on the next forward
  const KvCache& kv() const { return kv_; }
  std::shared_ptr<const PackedWeight> token_embedding() const { return tok_embd_; }
  std::shared_ptr<const PackedWeight> lm_head() const { return lm_head_; }
  size_t weight_bytes() const;

 private:
  struct Layer {
    std::vector<float> attn_norm, ffn_norm;
    PackedWeight wq, wk, wv, wo, w_gate, w_up, w_down;
  };
  void check_batch(const int32_t* tokens, const int32_t* positions, int64_t T, const uint8_t* ancestors,
                   const int64_t* logit_rows, int64_t n_logits, const int64_t* feature_rows,
                   int64_t n_features) const;
  void run_linear(const PackedWeight& w, const float* x, int64_t T, float* y, bool quantize_input);

  LlamaParams p_;
  EngineOptions o_;
  std::vector<Layer> layers_;
  std::vector<float> out_norm_;
  std::shared_ptr<PackedWeight> tok_embd_, lm_head_;
  KvCache kv_;
  std::vector<float> cos_, sin_;
  int64_t n_past_ = 0, pending_ = 0;
  std::mutex mu_;

  // Scratch, allocated once for max_batch rows.
  Buffer<float> x_, xn_, q_, k_, v_, att_, gate_, up_, tmp_, scores_, rows_;
  Buffer<uint64_t> anc_bits_;
  QActs qa_;
};

}  // namespace dovetail
