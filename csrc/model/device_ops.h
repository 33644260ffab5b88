// The operations the device engines (model/device_engine.h) are built from, over the
// memory of one backend:
//   - "cuda" (cuda/draft_ops.cu): device memory, pinned host staging, a compute stream and a
//     copy stream ordered with events, cuBLAS GEMMs, custom kernels, CUDA graphs;
//   - "host" (model/device_ops_host.cpp): the same buffers and layouts in host memory with
//     scalar loops over the same per-element math (common/device_math.h), so every line of
//     the engine's orchestration runs in the CPU tests.
//
// Pointers passed to the kernels are backend memory. Matrices are row-major; weights are
// [N, K] (PyTorch Linear layout) in bf16; activations fp32 unless named bf16.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace dovetail {

using bf16_t = uint16_t;

// RoPE on the q and k parts of qkv rows [T, ld] (q: H heads at column 0, k: KV heads at
// column H*Dh, v after k), then k and v into the layer's cache [KV][S][Dh] (bf16) at slot
// *n_past + P + t. Before RoPE, in place and in this order, when given: the q|k|v biases
// (Qwen2) are added, and each q head is RMS-normalized with q_norm, each k head with k_norm
// (Qwen3), as the CPU engine does.
struct RopeStoreArgs {
  float* qkv = nullptr;
  int ld = 0, T = 0, H = 0, KV = 0, Dh = 0, S = 0, P = 0;
  const int32_t* positions = nullptr;     // [T], each in [0, S)
  const float* cos = nullptr;             // [S, Dh/2]
  const float* sin = nullptr;
  const int32_t* n_past = nullptr;        // backend scalar
  bf16_t* k_cache = nullptr;
  bf16_t* v_cache = nullptr;
  const float* bias = nullptr;            // [(H + 2 KV) Dh] or null
  const float* q_norm = nullptr;          // [Dh] each, both or neither
  const float* k_norm = nullptr;
  float eps = 1e-6f;                      // of the q / k norms
};

// Tree attention of T query rows: row t, head h sees the committed slots [0, *n_past) and
// the scratch slots *n_past + j (j < P + T) whose bit j is set in its ancestor bitset (with
// a window, those inside it: dev::in_window).
struct AttentionCall {
  const float* q = nullptr;  // rows [T, ld], head h at column h*Dh
  int ld = 0, T = 0, H = 0, KV = 0, Dh = 0, S = 0, P = 0, words = 0;
  const bf16_t* k_cache = nullptr;  // this layer's [KV][S][Dh]
  const bf16_t* v_cache = nullptr;
  const int32_t* n_past = nullptr;
  const uint64_t* bits = nullptr;   // [T, words]
  float scale = 1.0f;
  float softcap = 0.0f;             // Gemma 2: scaled scores soft-capped (dev::softcap_score; 0: none)
  bf16_t* out = nullptr;            // [T, H*Dh]
  // Sliding window (P = 0): row t sees only keys whose position is above positions[t] -
  // window: committed slot j holds position j, scratch slot j the batch's positions[j].
  int window = 0;
  const int32_t* positions = nullptr;
};

class DeviceOps {
 public:
  virtual ~DeviceOps() = default;
  virtual std::string name() const = 0;
  virtual std::string device_name() const = 0;

  // A public engine call runs between enter() (makes this backend's device current; returns
  // what leave() restores) and leave(), so the caller's current device is left as it was.
  virtual int enter() { return -1; }
  virtual void leave(int /*previous*/) {}

  // -- memory ---------------------------------------------------------------------------
  virtual void* alloc(size_t bytes) = 0;          // backend memory, zeroed
  virtual void release(void* p) = 0;
  virtual void* alloc_staging(size_t bytes) = 0;  // host memory for transfers (pinned on CUDA)
  virtual void release_staging(void* p) = 0;
  virtual void upload(void* dst, const void* src, size_t bytes) = 0;  // blocking

  // -- one call: h2d, compute, d2h, finish ------------------------------------------------
  // h2d: staging -> backend on the copy stream; compute waits for it.
  virtual void h2d(void* dst, const void* staging, size_t bytes) = 0;
  // d2h: backend -> staging on the copy stream after the compute so far.
  virtual void d2h(void* staging, const void* src, size_t bytes) = 0;
  // Waits for everything queued; returns the milliseconds the copies took since the last finish.
  virtual double finish() = 0;

  // Compute sequences can be recorded under a key and replayed (CUDA graphs).
  virtual bool can_record() const { return false; }
  virtual bool replay(uint64_t /*key*/) { return false; }
  virtual void begin_record(uint64_t /*key*/) {}
  virtual void end_record(uint64_t /*key*/) {}  // instantiates the recording and launches it
  virtual size_t recorded() const { return 0; }

  // -- compute ---------------------------------------------------------------------------
  // y[M, ldy] = x[M, K] . w[N, K]^T (accumulate: y +=), fp32 accumulation.
  virtual void gemm(int M, int N, int K, const bf16_t* x, const bf16_t* w, float* y, int ldy, bool accumulate) = 0;
  // As gemm, but every output row computed in an order that does not depend on M (batch
  // invariance: a token's result is the same alone or inside a tree).
  virtual void gemm_invariant(int M, int N, int K, const bf16_t* x, const bf16_t* w, float* y, int ldy,
                              bool accumulate) = 0;
  // out[t] = table[tokens[t]] * scale as fp32, table [V, D] bf16.
  virtual void embed(const bf16_t* table, const int32_t* tokens, int T, int D, float scale, float* out) = 0;
  // out[t] = bf16(RMSNorm(table[tokens[t]]) * w), table [V, D] bf16.
  virtual void embed_norm(const bf16_t* table, const int32_t* tokens, int T, int D, const float* w, float eps,
                          bf16_t* out) = 0;
  // out = bf16(RMSNorm(x) * w), or bf16(x) when w is null.
  virtual void norm(const float* x, const float* w, int T, int D, float eps, bf16_t* out) = 0;
  // x += RMSNorm(y) * w, rows of D (Gemma 3's post norms).
  virtual void add_norm(float* x, const float* y, const float* w, int T, int D, float eps) = 0;
  // DGF, token path and gate input: hz[t] = bf16([h1[t]; SiLU(a[t])]), hz [T, 2D].
  virtual void dgf_pack(const float* h1, const float* a, int T, int D, bf16_t* hz) = 0;
  // DGF gate: g = z h1 + (1 - z) SiLU(a), z = sigmoid(zpre), in one pass.
  virtual void dgf_mix(const float* h1, const float* a, const float* zpre, int T, int D, float* g) = 0;
  virtual void rope_store(const RopeStoreArgs& a) = 0;
  virtual void attention(const AttentionCall& a) = 0;
  // out[t] = bf16(act(gu[t, :F]) * gu[t, F:]), gu [T, 2F]; act SiLU, or GELU (tanh) when gelu.
  virtual void glu(const float* gu, int T, int F, bool gelu, bf16_t* out) = 0;
  // dst[i] = src[rows[i]] (fp32 rows of D), or its bf16 rounding.
  virtual void gather(const float* src, const int32_t* rows, int n, int D, float* dst) = 0;
  virtual void gather_bf16(const float* src, const int32_t* rows, int n, int D, bf16_t* dst) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  // Per row of logits [R, V]: the k best (ids, log-softmax values), best first; ids mapped
  // through vocab_map when it is not null.
  virtual void topk(const float* logits, int R, int V, int k, const int32_t* vocab_map, int32_t* ids,
                    float* logp) = 0;
  // Moves slots base + kept[i] to base + i, i < n (kept strictly increasing), for every
  // layer and KV head of the caches [L][KV][S][Dh].
  virtual void kv_compact(bf16_t* k, bf16_t* v, int L, int KV, int S, int Dh, int base, const int32_t* kept,
                          int n) = 0;
};

// enter() ... leave() for one scope.
class DeviceScope {
 public:
  explicit DeviceScope(DeviceOps& ops) : ops_(ops), previous_(ops.enter()) {}
  ~DeviceScope() { ops_.leave(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  DeviceOps& ops_;
  int previous_;
};

std::unique_ptr<DeviceOps> make_host_ops();
// CUDA backend on `device` (cuda/draft_ops.cu; only in builds with CUDA, DOVETAIL_WITH_CUDA).
// Throws ValueError when that GPU does not exist.
std::unique_ptr<DeviceOps> make_cuda_ops(int device);
// The cuBLAS library the CUDA backend opens ("" when none is found). CUDA builds only.
std::string cublas_library();

}  // namespace dovetail
