#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/error.h"

namespace dovetail {

namespace {

const WeightView& need(const std::map<std::string, WeightView>& w, const std::string& name,
                       int64_t rows, int64_t cols) {
  auto it = w.find(name);
  DT_CHECK(it != w.end(), "missing weight '" + name + "'");
  const WeightView& v = it->second;
  DT_CHECK(v.rows == rows && v.cols == cols,
           "weight '" + name + "' has shape (" + std::to_string(v.rows) + ", " + std::to_string(v.cols) +
               "), expected (" + std::to_string(rows) + ", " + std::to_string(cols) + ")");
  return v;
}

PackedWeight pack(const std::map<std::string, WeightView>& w, const std::string& name, int64_t rows, int64_t cols) {
  const WeightView& v = need(w, name, rows, cols);
  try {
    return pack_weight(v.type, v.rows, v.cols, v.data, v.nbytes);
  } catch (const ValueError& e) {
    throw_value_error("weight '" + name + "': " + e.what());
  }
}

std::vector<float> norm_vector(const std::map<std::string, WeightView>& w, const std::string& name, int64_t n) {
  const WeightView& v = need(w, name, 1, n);
  DT_CHECK(v.type == WType::F32 && v.nbytes == (size_t)n * 4, "norm weight '" + name + "' must be f32");
  const float* p = static_cast<const float*>(v.data);
  return std::vector<float>(p, p + n);
}

void add_inplace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace

LlamaEngine::LlamaEngine(const LlamaParams& p, const EngineOptions& o,
                         const std::map<std::string, WeightView>& weights)
    : p_(p), o_(o) {
  DT_CHECK(p.vocab > 0 && p.dim > 0 && p.ffn > 0 && p.layers > 0 && p.heads > 0 && p.kv_heads > 0 &&
               p.head_dim > 0, "model dimensions must be positive");
  DT_CHECK(p.head_dim % 2 == 0, "head_dim must be even for RoPE");
  DT_CHECK(p.heads % p.kv_heads == 0, "heads must be a multiple of kv_heads");
  DT_CHECK(o.context >= 1 && o.context <= (1 << 24), "context must be in [1, 16777216], got " + std::to_string(o.context));
  DT_CHECK(o.max_batch >= 1 && o.max_batch <= 4096, "max_batch must be in [1, 4096], got " + std::to_string(o.max_batch));
  DT_CHECK(o.threads >= 1 && o.threads <= 1024, "threads must be in [1, 1024], got " + std::to_string(o.threads));
  const int64_t D = p.dim, F = p.ffn, QD = p.heads * p.head_dim, KD = p.kv_heads * p.head_dim;

  tok_embd_ = std::make_shared<PackedWeight>(pack(weights, "token_embd", p.vocab, D));
  lm_head_ = weights.count("output") ? std::make_shared<PackedWeight>(pack(weights, "output", p.vocab, D)) : tok_embd_;
  out_norm_ = norm_vector(weights, "output_norm", D);
  layers_.resize(p.layers);
  for (int64_t l = 0; l < p.layers; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    Layer& L = layers_[l];
    L.attn_norm = norm_vector(weights, b + "attn_norm", D);
    L.ffn_norm = norm_vector(weights, b + "ffn_norm", D);
    L.wq = pack(weights, b + "attn_q", QD, D);
    L.wk = pack(weights, b + "attn_k", KD, D);
    L.wv = pack(weights, b + "attn_v", KD, D);
    L.wo = pack(weights, b + "attn_output", D, QD);
    L.w_gate = pack(weights, b + "ffn_gate", F, D);
    L.w_up = pack(weights, b + "ffn_up", F, D);
    L.w_down = pack(weights, b + "ffn_down", D, F);
  }
  kv_ = KvCache(p.layers, p.kv_heads, o.context, p.head_dim, o.kv_type);

  rope_tables(p.rope_theta, p.head_dim, o.context, cos_, sin_);

  const int64_t B = o.max_batch, widest = std::max({D, F, QD});
  x_.resize(B * D); xn_.resize(B * D); tmp_.resize(B * D); rows_.resize(B * D);
  q_.resize(B * QD); att_.resize(B * QD); k_.resize(B * KD); v_.resize(B * KD);
  gate_.resize(B * F); up_.resize(B * F);
  scores_.resize((size_t)o.threads * (o.context + B));
  anc_bits_.resize((size_t)(B * ((B + 63) / 64)));
  qa_.reserve(B, widest);
}

void LlamaEngine::set_threads(int n) {
  DT_CHECK(n >= 1 && n <= 1024, "threads must be in [1, 1024], got " + std::to_string(n));
  std::lock_guard<std::mutex> lock(mu_);
  if ((size_t)n * (o_.context + o_.max_batch) > scores_.size()) scores_.resize((size_t)n * (o_.context + o_.max_batch));
  o_.threads = n;
}

size_t LlamaEngine::weight_bytes() const {
  size_t total = tok_embd_->data.size() + (lm_head_ != tok_embd_ ? lm_head_->data.size() : 0);
  for (const Layer& L : layers_)
    for (const PackedWeight* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) total += w->data.size();
  return total;
}

void LlamaEngine::check_batch(const int32_t* tokens, const int32_t* positions, int64_t T, const uint8_t* anc,
                              const int64_t* logit_rows, int64_t n_logits, const int64_t* feature_rows,
                              int64_t n_features) const {
  DT_CHECK(T >= 1, "forward needs at least one token");
  DT_CHECK(T <= o_.max_batch, "batch of " + std::to_string(T) + " tokens exceeds the engine's max_batch " +
                                  std::to_string(o_.max_batch));
  DT_CHECK(n_past_ + T <= o_.context, "context full: " + std::to_string(n_past_) + " committed + " +
                                          std::to_string(T) + " new tokens exceed the context of " +
                                          std::to_string(o_.context));
  for (int64_t t = 0; t < T; ++t) {
    DT_CHECK(tokens[t] >= 0 && tokens[t] < p_.vocab, "token id " + std::to_string(tokens[t]) + " at index " +
                                                        std::to_string(t) + " is outside the vocabulary [0, " +
                                                        std::to_string(p_.vocab) + ")");
    DT_CHECK(positions[t] >= 0 && positions[t] < o_.context,
             "position " + std::to_string(positions[t]) + " at index " + std::to_string(t) +
                 " is outside the context [0, " + std::to_string(o_.context) + ")");
  }
  if (anc) {
    for (int64_t t = 0; t < T; ++t) {
      DT_CHECK(anc[t * T + t] == 1, "ancestors[" + std::to_string(t) + ", " + std::to_string(t) +
                                        "] must be set: a token always sees itself");
      for (int64_t j = 0; j < T; ++j) {
        DT_CHECK(anc[t * T + j] <= 1, "ancestors must be a 0/1 matrix");
        DT_CHECK(j <= t || anc[t * T + j] == 0,
                 "ancestors[" + std::to_string(t) + ", " + std::to_string(j) +
                     "] is set but a token may only see earlier batch tokens");
      }
    }
  }
  for (int64_t i = 0; i < n_logits; ++i)
    DT_CHECK(logit_rows[i] >= 0 && logit_rows[i] < T, "logit row " + std::to_string(logit_rows[i]) +
                                                          " outside the batch [0, " + std::to_string(T) + ")");
  for (int64_t i = 0; i < n_features; ++i)
    DT_CHECK(feature_rows[i] >= 0 && feature_rows[i] < T, "feature row " + std::to_string(feature_rows[i]) +
                                                              " outside the batch [0, " + std::to_string(T) + ")");
}

void LlamaEngine::run_linear(const PackedWeight& w, const float* x, int64_t T, float* y, bool quantize_input) {
  if (quantize_input && is_quantized(w.type)) quantize_acts(x, T, w.cols, qa_, o_.threads);
  linear(w, x, &qa_, T, y, w.rows, o_.threads);
}

void LlamaEngine::forward(const int32_t* tokens, const int32_t* positions, int64_t T, const uint8_t* anc,
                          const int64_t* logit_rows, int64_t n_logits, float* logits,
                          const int64_t* feature_rows, int64_t n_features, float* features) {
  std::lock_guard<std::mutex> lock(mu_);
  check_batch(tokens, positions, T, anc, logit_rows, n_logits, feature_rows, n_features);
  const int64_t D = p_.dim, F = p_.ffn, H = p_.heads, KV = p_.kv_heads, Dh = p_.head_dim;
  const int64_t QD = H * Dh, KD = KV * Dh, words = (T + 63) / 64;
  const int nt = o_.threads;

  // Ancestor sets as bitsets (causal when none are given).
  uint64_t* bits = anc_bits_.data();
  std::memset(bits, 0, sizeof(uint64_t) * T * words);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j <= t; ++j)
      if (!anc || anc[t * T + j]) bits[t * words + (j >> 6)] |= 1ull << (j & 63);

  // x = Emb(tokens)
  for (int64_t t = 0; t < T; ++t) dequantize_row(*tok_embd_, tokens[t], x_.data() + t * D);

  AttentionArgs aa;
  aa.q = q_.data(); aa.kv_type = kv_.type(); aa.S = kv_.slots(); aa.n_past = n_past_; aa.T = T;
  aa.H = H; aa.KV = KV; aa.Dh = Dh; aa.anc = bits; aa.anc_words = words; aa.out = att_.data();
  aa.scratch = scores_.data();

  for (int64_t l = 0; l < p_.layers; ++l) {
    Layer& L = layers_[l];
    // Attention block: x += Wo . attn(rope(Wq xn), rope(Wk xn), Wv xn), xn = rmsnorm(x)
    rmsnorm(x_.data(), L.attn_norm.data(), xn_.data(), T, D, p_.eps);
    run_linear(L.wq, xn_.data(), T, q_.data(), true);
    run_linear(L.wk, xn_.data(), T, k_.data(), L.wk.type != L.wq.type);
    run_linear(L.wv, xn_.data(), T, v_.data(), L.wv.type != L.wk.type);
    rope_inplace(q_.data(), T, H, Dh, QD, positions, cos_.data(), sin_.data());
    rope_inplace(k_.data(), T, KV, Dh, KD, positions, cos_.data(), sin_.data());
    kv_.store(l, n_past_, k_.data(), v_.data(), T);
    aa.k = kv_.k(l);
    aa.v = kv_.v(l);
    attention(aa, nt);
    run_linear(L.wo, att_.data(), T, tmp_.data(), true);
    add_inplace(x_.data(), tmp_.data(), T * D);
    // FFN block: x += W_down (silu(W_gate xn) * W_up xn), xn = rmsnorm(x)
    rmsnorm(x_.data(), L.ffn_norm.data(), xn_.data(), T, D, p_.eps);
    run_linear(L.w_gate, xn_.data(), T, gate_.data(), true);
    run_linear(L.w_up, xn_.data(), T, up_.data(), L.w_up.type != L.w_gate.type);
    swiglu(gate_.data(), up_.data(), gate_.data(), T * F);
    run_linear(L.w_down, gate_.data(), T, tmp_.data(), true);
    add_inplace(x_.data(), tmp_.data(), T * D);
  }

  // Final norm and LM head only for the rows asked for.
  for (int64_t i = 0; i < n_features; ++i)
    rmsnorm(x_.data() + feature_rows[i] * D, out_norm_.data(), features + i * D, 1, D, p_.eps);
  if (n_logits > 0) {
    for (int64_t i = 0; i < n_logits; ++i)
      rmsnorm(x_.data() + logit_rows[i] * D, out_norm_.data(), rows_.data() + i * D, 1, D, p_.eps);
    run_linear(*lm_head_, rows_.data(), n_logits, logits, true);
  }
  pending_ = T;
}

void LlamaEngine::commit(const int64_t* kept, int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  DT_CHECK(n <= pending_, "commit of " + std::to_string(n) + " rows but the last forward left " +
                              std::to_string(pending_) + " uncommitted rows");
  for (int64_t i = 0; i < n; ++i) {
    DT_CHECK(kept[i] >= 0 && kept[i] < pending_, "kept row " + std::to_string(kept[i]) +
                                                     " outside the last batch [0, " + std::to_string(pending_) + ")");
    DT_CHECK(i == 0 || kept[i] > kept[i - 1], "kept rows must be strictly increasing");
  }
  kv_.compact(n_past_, kept, n);
  n_past_ += n;
  pending_ = 0;
}

void LlamaEngine::truncate(int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  DT_CHECK(n >= 0 && n <= n_past_, "truncate to " + std::to_string(n) + " outside [0, " + std::to_string(n_past_) + "]");
  n_past_ = n;
  pending_ = 0;
}

}  // namespace dovetail
