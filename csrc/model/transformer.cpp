#include "model/transformer.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/error.h"

namespace dovetail {

namespace {

std::string shape_str(int ndim, int64_t rows, int64_t cols) {
  return ndim == 1 ? "(" + std::to_string(cols) + ",)" : "(" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
}

// The weight `name`: a matrix [rows, cols], or with rows 0 a vector [cols] (1-D as given).
const WeightView& need(const WeightMap& w, const std::string& name, int64_t rows, int64_t cols) {
  auto it = w.find(name);
  DT_CHECK(it != w.end(), "missing weight '" + name + "'");
  const WeightView& v = it->second;
  const int want_ndim = rows == 0 ? 1 : 2;
  DT_CHECK(v.ndim == want_ndim && v.rows == (rows == 0 ? 1 : rows) && v.cols == cols,
           "weight '" + name + "' has shape " + shape_str(v.ndim, v.rows, v.cols) + ", expected " +
               shape_str(want_ndim, rows, cols));
  return v;
}

void add_inplace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace

PackedWeight pack_named(const WeightMap& w, const std::string& name, int64_t rows, int64_t cols) {
  const WeightView& v = need(w, name, rows, cols);
  try {
    return pack_weight(v.type, v.rows, v.cols, v.data, v.nbytes);
  } catch (const ValueError& e) {
    throw_value_error("weight '" + name + "': " + e.what());
  }
}

PackedWeight pack_stacked(const WeightMap& w, const std::vector<std::pair<std::string, int64_t>>& parts,
                          int64_t cols) {
  std::vector<const WeightView*> views;
  int64_t rows = 0;
  size_t bytes = 0;
  for (const auto& [name, r] : parts) {
    views.push_back(&need(w, name, r, cols));
    if (views.back()->type != views.front()->type) return {};
    rows += r;
    bytes += views.back()->nbytes;
  }
  std::vector<uint8_t> joined(bytes);
  size_t at = 0;
  for (const WeightView* v : views) {
    std::memcpy(joined.data() + at, v->data, v->nbytes);
    at += v->nbytes;
  }
  try {
    return pack_weight(views.front()->type, rows, cols, joined.data(), bytes);
  } catch (const ValueError&) {
    return {};  // a malformed part: packed apart, where its error names it
  }
}

std::vector<float> norm_named(const WeightMap& w, const std::string& name, int64_t n) {
  const WeightView& v = need(w, name, 0, n);
  DT_CHECK(v.type == WType::F32 && v.nbytes == (size_t)n * 4, "1-D weight '" + name + "' must be f32");
  const float* p = static_cast<const float*>(v.data);
  return std::vector<float>(p, p + n);
}

std::vector<float> rope_factors_named(const WeightMap& w, int64_t head_dim) {
  if (!w.count("rope_freqs")) return {};
  std::vector<float> f = norm_named(w, "rope_freqs", head_dim / 2);
  for (float v : f) DT_CHECK(std::isfinite(v) && v > 0, "weight 'rope_freqs' must hold finite positive factors");
  return f;
}

LayerExtras layer_extras_named(const WeightMap& w, const LayerDims& d, const std::string& b) {
  const int64_t QD = d.heads * d.head_dim, KD = d.kv_heads * d.head_dim;
  // The named 1-D weights of this layer joined end to end when the config declares them (`on`),
  // none otherwise.
  auto optional = [&](bool on, std::initializer_list<std::pair<const char*, int64_t>> parts, const char* what) {
    std::vector<float> joined;
    for (const auto& [part, n] : parts) {
      if (!on) {
        DT_CHECK(!w.count(b + part), "weight '" + b + part + "' given but the model config has no " + what);
        continue;
      }
      const std::vector<float> v = norm_named(w, b + part, n);
      joined.insert(joined.end(), v.begin(), v.end());
    }
    return joined;
  };
  LayerExtras x;
  x.bqkv = optional(d.qkv_bias, {{"attn_q.bias", QD}, {"attn_k.bias", KD}, {"attn_v.bias", KD}}, "attention bias");
  x.q_norm = optional(d.qk_norm, {{"attn_q_norm", d.head_dim}}, "q/k norm");
  x.k_norm = optional(d.qk_norm, {{"attn_k_norm", d.head_dim}}, "q/k norm");
  x.post_attn_norm = optional(d.post_norms, {{"post_attention_norm", d.dim}}, "post norms");
  x.post_ffn_norm = optional(d.post_norms, {{"post_ffw_norm", d.dim}}, "post norms");
  return x;
}

std::vector<LayerWeights> load_layers(const WeightMap& w, const LayerDims& d, int64_t n_layers, bool first_has_norm,
                                      int64_t first) {
  const int64_t D = d.dim, F = d.ffn, QD = d.heads * d.head_dim, KD = d.kv_heads * d.head_dim;
  std::vector<LayerWeights> layers(n_layers);
  for (int64_t l = 0; l < n_layers; ++l) {
    const std::string b = "blk." + std::to_string(first + l) + ".";
    LayerWeights& L = layers[l];
    if (first + l > 0 || first_has_norm) L.attn_norm = norm_named(w, b + "attn_norm", D);
    L.ffn_norm = norm_named(w, b + "ffn_norm", D);
    L.wqkv = pack_stacked(w, {{b + "attn_q", QD}, {b + "attn_k", KD}, {b + "attn_v", KD}}, D);
    if (!L.wqkv.rows) {
      L.wq = pack_named(w, b + "attn_q", QD, D);
      L.wk = pack_named(w, b + "attn_k", KD, D);
      L.wv = pack_named(w, b + "attn_v", KD, D);
    }
    L.wo = pack_named(w, b + "attn_output", D, QD);
    L.w_gate_up = pack_stacked(w, {{b + "ffn_gate", F}, {b + "ffn_up", F}}, D);
    if (!L.w_gate_up.rows) {
      L.w_gate = pack_named(w, b + "ffn_gate", F, D);
      L.w_up = pack_named(w, b + "ffn_up", F, D);
    }
    L.w_down = pack_named(w, b + "ffn_down", D, F);
    L.extras = layer_extras_named(w, d, b);
    L.local = d.local_layer(first + l);
    L.nope = d.nope_layer(first + l);
  }
  return layers;
}

LayerStack::LayerStack(const LayerDims& d, std::vector<LayerWeights> layers, const EngineOptions& o)
    : d_(d), o_(o), layers_(std::move(layers)) {
  DT_CHECK(d.dim > 0 && d.ffn > 0 && d.heads > 0 && d.kv_heads > 0 && d.head_dim > 0,
           "model dimensions must be positive");
  DT_CHECK(d.head_dim % 2 == 0, "head_dim must be even for RoPE");
  DT_CHECK(d.heads % d.kv_heads == 0, "heads must be a multiple of kv_heads");
  DT_CHECK(o.context >= 1 && o.context <= (1 << 24), "context must be in [1, 16777216], got " + std::to_string(o.context));
  DT_CHECK(o.max_batch >= 1 && o.max_batch <= 4096, "max_batch must be in [1, 4096], got " + std::to_string(o.max_batch));
  DT_CHECK(o.threads >= 1 && o.threads <= 1024, "threads must be in [1, 1024], got " + std::to_string(o.threads));
  const int64_t D = d.dim, F = d.ffn, QD = d.heads * d.head_dim, KD = d.kv_heads * d.head_dim, B = o.max_batch;
  DT_CHECK(o.sequences >= 1 && o.sequences <= 256, "sequences must be in [1, 256], got " + std::to_string(o.sequences));
  kv_ = KvCache((int64_t)layers_.size(), d.kv_heads, o.context, d.head_dim, o.kv_type);
  spare_.resize((size_t)o.sequences);
  for (int64_t s = 1; s < o.sequences; ++s)
    spare_[s].kv = KvCache((int64_t)layers_.size(), d.kv_heads, o.context, d.head_dim, o.kv_type);
  DT_CHECK(std::isfinite(d.rope_mscale) && d.rope_mscale > 0, "rope_mscale must be a positive number");
  rope_tables(d.rope_theta, d.head_dim, o.context, cos_, sin_, d.rope_factors.empty() ? nullptr : d.rope_factors.data(),
              d.rope_mscale);
  DT_CHECK(d.window >= 0 && d.swa_pattern >= 0, "sliding window and its layer pattern must not be negative");
  if (d.window > 0) rope_tables(d.local_theta(), d.head_dim, o.context, cos_local_, sin_local_);
  xn_.resize(B * D); tmp_.resize(B * D);
  q_.resize(B * QD); att_.resize(B * QD); k_.resize(B * KD); v_.resize(B * KD);
  gate_.resize(B * F); up_.resize(B * F); fused_.resize(B * std::max(2 * F, QD + 2 * KD));
  scores_.resize((size_t)o.threads * (o.context + B + kKTile));
  anc_bits_.resize((size_t)(B * ((B + 63) / 64)));
  scratch_pos_.resize((size_t)B);
  qa_.reserve(B, std::max({D, F, QD}));
}

void LayerStack::set_threads(int n) {
  DT_CHECK(n >= 1 && n <= 1024, "threads must be in [1, 1024], got " + std::to_string(n));
  if ((size_t)n * (o_.context + o_.max_batch + kKTile) > scores_.size())
    scores_.resize((size_t)n * (o_.context + o_.max_batch + kKTile));
  o_.threads = n;
}

size_t LayerStack::weight_bytes() const {
  size_t total = 0;
  for (const LayerWeights& L : layers_)
    for (const PackedWeight* w : {&L.wqkv, &L.w_gate_up, &L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down})
      total += w->data.size();
  return total;
}

void check_batch(const int32_t* positions, int64_t T, const uint8_t* anc, int64_t P, int64_t n_past,
                 int64_t max_batch, int64_t context) {
  const int64_t W = P + T;
  DT_CHECK(T >= 1, "forward needs at least one token");
  DT_CHECK(W <= max_batch, "batch of " + std::to_string(T) + " tokens" +
                               (P ? " after " + std::to_string(P) + " scratch rows" : std::string()) +
                               " exceeds the engine's max_batch " + std::to_string(max_batch));
  DT_CHECK(n_past + W <= context, "context full: " + std::to_string(n_past) + " committed + " +
                                      std::to_string(W) + " new tokens exceed the context of " +
                                      std::to_string(context));
  for (int64_t t = 0; t < T; ++t)
    DT_CHECK(positions[t] >= 0 && positions[t] < context,
             "position " + std::to_string(positions[t]) + " at index " + std::to_string(t) +
                 " is outside the context [0, " + std::to_string(context) + ")");
  if (!anc) return;
  for (int64_t t = 0; t < T; ++t) {
    DT_CHECK(anc[t * W + P + t] == 1, "ancestors[" + std::to_string(t) + ", " + std::to_string(P + t) +
                                          "] must be set: a token always sees itself");
    for (int64_t j = 0; j < W; ++j) {
      DT_CHECK(anc[t * W + j] <= 1, "ancestors must be a 0/1 matrix");
      DT_CHECK(j <= P + t || anc[t * W + j] == 0,
               "ancestors[" + std::to_string(t) + ", " + std::to_string(j) +
                   "] is set but a token may only see earlier batch tokens");
    }
  }
}

void ancestor_bits(const uint8_t* anc, int64_t T, int64_t P, int64_t words, uint64_t* bits) {
  const int64_t W = P + T;
  std::memset(bits, 0, sizeof(uint64_t) * T * words);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < W; ++j) {
      const bool on = anc ? anc[t * W + j] != 0 : (j >= P && j <= P + t);
      if (on) bits[t * words + (j >> 6)] |= 1ull << (j & 63);
    }
}

void check_commit(const int64_t* kept, int64_t n, int64_t pending) {
  DT_CHECK(n >= 0, "commit of a negative number of rows (" + std::to_string(n) + ")");
  DT_CHECK(n <= pending, "commit of " + std::to_string(n) + " rows but only " + std::to_string(pending) +
                             " uncommitted rows are pending");
  for (int64_t i = 0; i < n; ++i) {
    DT_CHECK(kept[i] >= 0 && kept[i] < pending, "kept row " + std::to_string(kept[i]) +
                                                    " outside the pending rows [0, " + std::to_string(pending) + ")");
    DT_CHECK(i == 0 || kept[i] > kept[i - 1], "kept rows must be strictly increasing");
  }
}

void LayerStack::check(const int32_t* positions, int64_t T, const uint8_t* anc, bool append) const {
  check_batch(positions, T, anc, append ? pending_ : 0, n_past_, o_.max_batch, o_.context);
}

void LayerStack::linear_rows(const PackedWeight& w, const float* x, int64_t T, float* y, bool prepare_input) {
  if (prepare_input) prepare_acts(w, x, T, qa_, o_.threads);
  linear(w, x, &qa_, T, y, w.rows, o_.threads);
}

void LayerStack::add_post_normed(float* x, float* y, const std::vector<float>& post_norm, int64_t T) {
  if (!post_norm.empty()) rmsnorm(y, post_norm.data(), y, T, d_.dim, d_.eps);  // (row by row: in place is safe)
  add_inplace(x, y, T * d_.dim);
}

AttentionArgs LayerStack::attention_args(int64_t T, int64_t P, int64_t words) const {
  AttentionArgs aa;
  aa.kv_type = kv_.type(); aa.S = kv_.slots(); aa.n_prev = P; aa.T = T;
  aa.H = d_.heads; aa.KV = d_.kv_heads; aa.Dh = d_.head_dim; aa.anc_words = words;
  aa.softcap = d_.attn_softcap;
  aa.scale = d_.score_scale();
  return aa;
}

template <class Attend>
void LayerStack::layers(float* x, const int32_t* positions, int64_t T, Attend&& attend) {
  const int64_t D = d_.dim, F = d_.ffn, H = d_.heads, KV = d_.kv_heads, Dh = d_.head_dim;
  const int64_t QD = H * Dh, KD = KV * Dh;
  for (size_t l = 0; l < layers_.size(); ++l) {
    LayerWeights& L = layers_[l];
    // Attention block: x += Wo . attn(rope(Wq xn), rope(Wk xn), Wv xn); xn = rmsnorm(x)
    // (the draft's first layer has no input norm: xn = x).
    const float* xin = x;
    if (!L.attn_norm.empty()) {
      rmsnorm(x, L.attn_norm.data(), xn_.data(), T, D, d_.eps);
      xin = xn_.data();
    }
    if (L.wqkv.rows) {
      const int64_t QKV = QD + 2 * KD;
      linear_rows(L.wqkv, xin, T, fused_.data(), true);
      for (int64_t t = 0; t < T; ++t) {
        float* row = fused_.data() + t * QKV;
        if (!L.extras.bqkv.empty()) add_inplace(row, L.extras.bqkv.data(), QKV);
        std::memcpy(q_.data() + t * QD, row, sizeof(float) * QD);
        std::memcpy(k_.data() + t * KD, row + QD, sizeof(float) * KD);
        std::memcpy(v_.data() + t * KD, row + QD + KD, sizeof(float) * KD);
      }
    } else {
      linear_rows(L.wq, xin, T, q_.data(), true);
      linear_rows(L.wk, xin, T, k_.data(), L.wk.type != L.wq.type);
      linear_rows(L.wv, xin, T, v_.data(), L.wv.type != L.wk.type);
      for (int64_t t = 0; t < T && !L.extras.bqkv.empty(); ++t) {
        add_inplace(q_.data() + t * QD, L.extras.bqkv.data(), QD);
        add_inplace(k_.data() + t * KD, L.extras.bqkv.data() + QD, KD);
        add_inplace(v_.data() + t * KD, L.extras.bqkv.data() + QD + KD, KD);
      }
    }
    if (!L.extras.q_norm.empty()) {  // per head, over Dh (rows of q_ / k_ are contiguous heads)
      rmsnorm(q_.data(), L.extras.q_norm.data(), q_.data(), T * H, Dh, d_.eps);
      rmsnorm(k_.data(), L.extras.k_norm.data(), k_.data(), T * KV, Dh, d_.eps);
    }
    if (!L.nope) {
      const float* cos = L.local ? cos_local_.data() : cos_.data();
      const float* sin = L.local ? sin_local_.data() : sin_.data();
      rope_inplace(q_.data(), T, H, Dh, QD, positions, cos, sin);
      rope_inplace(k_.data(), T, KV, Dh, KD, positions, cos, sin);
    }
    attend((int64_t)l, L);  // K/V stored, att_ = attention(q_)
    linear_rows(L.wo, att_.data(), T, tmp_.data(), true);
    add_post_normed(x, tmp_.data(), L.extras.post_attn_norm, T);
    // FFN block: x += W_down (act(W_gate xn) * W_up xn), act SiLU or GELU; xn = rmsnorm(x)
    rmsnorm(x, L.ffn_norm.data(), xn_.data(), T, D, d_.eps);
    const auto gated = d_.gelu ? geglu : swiglu;
    if (L.w_gate_up.rows) {
      linear_rows(L.w_gate_up, xn_.data(), T, fused_.data(), true);
      for (int64_t t = 0; t < T; ++t) gated(fused_.data() + t * 2 * F, fused_.data() + t * 2 * F + F, gate_.data() + t * F, F);
    } else {
      linear_rows(L.w_gate, xn_.data(), T, gate_.data(), true);
      linear_rows(L.w_up, xn_.data(), T, up_.data(), L.w_up.type != L.w_gate.type);
      gated(gate_.data(), up_.data(), gate_.data(), T * F);
    }
    linear_rows(L.w_down, gate_.data(), T, tmp_.data(), true);
    add_post_normed(x, tmp_.data(), L.extras.post_ffn_norm, T);
  }
}

void LayerStack::run(float* x, const int32_t* positions, int64_t T, const uint8_t* anc, bool append) {
  if (!append) pending_ = 0;
  const int64_t P = pending_, W = P + T, words = (W + 63) / 64;

  // Ancestor sets as bitsets over the scratch rows (causal within the batch when none given).
  uint64_t* bits = anc_bits_.data();
  ancestor_bits(anc, T, P, words, bits);
  std::copy(positions, positions + T, scratch_pos_.begin() + P);

  AttentionArgs aa = attention_args(T, P, words);
  aa.q = q_.data(); aa.n_past = n_past_; aa.anc = bits; aa.out = att_.data(); aa.scratch = scores_.data();
  aa.positions = positions;
  aa.scratch_positions = scratch_pos_.data();
  layers(x, positions, T, [&](int64_t l, const LayerWeights& L) {
    kv_.store(l, n_past_ + P, k_.data(), v_.data(), T);
    aa.k = kv_.k(l);
    aa.v = kv_.v(l);
    aa.window = L.local ? d_.window : 0;
    attention(aa, o_.threads);
  });
  pending_ = W;
}

void LayerStack::select(int64_t s) {
  DT_CHECK(s >= 0 && s < sequences(), "sequence " + std::to_string(s) + " outside [0, " +
                                          std::to_string(sequences()) + ")");
  DT_CHECK(pending_ == 0, "sequence " + std::to_string(seq_) + " has " + std::to_string(pending_) +
                              " uncommitted rows: commit or truncate before selecting another");
  if (s == seq_) return;
  std::swap(kv_, spare_[seq_].kv);  // the selected cache back to its place ...
  spare_[seq_].n_past = n_past_;
  std::swap(kv_, spare_[s].kv);     // ... and sequence s's in
  n_past_ = spare_[s].n_past;
  seq_ = s;
}

int64_t LayerStack::n_past_of(int64_t s) const {
  DT_CHECK(s >= 0 && s < sequences(), "sequence " + std::to_string(s) + " outside [0, " +
                                          std::to_string(sequences()) + ")");
  return s == seq_ ? n_past_ : spare_[s].n_past;
}

size_t LayerStack::kv_bytes() const {
  size_t total = kv_.bytes();
  for (const Spare& sp : spare_) total += sp.kv.bytes();
  return total;
}

void LayerStack::check_seqs(const int32_t* positions, const int64_t* seqs, int64_t S) const {
  DT_CHECK(S >= 1, "forward_sequences needs at least one token");
  DT_CHECK(S <= o_.max_batch, std::to_string(S) + " sequences exceed the engine's max_batch " +
                                  std::to_string(o_.max_batch));
  DT_CHECK(pending_ == 0, "sequence " + std::to_string(seq_) + " has uncommitted rows: commit or truncate first");
  std::vector<bool> seen((size_t)sequences(), false);
  for (int64_t r = 0; r < S; ++r) {
    const int64_t s = seqs[r];
    DT_CHECK(s >= 0 && s < sequences(), "sequence " + std::to_string(s) + " at index " + std::to_string(r) +
                                            " outside [0, " + std::to_string(sequences()) + ")");
    DT_CHECK(!seen[s], "sequence " + std::to_string(s) + " appears twice: one token per sequence and call");
    seen[s] = true;
    DT_CHECK(n_past_of(s) + 1 <= o_.context, "context full: sequence " + std::to_string(s) + " holds " +
                                                 std::to_string(n_past_of(s)) + " of " + std::to_string(o_.context));
    DT_CHECK(positions[r] >= 0 && positions[r] < o_.context,
             "position " + std::to_string(positions[r]) + " at index " + std::to_string(r) +
                 " is outside the context [0, " + std::to_string(o_.context) + ")");
  }
}

void LayerStack::run_seqs(float* x, const int32_t* positions, const int64_t* seqs, int64_t S) {
  const int64_t QD = d_.heads * d_.head_dim, KD = d_.kv_heads * d_.head_dim;
  uint64_t* bits = anc_bits_.data();
  bits[0] = 1;  // each row alone in its sequence's scratch: it sees itself
  AttentionArgs aa = attention_args(1, 0, 1);
  aa.anc = bits; aa.scratch = scores_.data(); aa.scratch_positions = scratch_pos_.data();
  layers(x, positions, S, [&](int64_t l, const LayerWeights& L) {
    aa.window = L.local ? d_.window : 0;
    for (int64_t r = 0; r < S; ++r) {
      const int64_t s = seqs[r], past = n_past_of(s);
      KvCache& kv = s == seq_ ? kv_ : spare_[s].kv;
      kv.store(l, past, k_.data() + r * KD, v_.data() + r * KD, 1);
      scratch_pos_[0] = positions[r];
      aa.q = q_.data() + r * QD; aa.out = att_.data() + r * QD; aa.positions = positions + r;
      aa.k = kv.k(l); aa.v = kv.v(l); aa.n_past = past;
      attention(aa, o_.threads);
    }
  });
  for (int64_t r = 0; r < S; ++r) (seqs[r] == seq_ ? n_past_ : spare_[seqs[r]].n_past) += 1;
}

void LayerStack::commit(const int64_t* kept, int64_t n) {
  check_commit(kept, n, pending_);
  kv_.compact(n_past_, kept, n);
  n_past_ += n;
  pending_ = 0;
}

void LayerStack::truncate(int64_t n) {
  DT_CHECK(n >= 0 && n <= n_past_, "truncate to " + std::to_string(n) + " outside [0, " + std::to_string(n_past_) + "]");
  n_past_ = n;
  pending_ = 0;
}

}  // namespace dovetail
