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
#include <memory>
#include <mutex>
#include <vector>

#include "model/transformer.h"

namespace dovetail {

struct LlamaParams {
  int64_t vocab = 0, layers = 0;
  LayerDims layer;  // every layer's shape and variant (biases, norms, gate, windows); rope_factors
                    // come from the weights
  // Layers [first_layer, layers) run here; the ones before run elsewhere (a device prefix,
  // model/device_engine.h), whose hidden states forward_hidden takes.
  int64_t first_layer = 0;
  bool scale_embeddings = false;  // Gemma 3: token embeddings times sqrt(dim) (rounded to fp32)
  float final_softcap = 0.0f;     // Gemma 2: logits soft-capped, cap tanh(logit / cap); 0: none
};

// forward / commit / truncate lock the engine: concurrent callers are serialized.
class LlamaEngine {
 public:
  LlamaEngine(const LlamaParams& p, const EngineOptions& o, const WeightMap& weights);

  // logit_rows / feature_rows index the batch; outputs are [n_logits, vocab] and
  // [n_features, dim] fp32. `ancestors` is a [T, T] 0/1 matrix or null for causal.
  void forward(const int32_t* tokens, const int32_t* positions, int64_t T, const uint8_t* ancestors,
               const int64_t* logit_rows, int64_t n_logits, float* logits,
               const int64_t* feature_rows, int64_t n_features, float* features);
  // As forward, from the hidden states [T, D] that enter layer first_layer.
  void forward_hidden(const float* hidden, const int32_t* positions, int64_t T, const uint8_t* ancestors,
                      const int64_t* logit_rows, int64_t n_logits, float* logits,
                      const int64_t* feature_rows, int64_t n_features, float* features);
  // One new token for each of S distinct sequences (EngineOptions::sequences), decoded in
  // one pass over the weights: row r is token tokens[r] of sequence seqs[r] at positions[r];
  // logits [S, vocab]; each row is committed to its sequence at once (LayerStack::run_seqs).
  void forward_seqs(const int32_t* tokens, const int32_t* positions, const int64_t* seqs, int64_t S,
                    float* logits);
  // The sequence forward / commit / truncate / n_past act on (its rows committed first).
  void select(int64_t s);
  // Keep batch rows `kept` (strictly increasing) of the last forward.
  void commit(const int64_t* kept, int64_t n);
  // Forget committed tokens past `n` (n <= n_past).
  void truncate(int64_t n);
  void set_threads(int n);  // takes effect on the next forward

  int64_t n_past() const { return stack_->n_past(); }
  int64_t n_past_of(int64_t s) const { return stack_->n_past_of(s); }
  int64_t sequence() const { return stack_->selected(); }
  int64_t sequences() const { return stack_->sequences(); }
  size_t kv_bytes() const { return stack_->kv_bytes(); }
  int64_t pending() const { return stack_->pending(); }
  const LlamaParams& params() const { return p_; }
  const EngineOptions& options() const { return stack_->options(); }
  const KvCache& kv() const { return stack_->kv(); }
  std::shared_ptr<const PackedWeight> token_embedding() const { return tok_embd_; }
  std::shared_ptr<const PackedWeight> lm_head() const { return lm_head_; }
  size_t weight_bytes() const;

 private:
  LlamaParams p_;
  std::shared_ptr<PackedWeight> tok_embd_, lm_head_;
  std::vector<float> out_norm_;
  std::unique_ptr<LayerStack> stack_;
  // Checks the batch and output rows; runs the stack on x_ and the final norm and head.
  void run(const int32_t* positions, int64_t T, const uint8_t* anc, const int64_t* logit_rows, int64_t n_logits,
           float* logits, const int64_t* feature_rows, int64_t n_features, float* features);
  void check_rows(const int32_t* positions, int64_t T, const uint8_t* anc, const int64_t* logit_rows,
                  int64_t n_logits, const int64_t* feature_rows, int64_t n_features) const;
  void embed(const int32_t* tokens, int64_t T);
  std::mutex mu_;
  Buffer<float> x_, rows_;
};

}  // namespace dovetail
