// The host backend of the device draft engine: backend memory is host memory and every
// kernel is a scalar loop over the per-element math the CUDA kernels use
// (common/device_math.h). It exists so that the engine's orchestration (buffers, transfer
// layout, KV slots, ancestor bitsets, commit compaction, top-k order) runs in the CPU tests.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/device_math.h"
#include "common/error.h"
#include "model/device_ops.h"

namespace dovetail {

namespace {

using dev::bit_set;
using dev::OnlineSoftmax;

float rms_inv(const float* x, int D, float eps) {
  float ss = 0.0f;
  for (int i = 0; i < D; ++i) ss += x[i] * x[i];
  return 1.0f / std::sqrt(ss / (float)D + eps);
}

class HostOps final : public DeviceOps {
 public:
  std::string name() const override { return "host"; }
  std::string device_name() const override { return "host (test backend)"; }

  void* alloc(size_t bytes) override {
    void* p = std::calloc(1, bytes ? bytes : 1);
    if (!p) throw std::bad_alloc();
    return p;
  }
  void release(void* p) override { std::free(p); }
  void* alloc_staging(size_t bytes) override { return alloc(bytes); }
  void release_staging(void* p) override { std::free(p); }
  void upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }

  void h2d(void* dst, const void* staging, size_t bytes) override { timed_copy(dst, staging, bytes); }
  void d2h(void* staging, const void* src, size_t bytes) override { timed_copy(staging, src, bytes); }
  double finish() override {
    const double ms = copy_ms_;
    copy_ms_ = 0.0;
    return ms;
  }

  void gemm(int M, int N, int K, const bf16_t* x, const bf16_t* w, float* y, int ldy, bool accumulate) override {
    std::vector<float> xr((size_t)K);
    for (int m = 0; m < M; ++m) {
      for (int i = 0; i < K; ++i) xr[(size_t)i] = bf16_to_fp32(x[(size_t)m * K + i]);
      for (int n = 0; n < N; ++n) {
        const bf16_t* wr = w + (size_t)n * K;
        float acc = 0.0f;
        for (int i = 0; i < K; ++i) acc += xr[(size_t)i] * bf16_to_fp32(wr[i]);
        float& out = y[(size_t)m * ldy + n];
        out = accumulate ? out + acc : acc;
      }
    }
  }

  void gemm_invariant(int M, int N, int K, const bf16_t* x, const bf16_t* w, float* y, int ldy,
                      bool accumulate) override {
    gemm(M, N, K, x, w, y, ldy, accumulate);  // each output already reduces in a fixed order
  }

  void embed(const bf16_t* table, const int32_t* tokens, int T, int D, float scale, float* out) override {
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < D; ++i) out[(size_t)t * D + i] = bf16_to_fp32(table[(size_t)tokens[t] * D + i]) * scale;
  }

  void embed_norm(const bf16_t* table, const int32_t* tokens, int T, int D, const float* w, float eps,
                  bf16_t* out) override {
    std::vector<float> row((size_t)D);
    for (int t = 0; t < T; ++t) {
      const bf16_t* src = table + (size_t)tokens[t] * D;
      for (int i = 0; i < D; ++i) row[(size_t)i] = bf16_to_fp32(src[i]);
      const float inv = rms_inv(row.data(), D, eps);
      for (int i = 0; i < D; ++i) out[(size_t)t * D + i] = fp32_to_bf16(row[(size_t)i] * inv * w[i]);
    }
  }

  void norm(const float* x, const float* w, int T, int D, float eps, bf16_t* out) override {
    for (int t = 0; t < T; ++t) {
      const float* xr = x + (size_t)t * D;
      const float inv = w ? rms_inv(xr, D, eps) : 1.0f;
      for (int i = 0; i < D; ++i) out[(size_t)t * D + i] = fp32_to_bf16(w ? xr[i] * inv * w[i] : xr[i]);
    }
  }

  void add_norm(float* x, const float* y, const float* w, int T, int D, float eps) override {
    for (int t = 0; t < T; ++t) {
      const float* yr = y + (size_t)t * D;
      const float inv = rms_inv(yr, D, eps);
      for (int i = 0; i < D; ++i) x[(size_t)t * D + i] += yr[i] * inv * w[i];
    }
  }

  void dgf_pack(const float* h1, const float* a, int T, int D, bf16_t* hz) override {
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < D; ++i) {
        hz[(size_t)t * 2 * D + i] = fp32_to_bf16(h1[(size_t)t * D + i]);
        hz[(size_t)t * 2 * D + D + i] = fp32_to_bf16(dgf_silu(a[(size_t)t * D + i]));
      }
  }

  void dgf_mix(const float* h1, const float* a, const float* zpre, int T, int D, float* g) override {
    for (size_t i = 0; i < (size_t)T * D; ++i) g[i] = ::dovetail::dgf_mix(h1[i], dgf_silu(a[i]), zpre[i]);
  }

  void rope_store(const RopeStoreArgs& a) override {
    const int half = a.Dh / 2, base = *a.n_past + a.P;
    for (int t = 0; t < a.T; ++t) {
      float* row = a.qkv + (size_t)t * a.ld;
      for (int i = 0; a.bias && i < (a.H + 2 * a.KV) * a.Dh; ++i) row[i] += a.bias[i];
      for (int h = 0; a.q_norm && h < a.H + a.KV; ++h) {  // q heads, then k heads
        float* v = row + (size_t)h * a.Dh;
        const float* w = h < a.H ? a.q_norm : a.k_norm;
        const float inv = rms_inv(v, a.Dh, a.eps);
        for (int i = 0; i < a.Dh; ++i) v[i] = v[i] * inv * w[i];
      }
      const float* c = a.cos + (size_t)a.positions[t] * half;
      const float* s = a.sin + (size_t)a.positions[t] * half;
      for (int h = 0; h < a.H + a.KV; ++h)  // q heads, then k heads
        for (int i = 0; i < half; ++i) dev::rope_pair(row[h * a.Dh + i], row[h * a.Dh + i + half], c[i], s[i]);
      for (int h = 0; h < a.KV; ++h)
        for (int i = 0; i < a.Dh; ++i) {
          const size_t slot = ((size_t)h * a.S + base + t) * a.Dh + i;
          a.k_cache[slot] = fp32_to_bf16(row[(a.H + h) * a.Dh + i]);
          a.v_cache[slot] = fp32_to_bf16(row[(a.H + a.KV + h) * a.Dh + i]);
        }
    }
  }

  void attention(const AttentionCall& a) override {
    const int n_past = *a.n_past, G = a.H / a.KV;
    std::vector<float> acc((size_t)a.Dh);
    for (int t = 0; t < a.T; ++t)
      for (int h = 0; h < a.H; ++h) {
        const float* q = a.q + (size_t)t * a.ld + (size_t)h * a.Dh;
        const bf16_t* kh = a.k_cache + (size_t)(h / G) * a.S * a.Dh;
        const bf16_t* vh = a.v_cache + (size_t)(h / G) * a.S * a.Dh;
        const uint64_t* bits = a.bits + (size_t)t * a.words;
        OnlineSoftmax sm;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int j = 0; j < n_past + a.P + t + 1; ++j) {
          if (j >= n_past && !bit_set(bits, j - n_past)) continue;
          if (!dev::in_window(a.window, a.window ? a.positions[t] : 0, j, n_past, a.positions)) continue;
          const bf16_t* kr = kh + (size_t)j * a.Dh;
          float s = 0.0f;
          for (int i = 0; i < a.Dh; ++i) s += q[i] * bf16_to_fp32(kr[i]);
          float scale, p;
          sm.add(dev::softcap_score(s * a.scale, a.softcap), scale, p);
          const bf16_t* vr = vh + (size_t)j * a.Dh;
          for (int i = 0; i < a.Dh; ++i) acc[(size_t)i] = acc[(size_t)i] * scale + p * bf16_to_fp32(vr[i]);
        }
        for (int i = 0; i < a.Dh; ++i)
          a.out[(size_t)t * a.H * a.Dh + (size_t)h * a.Dh + i] = fp32_to_bf16(acc[(size_t)i] / sm.l);
      }
  }

  void glu(const float* gu, int T, int F, bool gelu, bf16_t* out) override {
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < F; ++i) {
        const float g = gu[(size_t)t * 2 * F + i], u = gu[(size_t)t * 2 * F + F + i];
        out[(size_t)t * F + i] = fp32_to_bf16(gelu ? dev::geglu(g, u) : dev::swiglu(g, u));
      }
  }

  void gather(const float* src, const int32_t* rows, int n, int D, float* dst) override {
    for (int i = 0; i < n; ++i) std::memcpy(dst + (size_t)i * D, src + (size_t)rows[i] * D, sizeof(float) * D);
  }
  void gather_bf16(const float* src, const int32_t* rows, int n, int D, bf16_t* dst) override {
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < D; ++c) dst[(size_t)i * D + c] = fp32_to_bf16(src[(size_t)rows[i] * D + c]);
  }
  void copy(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }

  // k selection passes over the row, as the CUDA kernel: pass j takes the best entry that
  // comes after entry j-1 in top-k order.
  void topk(const float* logits, int R, int V, int k, const int32_t* vocab_map, int32_t* ids,
            float* logp) override {
    for (int r = 0; r < R; ++r) {
      const float* x = logits + (size_t)r * V;
      float mx = -INFINITY;
      for (int i = 0; i < V; ++i) mx = std::max(mx, x[i]);
      double sum = 0.0;
      for (int i = 0; i < V; ++i) sum += std::exp((double)(x[i] - mx));
      const float lse = mx + (float)std::log(sum);
      float prev_v = INFINITY;
      int32_t prev_i = -1;
      for (int j = 0; j < k; ++j) {
        float bv = -INFINITY;
        int32_t bi = -1;
        for (int i = 0; i < V; ++i)
          if (dev::topk_before(prev_v, prev_i, x[i], i) && (bi < 0 || dev::topk_before(x[i], i, bv, bi))) {
            bv = x[i];
            bi = i;
          }
        ids[(size_t)r * k + j] = vocab_map && bi >= 0 ? vocab_map[bi] : bi;  // (bi < 0: all NaN)
        logp[(size_t)r * k + j] = bv - lse;
        prev_v = bv;
        prev_i = bi;
      }
    }
  }

  void kv_compact(bf16_t* k, bf16_t* v, int L, int KV, int S, int Dh, int base, const int32_t* kept,
                  int n) override {
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < KV; ++h)
        for (bf16_t* c : {k, v}) {
          bf16_t* head = c + ((size_t)l * KV + h) * S * Dh;
          for (int i = 0; i < n; ++i)
            std::memmove(head + (size_t)(base + i) * Dh, head + (size_t)(base + kept[i]) * Dh, sizeof(bf16_t) * Dh);
        }
  }

 private:
  void timed_copy(void* dst, const void* src, size_t bytes) {
    const auto t0 = std::chrono::steady_clock::now();
    std::memcpy(dst, src, bytes);
    copy_ms_ += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }
  double copy_ms_ = 0.0;
};

}  // namespace

std::unique_ptr<DeviceOps> make_host_ops() { return std::make_unique<HostOps>(); }

}  // namespace dovetail
