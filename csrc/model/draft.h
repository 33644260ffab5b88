// The Dovetail draft on the CPU: Dynamic Gating Fusion of the target's feature f_j and the
// embedding of the next token x_{j+1}, then L LLaMA layers (the first without an input
// norm), no final norm, and the target's LM head for log-probabilities.
//
//   e = RMSNorm(Emb(x)),  h1 = f W1^T,  h2 = SiLU(e W2^T),  z = sigmoid([h1; h2] Wz^T)
//   g = z * h1 + (1 - z) * h2   ->  layers  ->  hidden (predicted next feature)
//
// The embedding table and the LM head are the target's packed weights, shared, never
// copied. A draft with a reduced vocabulary (vocab_map: ascending target ids) proposes only
// those tokens: its head is a packed copy of just those rows of the target's head, so each
// expansion step reads Vd rows instead of V, and returned ids are target ids. The KV cache works as in LayerStack: tree expansion appends scratch rows
// (append=true) that later calls see through their ancestor sets; commit keeps chosen rows.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "model/transformer.h"

namespace dovetail {

// Validates a draft call's inputs beyond the batch rules: token ids in [0, V), top-k rows
// inside the batch, k in [1, min(256, Vd)], finite features [T, D] (when given).
void check_draft_inputs(const float* features, const int32_t* tokens, int64_t T, int64_t D, int64_t V,
                        int64_t Vd, const int64_t* topk_rows, int64_t n_topk, int64_t k);
// Checks a reduced vocabulary (strictly ascending ids in [0, V)).
void check_vocab_map(const std::vector<int32_t>& vocab_map, int64_t V);

class DraftEngine {
 public:
  DraftEngine(const LayerDims& d, int64_t n_layers, const EngineOptions& o, const WeightMap& weights,
              std::shared_ptr<const PackedWeight> embedding, std::shared_ptr<const PackedWeight> lm_head,
              std::vector<int32_t> vocab_map = {});

  // features [T, D] (f_j), tokens [T] (x_{j+1}), positions [T]; ancestors [T, P+T] over
  // the scratch rows (P = pending rows kept when append) or null (causal in the batch).
  // Writes hidden [T, D]; for each of the n_topk rows in topk_rows, the k most likely next
  // tokens (ids, log-probabilities, best first).
  void forward(const float* features, const int32_t* tokens, const int32_t* positions, int64_t T,
               const uint8_t* ancestors, bool append, float* hidden, const int64_t* topk_rows, int64_t n_topk,
               int64_t k, int32_t* topk_ids, float* topk_logp);
  void commit(const int64_t* kept, int64_t n);
  void truncate(int64_t n);
  void set_threads(int n);

  int64_t n_past() const { return stack_->n_past(); }
  int64_t pending() const { return stack_->pending(); }
  const EngineOptions& options() const { return stack_->options(); }
  const LayerDims& dims() const { return stack_->dims(); }
  int64_t vocab() const { return embed_->rows; }         // token ids accepted as input
  int64_t draft_vocab() const { return head_->rows; }    // tokens the draft can propose
  const KvCache& kv() const { return stack_->kv(); }
  size_t weight_bytes() const;
  // The token embedding it shares with its target (identifies the target it was built for).
  const PackedWeight* embedding() const { return embed_.get(); }

 private:
  std::shared_ptr<const PackedWeight> embed_, head_;
  std::vector<int32_t> vocab_map_;  // draft row -> target id; empty: identity
  std::vector<float> e_norm_;
  PackedWeight w1_, w2_, wz_;
  std::unique_ptr<LayerStack> stack_;
  std::mutex mu_;
  Buffer<float> e_, h1_, a_, hz_, z_, logits_;
};

}  // namespace dovetail
