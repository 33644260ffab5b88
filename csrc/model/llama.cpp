#include "model/llama.h"

#include <cmath>
#include <cstring>

#include "common/error.h"

namespace dovetail {

LlamaEngine::LlamaEngine(const LlamaParams& p, const EngineOptions& o, const WeightMap& weights) : p_(p) {
  DT_CHECK(p.vocab > 0 && p.layer.dim > 0 && p.layers > 0, "model dimensions must be positive");
  DT_CHECK(p.first_layer >= 0 && p.first_layer < p.layers,
           "first_layer " + std::to_string(p.first_layer) + " outside [0, " + std::to_string(p.layers) +
               "): at least one layer runs on the CPU");
  const int64_t D = p.layer.dim;
  tok_embd_ = std::make_shared<PackedWeight>(pack_named(weights, "token_embd", p.vocab, D));
  lm_head_ = weights.count("output") ? std::make_shared<PackedWeight>(pack_named(weights, "output", p.vocab, D))
                                     : tok_embd_;
  out_norm_ = norm_named(weights, "output_norm", D);
  LayerDims d = p.layer;
  d.rope_factors = rope_factors_named(weights, d.head_dim);
  stack_ = std::make_unique<LayerStack>(d, load_layers(weights, d, p.layers - p.first_layer, true, p.first_layer), o);
  x_.resize(o.max_batch * D);
  rows_.resize(o.max_batch * D);
}

void LlamaEngine::set_threads(int n) {
  std::lock_guard<std::mutex> lock(mu_);
  stack_->set_threads(n);
}

size_t LlamaEngine::weight_bytes() const {
  return stack_->weight_bytes() + tok_embd_->data.size() + (lm_head_ != tok_embd_ ? lm_head_->data.size() : 0);
}

void LlamaEngine::check_rows(const int32_t* positions, int64_t T, const uint8_t* anc, const int64_t* logit_rows,
                             int64_t n_logits, const int64_t* feature_rows, int64_t n_features) const {
  stack_->check(positions, T, anc, false);
  DT_CHECK(n_logits <= options().max_batch && n_features <= options().max_batch, "too many output rows");
  for (int64_t i = 0; i < n_logits; ++i)
    DT_CHECK(logit_rows[i] >= 0 && logit_rows[i] < T, "logit row " + std::to_string(logit_rows[i]) +
                                                          " outside the batch [0, " + std::to_string(T) + ")");
  for (int64_t i = 0; i < n_features; ++i)
    DT_CHECK(feature_rows[i] >= 0 && feature_rows[i] < T, "feature row " + std::to_string(feature_rows[i]) +
                                                              " outside the batch [0, " + std::to_string(T) + ")");
}

void LlamaEngine::run(const int32_t* positions, int64_t T, const uint8_t* anc, const int64_t* logit_rows,
                      int64_t n_logits, float* logits, const int64_t* feature_rows, int64_t n_features,
                      float* features) {
  const int64_t D = p_.layer.dim;
  stack_->run(x_.data(), positions, T, anc, false);
  // Final norm and LM head only for the rows asked for.
  for (int64_t i = 0; i < n_features; ++i)
    rmsnorm(x_.data() + feature_rows[i] * D, out_norm_.data(), features + i * D, 1, D, p_.layer.eps);
  if (n_logits > 0) {
    for (int64_t i = 0; i < n_logits; ++i)
      rmsnorm(x_.data() + logit_rows[i] * D, out_norm_.data(), rows_.data() + i * D, 1, D, p_.layer.eps);
    stack_->linear_rows(*lm_head_, rows_.data(), n_logits, logits, true);
    if (p_.final_softcap > 0) softcap(logits, n_logits * p_.vocab, p_.final_softcap);
  }
}

void LlamaEngine::forward(const int32_t* tokens, const int32_t* positions, int64_t T, const uint8_t* anc,
                          const int64_t* logit_rows, int64_t n_logits, float* logits,
                          const int64_t* feature_rows, int64_t n_features, float* features) {
  std::lock_guard<std::mutex> lock(mu_);
  DT_CHECK(p_.first_layer == 0, "this engine starts at layer " + std::to_string(p_.first_layer) +
                                    ": give it hidden states (forward_hidden)");
  check_rows(positions, T, anc, logit_rows, n_logits, feature_rows, n_features);
  for (int64_t t = 0; t < T; ++t)
    DT_CHECK(tokens[t] >= 0 && tokens[t] < p_.vocab, "token id " + std::to_string(tokens[t]) + " at index " +
                                                        std::to_string(t) + " is outside the vocabulary [0, " +
                                                        std::to_string(p_.vocab) + ")");
  embed(tokens, T);
  run(positions, T, anc, logit_rows, n_logits, logits, feature_rows, n_features, features);
}

void LlamaEngine::forward_seqs(const int32_t* tokens, const int32_t* positions, const int64_t* seqs, int64_t S,
                               float* logits) {
  std::lock_guard<std::mutex> lock(mu_);
  DT_CHECK(p_.first_layer == 0, "this engine starts at layer " + std::to_string(p_.first_layer) +
                                    ": sequences need every layer here");
  stack_->check_seqs(positions, seqs, S);
  for (int64_t t = 0; t < S; ++t)
    DT_CHECK(tokens[t] >= 0 && tokens[t] < p_.vocab, "token id " + std::to_string(tokens[t]) + " at index " +
                                                        std::to_string(t) + " is outside the vocabulary [0, " +
                                                        std::to_string(p_.vocab) + ")");
  const int64_t D = p_.layer.dim;
  embed(tokens, S);
  stack_->run_seqs(x_.data(), positions, seqs, S);
  for (int64_t i = 0; i < S; ++i) rmsnorm(x_.data() + i * D, out_norm_.data(), rows_.data() + i * D, 1, D, p_.layer.eps);
  stack_->linear_rows(*lm_head_, rows_.data(), S, logits, true);
  if (p_.final_softcap > 0) softcap(logits, S * p_.vocab, p_.final_softcap);
}

void LlamaEngine::select(int64_t s) {
  std::lock_guard<std::mutex> lock(mu_);
  stack_->select(s);
}

void LlamaEngine::embed(const int32_t* tokens, int64_t T) {  // x = Emb(tokens) (times sqrt(D) for Gemma)
  const int64_t D = p_.layer.dim;
  for (int64_t t = 0; t < T; ++t) dequantize_row(*tok_embd_, tokens[t], x_.data() + t * D);
  if (p_.scale_embeddings) {
    const float s = std::sqrt((float)D);
    for (int64_t i = 0; i < T * D; ++i) x_.data()[i] *= s;
  }
}

void LlamaEngine::forward_hidden(const float* hidden, const int32_t* positions, int64_t T, const uint8_t* anc,
                                 const int64_t* logit_rows, int64_t n_logits, float* logits,
                                 const int64_t* feature_rows, int64_t n_features, float* features) {
  std::lock_guard<std::mutex> lock(mu_);
  check_rows(positions, T, anc, logit_rows, n_logits, feature_rows, n_features);
  const int64_t D = p_.layer.dim;
  for (int64_t i = 0; i < T * D; ++i)
    DT_CHECK(std::isfinite(hidden[i]), "hidden states must be finite (row " + std::to_string(i / D) + ")");
  std::memcpy(x_.data(), hidden, sizeof(float) * T * D);
  run(positions, T, anc, logit_rows, n_logits, logits, feature_rows, n_features, features);
}

void LlamaEngine::commit(const int64_t* kept, int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  stack_->commit(kept, n);
}

void LlamaEngine::truncate(int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  stack_->truncate(n);
}

}  // namespace dovetail
