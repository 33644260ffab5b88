// LLaMA layers on an accelerator (the CUDA backend) or on its host test double, in bf16
// weights with fp32 activations, and the two engines built on them:
//
//   DeviceDraftEngine   the Dovetail draft (the model of DraftEngine, model/draft.h)
//   DeviceTargetPrefix  the first N layers of the target (partial offload, gpu_layers=N):
//                       embedding -> layers -> hidden states, which the CPU engine takes
//                       on from layer N (LlamaEngine::forward_hidden)
//
// Everything lives in backend memory, allocated once at construction: bf16 weights (quantized
// matrices dequantized once), the KV cache [L][KV][S][Dh] in bf16 (committed prefix + scratch
// rows, written in place), activations for max_batch rows, and two transfer regions with host
// staging (pinned on CUDA):
//
//   in  (host -> backend, one copy per call): n_past | features or source rows | tokens |
//        positions | ancestor bitsets | top-k rows          (only what the call uses)
//   out (backend -> host, one copy per call): top-k ids | top-k log-probs | hidden (optional)
//
// The per-call compute is recorded once per shape and replayed (CUDA graphs); kernels read
// n_past from the in-region, so a replay serves any cache length. Every output row is
// computed in an order that does not depend on the batch (batch invariance, as on the CPU):
// the target prefix uses the backend's row-invariant GEMM.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "model/device_ops.h"
#include "model/transformer.h"

namespace dovetail {

struct DeviceDraftStats {
  int64_t calls = 0;            // forward calls
  int64_t replays = 0;          // calls served by a recorded sequence
  int64_t h2d_bytes = 0, d2h_bytes = 0;            // totals over calls (commit included)
  int64_t last_h2d_bytes = 0, last_d2h_bytes = 0;  // the last forward call
  double transfer_ms = 0.0;     // time the copies took (backend-measured)
  double call_ms = 0.0;         // host wall time inside forward/commit
};

// Layers, KV cache, activations and transfer staging on one backend.
class DeviceStack {
 public:
  virtual ~DeviceStack();
  DeviceStack(const DeviceStack&) = delete;
  DeviceStack& operator=(const DeviceStack&) = delete;

  // As LayerStack: keep scratch rows `kept` (strictly increasing) after the prefix; forget
  // committed rows past n.
  void commit(const int64_t* kept, int64_t n);
  void truncate(int64_t n);
  // Reads the KV cache slots [0, n) of `layer` as fp32 [KV, n, Dh] (tests).
  void read_kv(int64_t layer, int64_t n, float* k_out, float* v_out);

  int64_t n_past() const { return n_past_; }
  int64_t pending() const { return pending_; }
  int64_t layers() const { return L_; }
  const EngineOptions& options() const { return o_; }
  const LayerDims& dims() const { return d_; }
  size_t device_bytes() const { return device_bytes_; }
  size_t staging_bytes() const { return staging_bytes_; }
  DeviceDraftStats stats() const;
  std::string backend() const { return ops_->name(); }
  std::string device_name() const { return ops_->device_name(); }

  // Byte layout of one call's transfers (offsets into the regions), from its shape alone.
  struct Layout {
    size_t feat = 0, src = 0, tokens = 0, positions = 0, bits = 0, rows = 0, in_bytes = 0;
    size_t ids = 0, logp = 0, hidden = 0, out_bytes = 0;
  };
  static Layout layout(int64_t T, int64_t P, int64_t D, int64_t n_topk, int64_t k, bool host_features,
                       bool want_hidden);

 protected:
  // Layers blk.{0..n_layers-1}; the first has an input norm when first_has_norm.
  DeviceStack(std::unique_ptr<DeviceOps> ops, const LayerDims& d, int64_t n_layers, const EngineOptions& o,
              const WeightMap& weights, bool first_has_norm, bool record, bool invariant_gemm);

  template <typename T> T* dev(size_t count);
  bf16_t* upload_bf16(const PackedWeight& w, const int32_t* rows, int64_t n);  // rows null: all
  bf16_t* upload_weights(const WeightMap& w, std::initializer_list<std::pair<std::string, int64_t>> parts,
                         int64_t cols);
  float* upload_f32(const std::vector<float>& v);
  void gemm(int M, int N, int K, const bf16_t* x, const bf16_t* w, float* y, int ldy, bool accumulate);
  // Transfer regions sized for the largest call.
  void alloc_transfers(size_t in_cap, size_t out_cap);
  // Stages positions, ancestors and n_past of a call of T tokens after P scratch rows.
  void stage_common(const Layout& Lo, const int32_t* tokens, const int32_t* positions, int64_t T, int64_t P,
                    const uint8_t* anc);
  // One call: h2d of the in-region, the compute (recorded under `key`, or replayed), d2h
  // of the out-region, wait; updates the counters.
  void launch(const Layout& Lo, uint64_t key, int64_t T, const std::function<void()>& compute);
  // x [T, D] (fp32, backend) in place through every layer.
  void run_layers(const Layout& Lo, int64_t T, int64_t P);

  std::unique_ptr<DeviceOps> ops_;
  LayerDims d_;
  EngineOptions o_;
  int64_t L_ = 0, QKV_ = 0;
  bool record_ = false, invariant_gemm_ = false;
  std::vector<void*> allocs_;
  size_t device_bytes_ = 0, staging_bytes_ = 0;

  struct LayerBufs {
    float* attn_norm = nullptr;  // null: no input norm (the draft's first layer)
    float* ffn_norm = nullptr;
    bf16_t *wqkv = nullptr, *wo = nullptr, *wgu = nullptr, *wdown = nullptr;
    float *bqkv = nullptr, *q_norm = nullptr, *k_norm = nullptr;  // null unless d.qkv_bias / d.qk_norm
    float *post_attn_norm = nullptr, *post_ffn_norm = nullptr;      // null unless d.post_norms
    bool local = false;                                              // a sliding-window layer
    bool nope = false;                                               // a layer without RoPE
  };
  std::vector<LayerBufs> layers_;
  float *cos_ = nullptr, *sin_ = nullptr, *cos_local_ = nullptr, *sin_local_ = nullptr;
  float *cos_none_ = nullptr, *sin_none_ = nullptr;  // cos 1, sin 0: the rotation of a NoPE layer
  bf16_t *k_cache_ = nullptr, *v_cache_ = nullptr;
  float *x_ = nullptr, *qkv_ = nullptr, *gu_ = nullptr, *y_ = nullptr;  // (y_: a block's output, post norms)
  bf16_t *xn_ = nullptr, *att_ = nullptr, *act_ = nullptr;
  uint8_t *in_dev_ = nullptr, *out_dev_ = nullptr, *in_host_ = nullptr, *out_host_ = nullptr;
  size_t in_cap_ = 0, out_cap_ = 0;

  int64_t n_past_ = 0, pending_ = 0;
  std::set<uint64_t> seen_, unrecordable_;  // call shapes run once / whose recording failed
  DeviceDraftStats stats_;
  mutable std::mutex mu_;
};

class DeviceDraftEngine : public DeviceStack {
 public:
  // `embedding` / `lm_head` are the target's (any format); vocab_map as in DraftEngine.
  DeviceDraftEngine(std::unique_ptr<DeviceOps> ops, const LayerDims& d, int64_t n_layers, const EngineOptions& o,
                    const WeightMap& weights, const PackedWeight& embedding, const PackedWeight& lm_head,
                    std::vector<int32_t> vocab_map, bool record);

  // As DraftEngine::forward, except: features [T, D] from the host, or (features == null)
  // rows src_rows[T] of the output history (rows [0, history_rows()): the outputs of the
  // last call with append=false and of the append calls after it, in order), which never
  // left the device; hidden may be null (not copied back). This call's outputs join the
  // history (append) or start it.
  void forward(const float* features, const int32_t* src_rows, const int32_t* tokens, const int32_t* positions,
               int64_t T, const uint8_t* ancestors, bool append, float* hidden, const int64_t* topk_rows,
               int64_t n_topk, int64_t k, int32_t* topk_ids, float* topk_logp);

  int64_t history_rows() const { return hist_valid_; }
  int64_t vocab() const { return V_; }
  int64_t draft_vocab() const { return Vd_; }

 private:
  void run_compute(const Layout& L, int64_t T, int64_t P, int64_t R, int64_t k, bool host_features,
                   int64_t hist_base);

  int64_t V_ = 0, Vd_ = 0;
  bf16_t *embed_ = nullptr, *head_ = nullptr, *w1_ = nullptr, *w2_ = nullptr, *wz_ = nullptr;
  float* e_norm_ = nullptr;
  int32_t* vocab_map_ = nullptr;
  float *hist_ = nullptr;  // [2 * max_batch, D] output history
  float *feat_ = nullptr, *h1_ = nullptr, *a_ = nullptr, *zpre_ = nullptr, *logits_ = nullptr;
  bf16_t *fb_ = nullptr, *e_ = nullptr, *hz_ = nullptr, *hs_ = nullptr;
  int64_t hist_valid_ = 0;
};

class DeviceTargetPrefix : public DeviceStack {
 public:
  // The target's layers blk.0 .. blk.{n_layers-1} and its token embedding, whose rows are
  // multiplied by embed_scale (Gemma 3: sqrt(dim)).
  DeviceTargetPrefix(std::unique_ptr<DeviceOps> ops, const LayerDims& d, int64_t n_layers, const EngineOptions& o,
                     const WeightMap& weights, const PackedWeight& embedding, bool record, float embed_scale = 1.0f);

  // tokens at positions with ancestors [T, T] (null: causal), as LlamaEngine::forward;
  // writes the residual stream after the last offloaded layer, hidden [T, D].
  void forward(const int32_t* tokens, const int32_t* positions, int64_t T, const uint8_t* ancestors, float* hidden);
  int64_t vocab() const { return V_; }

 private:
  int64_t V_ = 0;
  bf16_t* embed_ = nullptr;
  float embed_scale_ = 1.0f;
};

}  // namespace dovetail
