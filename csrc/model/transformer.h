// A stack of LLaMA decoder layers with its own KV cache: the part the target and the
// draft share.
//
// KV slots: [0, n_past) committed; [n_past, n_past + pending) scratch rows written by the
// forward calls since the last commit. A call with append=false first drops the scratch;
// with append=true its tokens go after the existing scratch rows (tree expansion in the
// draft). Batch token t (scratch row P + t, P = scratch rows before the call) attends to
// the committed prefix and to the scratch rows j <= P + t marked in its ancestor bitset.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/buffer.h"
#include "cpu/ops.h"
#include "model/kv_cache.h"

namespace dovetail {

struct LayerDims {
  int64_t dim = 0, ffn = 0, heads = 0, kv_heads = 0, head_dim = 0;
  float rope_theta = 10000.0f, eps = 1e-5f;
  bool qkv_bias = false;  // q / k / v projections add a bias (Qwen2): blk.{i}.attn_{q,k,v}.bias
  bool qk_norm = false;   // RMSNorm of each q / k head before RoPE (Qwen3): blk.{i}.attn_{q,k}_norm [Dh]
  // RoPE frequency divisors [head_dim / 2] (LLaMA 3.1+: the weight "rope_freqs"); empty: none.
  std::vector<float> rope_factors;
  // RoPE's cos and sin times this (LongRoPE's attention factor: every q . k times its square).
  float rope_mscale = 1.0f;
  // Gemma 2: attention scores soft-capped (cap tanh(s / cap)); 0: none. (Final logits: LlamaParams.)
  float attn_softcap = 0.0f;
  // Scores scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2 (0: head_dim; Gemma's 27B models).
  float query_pre_attn_scalar = 0.0f;
  float score_scale() const {
    return 1.0f / std::sqrt(query_pre_attn_scalar > 0 ? query_pre_attn_scalar : (float)head_dim);
  }
  // Gemma 3: an RMSNorm on each block's output before its residual add (weights
  // blk.{i}.post_attention_norm / post_ffw_norm), and a GELU (tanh) gate instead of SiLU.
  bool post_norms = false;
  bool gelu = false;
  // Sliding-window layers: with window > 0, layer i is local unless (i + 1) % swa_pattern
  // == 0 (swa_pattern 0: every layer local); a local layer sees the keys of the last
  // `window` positions and rotates with rope_theta_local (0: rope_theta), without factors.
  int64_t window = 0, swa_pattern = 0;
  float rope_theta_local = 0.0f;
  bool local_layer(int64_t i) const { return window > 0 && (swa_pattern <= 0 || (i + 1) % swa_pattern != 0); }
  // SmolLM3: with nope_interval > 0, layer i rotates no q / k when (i + 1) % nope_interval == 0.
  int64_t nope_interval = 0;
  bool nope_layer(int64_t i) const { return nope_interval > 0 && (i + 1) % nope_interval == 0; }
  double local_theta() const { return rope_theta_local > 0 ? rope_theta_local : rope_theta; }
};


struct EngineOptions {
  int64_t context = 2048;   // KV slots (committed + scratch)
  int64_t max_batch = 128;  // most scratch rows at once (one forward, or one tree)
  int threads = 1;
  KvType kv_type = KvType::F32;
  int64_t sequences = 1;    // KV caches: independent sequences one call can decode together
};

// A tensor handed over by the loader: raw storage, [rows, cols] (cols = 1-D length).
struct WeightView {
  WType type = WType::F32;
  int64_t rows = 0, cols = 0;
  int ndim = 2;  // as given: 1 (a vector: rows 1) or 2
  const void* data = nullptr;
  size_t nbytes = 0;
};
using WeightMap = std::map<std::string, WeightView>;

PackedWeight pack_named(const WeightMap& w, const std::string& name, int64_t rows, int64_t cols);
// The named matrices (each {name, rows}, all with `cols` columns) stacked row-wise into one
// packed weight; empty (rows == 0) when their formats differ. Rows are computed exactly as
// in the separate matrices, so a stacked product equals the separate ones bit for bit.
PackedWeight pack_stacked(const WeightMap& w, const std::vector<std::pair<std::string, int64_t>>& parts,
                          int64_t cols);
// A 1-D f32 weight (a norm or a bias) of n values.
std::vector<float> norm_named(const WeightMap& w, const std::string& name, int64_t n);
// The weight "rope_freqs" [Dh/2] when `w` has it (finite, positive), else empty.
std::vector<float> rope_factors_named(const WeightMap& w, int64_t head_dim);

// The optional weights of the layer named by prefix b ("blk.{i}."): the q|k|v biases joined
// [QD + 2 KD] when d.qkv_bias (Qwen2), the q and k head norms [Dh] when d.qk_norm (Qwen3),
// the post-attention and post-FFN norms [D] when d.post_norms (Gemma 3); empty otherwise,
// and one in `w` that d does not declare is an error.
struct LayerExtras {
  std::vector<float> bqkv, q_norm, k_norm, post_attn_norm, post_ffn_norm;
};
LayerExtras layer_extras_named(const WeightMap& w, const LayerDims& d, const std::string& b);

struct LayerWeights {
  std::vector<float> attn_norm;  // empty: no input norm (the draft's first layer)
  std::vector<float> ffn_norm;
  // q|k|v and gate|up are stored as one matrix each when their parts share a format (one
  // pass over the activations, one parallel dispatch); otherwise wqkv / w_gate_up are
  // empty and the parts are kept apart.
  PackedWeight wqkv, w_gate_up;
  PackedWeight wq, wk, wv, wo, w_gate, w_up, w_down;
  LayerExtras extras;   // biases, head norms, post norms: as LayerDims declares them
  bool local = false;  // a sliding-window layer (LayerDims::local_layer)
  bool nope = false;   // a layer without RoPE (LayerDims::nope_layer)
};

// Reads blk.{first + i}.* for i < n_layers; `first_has_norm` false skips blk.0.attn_norm.
// Biases (q/k norms, post norms) are read when d.qkv_bias (d.qk_norm, d.post_norms) is set,
// and one in `w` without it is an error.
std::vector<LayerWeights> load_layers(const WeightMap& w, const LayerDims& d, int64_t n_layers,
                                      bool first_has_norm, int64_t first = 0);

// Validates a batch of T tokens at `positions` after P scratch rows, with ancestors [T, P+T]
// (null = causal within the batch): the rules of LayerStack::check, shared with the device
// draft engine. Throws ValueError naming the problem.
void check_batch(const int32_t* positions, int64_t T, const uint8_t* anc, int64_t P, int64_t n_past,
                 int64_t max_batch, int64_t context);
// Ancestor sets [T, P+T] (null: causal within the batch, no earlier scratch visible) as
// bitsets over the scratch rows, `words` = ceil((P+T)/64) words per token.
void ancestor_bits(const uint8_t* anc, int64_t T, int64_t P, int64_t words, uint64_t* bits);
// Validates commit(kept, n) against `pending` scratch rows.
void check_commit(const int64_t* kept, int64_t n, int64_t pending);

class LayerStack {
 public:
  LayerStack(const LayerDims& d, std::vector<LayerWeights> layers, const EngineOptions& o);

  // Validates a batch: T tokens at `positions`, ancestors [T, P+T] (null = causal within
  // the batch, no earlier scratch visible). Throws ValueError naming the problem.
  void check(const int32_t* positions, int64_t T, const uint8_t* anc, bool append) const;
  // x [T, D] in place through every layer (x holds the layer-0 input, then the output).
  void run(float* x, const int32_t* positions, int64_t T, const uint8_t* anc, bool append);
  void commit(const int64_t* kept, int64_t n);
  void truncate(int64_t n);
  void set_threads(int n);

  // Sequences (EngineOptions::sequences): each has its own KV cache; the calls above act on
  // the selected one. Selecting another needs the selected one's rows committed.
  void select(int64_t s);
  int64_t selected() const { return seq_; }
  int64_t sequences() const { return (int64_t)spare_.size(); }
  int64_t n_past_of(int64_t s) const;
  size_t kv_bytes() const;
  // One new token for each of S distinct sequences: row r belongs to sequence seqs[r] at
  // positions[r], sees that sequence's committed prefix and itself, and is committed to it
  // at once (its n_past grows by one). Each row's result is bit for bit the one a
  // single-token forward on its sequence gives (batch invariance).
  void check_seqs(const int32_t* positions, const int64_t* seqs, int64_t S) const;
  void run_seqs(float* x, const int32_t* positions, const int64_t* seqs, int64_t S);

  int64_t n_past() const { return n_past_; }
  int64_t pending() const { return pending_; }
  const EngineOptions& options() const { return o_; }
  const LayerDims& dims() const { return d_; }
  const KvCache& kv() const { return kv_; }
  size_t weight_bytes() const;
  QActs& qacts() { return qa_; }
  // y = x W^T with this stack's threads and activation buffer.
  void linear_rows(const PackedWeight& w, const float* x, int64_t T, float* y, bool prepare_input);

 private:
  // x += y, y first RMS-normalized with post_norm when it is not empty (Gemma 3).
  void add_post_normed(float* x, float* y, const std::vector<float>& post_norm, int64_t T);
  // Every layer over x [T, D]; attend(l, layer) stores the layer's K/V (rows of k_ / v_) and
  // fills att_ from q_: the one step where sequences and trees differ.
  template <class Attend>
  void layers(float* x, const int32_t* positions, int64_t T, Attend&& attend);
  AttentionArgs attention_args(int64_t T, int64_t P, int64_t words) const;

  LayerDims d_;
  EngineOptions o_;
  std::vector<LayerWeights> layers_;
  KvCache kv_;  // the selected sequence's
  struct Spare {
    KvCache kv;
    int64_t n_past = 0;
  };
  std::vector<Spare> spare_;  // [s]: sequence s while another is selected (spare_[seq_] holds nothing)
  int64_t seq_ = 0;
  std::vector<float> cos_, sin_, cos_local_, sin_local_;  // (the local tables: sliding-window layers)
  int64_t n_past_ = 0, pending_ = 0;
  Buffer<float> xn_, q_, k_, v_, att_, gate_, up_, tmp_, scores_, fused_;
  Buffer<uint64_t> anc_bits_;
  std::vector<int32_t> scratch_pos_;  // positions of the scratch rows [0, pending + T)
  QActs qa_;
};

}  // namespace dovetail
