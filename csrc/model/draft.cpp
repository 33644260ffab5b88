#include "model/draft.h"

#include <cmath>
#include <cstring>

#include "common/error.h"

namespace dovetail {

void check_vocab_map(const std::vector<int32_t>& vocab_map, int64_t V) {
  const int64_t n = (int64_t)vocab_map.size();
  for (int64_t i = 0; i < n; ++i) {
    DT_CHECK(vocab_map[i] >= 0 && vocab_map[i] < V, "vocab_map entry " + std::to_string(vocab_map[i]) +
                                                        " is outside the target vocabulary [0, " + std::to_string(V) + ")");
    DT_CHECK(i == 0 || vocab_map[i] > vocab_map[i - 1], "vocab_map must be strictly ascending (index " +
                                                            std::to_string(i) + ")");
  }
}

void check_draft_inputs(const float* features, const int32_t* tokens, int64_t T, int64_t D, int64_t V,
                        int64_t Vd, const int64_t* topk_rows, int64_t n_topk, int64_t k) {
  for (int64_t t = 0; t < T; ++t)
    DT_CHECK(tokens[t] >= 0 && tokens[t] < V, "token id " + std::to_string(tokens[t]) + " at index " +
                                                  std::to_string(t) + " is outside the vocabulary [0, " +
                                                  std::to_string(V) + ")");
  DT_CHECK(n_topk <= T, "more top-k rows than batch rows");
  DT_CHECK(n_topk == 0 || (k >= 1 && k <= 256 && k <= Vd),
           "top-k must be in [1, min(256, " + std::to_string(Vd) + ")], got " + std::to_string(k));
  for (int64_t i = 0; i < n_topk; ++i)
    DT_CHECK(topk_rows[i] >= 0 && topk_rows[i] < T, "top-k row " + std::to_string(topk_rows[i]) +
                                                        " outside the batch [0, " + std::to_string(T) + ")");
  if (features)
    for (int64_t i = 0; i < T * D; ++i)
      DT_CHECK(std::isfinite(features[i]), "features must be finite (row " + std::to_string(i / D) + ")");
}

DraftEngine::DraftEngine(const LayerDims& d, int64_t n_layers, const EngineOptions& o, const WeightMap& weights,
                         std::shared_ptr<const PackedWeight> embedding, std::shared_ptr<const PackedWeight> lm_head,
                         std::vector<int32_t> vocab_map)
    : embed_(std::move(embedding)), head_(std::move(lm_head)), vocab_map_(std::move(vocab_map)) {
  DT_CHECK(embed_ && head_, "the draft needs the target's embedding and LM head");
  if (!vocab_map_.empty()) {
    check_vocab_map(vocab_map_, head_->rows);
    const int64_t n = (int64_t)vocab_map_.size();
    head_ = std::make_shared<const PackedWeight>(select_rows(*head_, vocab_map_.data(), n));
  }
  DT_CHECK(n_layers >= 1, "the draft needs at least one layer");
  const int64_t D = d.dim;
  DT_CHECK(embed_->cols == D && head_->cols == D,
           "draft hidden size " + std::to_string(D) + " differs from the target's " + std::to_string(embed_->cols));
  e_norm_ = norm_named(weights, "fuse.e_norm", D);
  w1_ = pack_named(weights, "fuse.w1", D, D);
  w2_ = pack_named(weights, "fuse.w2", D, D);
  wz_ = pack_named(weights, "fuse.wz", D, 2 * D);
  stack_ = std::make_unique<LayerStack>(d, load_layers(weights, d, n_layers, false), o);
  const int64_t B = o.max_batch;
  e_.resize(B * D); h1_.resize(B * D); a_.resize(B * D); hz_.resize(B * 2 * D); z_.resize(B * D);
  logits_.resize(B * head_->rows);
}

void DraftEngine::set_threads(int n) {
  std::lock_guard<std::mutex> lock(mu_);
  stack_->set_threads(n);
}

size_t DraftEngine::weight_bytes() const {
  return stack_->weight_bytes() + w1_.data.size() + w2_.data.size() + wz_.data.size() +
         (vocab_map_.empty() ? 0 : head_->data.size());
}

void DraftEngine::forward(const float* features, const int32_t* tokens, const int32_t* positions, int64_t T,
                          const uint8_t* anc, bool append, float* hidden, const int64_t* topk_rows, int64_t n_topk,
                          int64_t k, int32_t* topk_ids, float* topk_logp) {
  std::lock_guard<std::mutex> lock(mu_);
  stack_->check(positions, T, anc, append);
  const int64_t D = dims().dim;
  check_draft_inputs(features, tokens, T, D, vocab(), draft_vocab(), topk_rows, n_topk, k);

  // Dynamic Gating Fusion.
  for (int64_t t = 0; t < T; ++t) dequantize_row(*embed_, tokens[t], e_.data() + t * D);
  rmsnorm(e_.data(), e_norm_.data(), e_.data(), T, D, dims().eps);             // e = RMSNorm(Emb(x))
  stack_->linear_rows(w1_, features, T, h1_.data(), true);                        // h1 = f W1^T
  stack_->linear_rows(w2_, e_.data(), T, a_.data(), true);                        // a = e W2^T
  for (int64_t t = 0; t < T; ++t) {                                               // [h1; SiLU(a)]
    std::memcpy(hz_.data() + t * 2 * D, h1_.data() + t * D, sizeof(float) * D);
    dgf_silu_rows(a_.data() + t * D, hz_.data() + t * 2 * D + D, D);
  }
  stack_->linear_rows(wz_, hz_.data(), T, z_.data(), true);                       // zpre = [h1; h2] Wz^T
  for (int64_t t = 0; t < T; ++t)                                                 // g = z h1 + (1 - z) h2
    dgf_mix_rows(h1_.data() + t * D, hz_.data() + t * 2 * D + D, z_.data() + t * D, hidden + t * D, D);

  stack_->run(hidden, positions, T, anc, append);

  if (n_topk > 0) {
    for (int64_t i = 0; i < n_topk; ++i) std::memcpy(e_.data() + i * D, hidden + topk_rows[i] * D, sizeof(float) * D);
    stack_->linear_rows(*head_, e_.data(), n_topk, logits_.data(), true);
    topk_log_softmax(logits_.data(), n_topk, draft_vocab(), k, topk_ids, topk_logp, options().threads);
    if (!vocab_map_.empty())
      for (int64_t i = 0; i < n_topk * k; ++i) topk_ids[i] = vocab_map_[topk_ids[i]];
  }
}

void DraftEngine::commit(const int64_t* kept, int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  stack_->commit(kept, n);
}

void DraftEngine::truncate(int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  stack_->truncate(n);
}

}  // namespace dovetail
