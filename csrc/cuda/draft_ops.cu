// The CUDA backend of the device draft engine (model/device_ops.h): cuBLAS GEMMs in bf16
// with fp32 accumulation, custom kernels for what cuBLAS does not fuse (the DGF gate,
// RMSNorm, RoPE + KV store, tree attention, SwiGLU, top-k), a compute stream and a copy
// stream ordered with events, pinned staging, and CUDA graphs of each call shape's compute.
//
// Every CUDA and cuBLAS status is checked; failures become std::runtime_error (Python
// RuntimeError) naming the call. The per-element math is common/device_math.h, which the
// host backend's CPU tests run.
//
// cuBLAS is loaded when the first CUDA draft is made (dlopen of libcublas.so.13 / .12), so
// the extension imports, and the CPU paths work, on machines without it; its headers are
// not needed at build time (the few declarations used are below).
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <library_types.h>

#include <algorithm>
#include <cstdint>
#include <chrono>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "common/device_math.h"
#include "common/error.h"
#include "model/device_ops.h"

namespace dovetail {

namespace {

void cuda_check(cudaError_t st, const char* what) {
  if (st != cudaSuccess) throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(st));
}
// -- the cuBLAS entry points used (cublas_api.h, stable ABI) --------------------------------
using cublasStatus_t = int;
using cublasHandle_t = struct cublasContext*;
constexpr cublasStatus_t CUBLAS_STATUS_SUCCESS = 0;
constexpr int CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_COMPUTE_32F = 68, CUBLAS_GEMM_DEFAULT = -1;

struct Cublas {
  cublasStatus_t (*create)(cublasHandle_t*) = nullptr;
  cublasStatus_t (*destroy)(cublasHandle_t) = nullptr;
  cublasStatus_t (*set_stream)(cublasHandle_t, cudaStream_t) = nullptr;
  cublasStatus_t (*set_workspace)(cublasHandle_t, void*, size_t) = nullptr;
  cublasStatus_t (*gemm_ex)(cublasHandle_t, int, int, int, int, int, const void*, const void*, cudaDataType, int,
                            const void*, cudaDataType, int, const void*, void*, cudaDataType, int, int,
                            int) = nullptr;
  std::string name;  // the library opened

  static const Cublas& loaded() {
    static const Cublas lib = load();
    return lib;
  }
  static const Cublas& get() {
    const Cublas& lib = loaded();
    if (!lib.create)
      throw std::runtime_error("the CUDA draft needs cuBLAS: libcublas.so.13 or .12 was not found "
                               "(install the CUDA toolkit or `pip install nvidia-cublas`, and make it visible "
                               "through LD_LIBRARY_PATH)");
    return lib;
  }

 private:
  static Cublas load() {
    Cublas c;
    void* h = nullptr;
    for (const char* name : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"})
      if ((h = dlopen(name, RTLD_NOW | RTLD_LOCAL))) {
        c.name = name;
        break;
      }
    if (!h) return c;
    auto sym = [&](auto& fn, const char* name) { fn = reinterpret_cast<std::decay_t<decltype(fn)>>(dlsym(h, name)); };
    sym(c.create, "cublasCreate_v2");
    sym(c.destroy, "cublasDestroy_v2");
    sym(c.set_stream, "cublasSetStream_v2");
    sym(c.set_workspace, "cublasSetWorkspace_v2");
    sym(c.gemm_ex, "cublasGemmEx");
    if (!c.destroy || !c.set_stream || !c.set_workspace || !c.gemm_ex) c.create = nullptr;
    return c;
  }
};

void cublas_check(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("cuBLAS error in ") + what + ": status " + std::to_string((int)st));
}

unsigned blocks_for(long n, int threads) { return (unsigned)((n + threads - 1) / threads); }

using dev::bit_set;
using dev::OnlineSoftmax;

// -- reductions -------------------------------------------------------------------------
__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a block of kThreads (a multiple of 32); every thread gets the result.
template <int kThreads>
__device__ float block_sum(float v, float* shared) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

constexpr int kNormThreads = 256;

// out[t] = bf16(rmsnorm(x[t]) * w) or bf16(x[t]); x fp32 rows, or bf16 rows of `table`.
template <bool kFromTable>
__global__ void norm_kernel(const float* __restrict__ x, const bf16_t* __restrict__ table,
                            const int32_t* __restrict__ tokens, const float* __restrict__ w, int D, float eps,
                            bf16_t* __restrict__ out) {
  __shared__ float shared[kNormThreads / 32];
  const int t = blockIdx.x;
  auto load = [&](int i) -> float {
    if constexpr (kFromTable) return bf16_to_fp32(table[(size_t)tokens[t] * D + i]);
    else return x[(size_t)t * D + i];
  };
  float inv = 1.0f;
  if (w) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += kNormThreads) {
      const float v = load(i);
      ss += v * v;
    }
    inv = rsqrtf(block_sum<kNormThreads>(ss, shared) / (float)D + eps);
  }
  for (int i = threadIdx.x; i < D; i += kNormThreads)
    out[(size_t)t * D + i] = fp32_to_bf16(w ? load(i) * inv * w[i] : load(i));
}

__global__ void dgf_pack_kernel(const float* __restrict__ h1, const float* __restrict__ a, int T, int D,
                                bf16_t* __restrict__ hz) {
  const long n = (long)T * D;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
    const long t = i / D, c = i % D;
    hz[t * 2 * D + c] = fp32_to_bf16(h1[i]);
    hz[t * 2 * D + D + c] = fp32_to_bf16(dgf_silu(a[i]));
  }
}

// The fused gate: g = z h1 + (1 - z) SiLU(a), z = sigmoid(zpre), one pass.
__global__ void dgf_mix_kernel(const float* __restrict__ h1, const float* __restrict__ a,
                               const float* __restrict__ zpre, long n, float* __restrict__ g) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    g[i] = dgf_mix(h1[i], dgf_silu(a[i]), zpre[i]);
}

// One thread per (token, head of q|k|v, i < Dh/2): rotate q and k pairs, store k and v.
__global__ void rope_store_kernel(RopeStoreArgs a) {
  const int half = a.Dh / 2, heads = a.H + 2 * a.KV;
  const long n = (long)a.T * heads * half;
  const int base = *a.n_past + a.P;
  for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
    const int i = (int)(idx % half), h = (int)((idx / half) % heads), t = (int)(idx / ((long)half * heads));
    float* v = a.qkv + (size_t)t * a.ld + (size_t)h * a.Dh;
    float x0 = v[i], x1 = v[i + half];
    if (h < a.H + a.KV) {
      const size_t p = (size_t)a.positions[t] * half + i;
      dev::rope_pair(x0, x1, a.cos[p], a.sin[p]);
      v[i] = x0;
      v[i + half] = x1;
    }
    if (h >= a.H) {
      const bool is_k = h < a.H + a.KV;
      const int kvh = is_k ? h - a.H : h - a.H - a.KV;
      bf16_t* cache = (is_k ? a.k_cache : a.v_cache) + ((size_t)kvh * a.S + base + t) * a.Dh;
      cache[i] = fp32_to_bf16(x0);
      cache[i + half] = fp32_to_bf16(x1);
    }
  }
}

constexpr int kAttnWarps = 4;
constexpr int kMaxDhPerLane = 8;  // head_dim <= 256

// One warp per (token, head of q|k|v), before rope_store_kernel: the bias added, then each q
// and k head RMS-normalized (RopeStoreArgs); the 32 lanes split the head dimension.
__global__ void qkv_prep_kernel(RopeStoreArgs a) {
  const int lane = threadIdx.x % 32, heads = a.H + 2 * a.KV;
  const long item = blockIdx.x * (long)kAttnWarps + threadIdx.x / 32;
  if (item >= (long)a.T * heads) return;  // (the whole warp: item is the warp's)
  const int t = (int)(item / heads), h = (int)(item % heads);
  float* v = a.qkv + (size_t)t * a.ld + (size_t)h * a.Dh;
  const float* b = a.bias ? a.bias + (size_t)h * a.Dh : nullptr;
  const float* w = !a.q_norm ? nullptr : h < a.H ? a.q_norm : h < a.H + a.KV ? a.k_norm : nullptr;
  float x[kMaxDhPerLane], ss = 0.0f;
  for (int c = 0; c < kMaxDhPerLane; ++c) {
    const int i = lane + 32 * c;
    x[c] = i < a.Dh ? v[i] + (b ? b[i] : 0.0f) : 0.0f;
    ss += x[c] * x[c];
  }
  const float inv = w ? rsqrtf(warp_sum(ss) / (float)a.Dh + a.eps) : 1.0f;
  for (int c = 0; c < kMaxDhPerLane; ++c) {
    const int i = lane + 32 * c;
    if (i < a.Dh) v[i] = w ? x[c] * inv * w[i] : x[c];
  }
}

// Eight bf16 values (one 16-byte load) as floats, in order.
__device__ inline void bf16x8_to_fp32(const uint4 v, float* f) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(u[i] << 16);
    f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}

// One block of kAttnSplit warps per (token, head). The token's visible keys (the committed
// prefix, then its visible scratch rows in slot order) form a list, cut in chunks of 32 by a
// key's place in that list, as the CPU kernels do: the chunks are the same whether the
// token's ancestors are committed or in the batch, so its output does not depend on the batch
// (batch invariance). Chunk c goes to warp c % kAttnSplit, one key per lane: the lane's
// score (one FMA chain over the head dimension), the chunk's max and weights, then the values
// in list order with the lanes splitting the head dimension, folded into the warp's running
// record [m, l, acc]. Keys outside the sliding window keep their places with weight zero; a
// chunk without a seen key is skipped (its record is empty). The warps' records are merged
// in warp order. At decoding sizes the kernel moves little data and its time is its chain of
// dependent steps, so a key's row and eight keys' values are each loaded at once before
// their FMAs (in the same order).
// Dynamic shared memory: (P + T) ints for the visible scratch slots.
constexpr int kAttnSplit = 8;
constexpr int kAttnChunk = 32;
constexpr int kAttnLoads = 8;  // loads issued together: a key's eight 16-byte pieces, eight keys' values

__device__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__global__ void __launch_bounds__(32 * kAttnSplit) attention_kernel(AttentionCall a) {
  extern __shared__ int vis[];  // the token's visible scratch slots, in slot order
  __shared__ float q_s[32 * kMaxDhPerLane];
  __shared__ float rec_m[kAttnSplit], rec_l[kAttnSplit];
  __shared__ float rec_acc[kAttnSplit][32 * kMaxDhPerLane];
  __shared__ int n_vis;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int t = blockIdx.x / a.H, h = blockIdx.x % a.H, G = a.H / a.KV, n_past = *a.n_past;
  const float* q = a.q + (size_t)t * a.ld + (size_t)h * a.Dh;
  for (int i = threadIdx.x; i < a.Dh; i += blockDim.x) q_s[i] = q[i];
  const uint64_t* bits = a.bits + (size_t)t * a.words;
  if (warp == 0) {  // the scratch slots 0 .. P + t the token sees, compacted in order
    const int ns = a.P + t + 1;
    int count = 0;
    for (int base = 0; base < ns; base += 32) {
      const int sl = base + lane;
      const bool seen = sl < ns && bit_set(bits, sl);
      const unsigned mask = __ballot_sync(0xffffffffu, seen);
      if (seen) vis[count + __popc(mask & ((1u << lane) - 1u))] = sl;
      count += __popc(mask);
    }
    if (lane == 0) n_vis = count;
  }
  __syncthreads();
  const bf16_t* kh = a.k_cache + (size_t)(h / G) * a.S * a.Dh;
  const bf16_t* vh = a.v_cache + (size_t)(h / G) * a.S * a.Dh;
  const int n = n_past + n_vis, pos = a.window ? a.positions[t] : 0;
  const bool vec = a.Dh % 8 == 0 && reinterpret_cast<uintptr_t>(kh) % 16 == 0;
  // (the prefix's keys below the window's first committed slot are all unseen: skip their chunks)
  const int first = a.window ? max(0, min(n_past, pos - a.window + 1)) : 0;
  const int c0 = first / kAttnChunk, c_end = (n + kAttnChunk - 1) / kAttnChunk;
  float m = -INFINITY, l = 0.0f, acc[kMaxDhPerLane];
#pragma unroll
  for (int c = 0; c < kMaxDhPerLane; ++c) acc[c] = 0.0f;
  for (int c = c0 + ((warp - c0 % kAttnSplit) + kAttnSplit) % kAttnSplit; c < c_end; c += kAttnSplit) {
    const int i = c * kAttnChunk + lane;
    const int j = i < n_past ? i : i < n ? n_past + vis[i - n_past] : -1;  // the key's slot
    float s = -INFINITY;
    if (j >= 0 && dev::in_window(a.window, pos, j, n_past, a.positions)) {
      const bf16_t* kr = kh + (size_t)j * a.Dh;
      float d = 0.0f;
      if (vec) {  // up to eight 16-byte loads in flight, then their FMAs in order
        for (int e0 = 0; e0 < a.Dh; e0 += 8 * kAttnLoads) {
          uint4 kv[kAttnLoads];
#pragma unroll
          for (int u = 0; u < kAttnLoads; ++u)
            kv[u] = e0 + 8 * u < a.Dh ? *reinterpret_cast<const uint4*>(kr + e0 + 8 * u) : make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int u = 0; u < kAttnLoads; ++u) {
            if (e0 + 8 * u >= a.Dh) break;
            float kf[8];
            bf16x8_to_fp32(kv[u], kf);
#pragma unroll
            for (int e = 0; e < 8; ++e) d = fmaf(q_s[e0 + 8 * u + e], kf[e], d);
          }
        }
      } else {
        for (int e = 0; e < a.Dh; ++e) d = fmaf(q_s[e], bf16_to_fp32(kr[e]), d);
      }
      s = dev::softcap_score(d * a.scale, a.softcap);
    }
    const float mc = warp_max(s);
    if (mc == -INFINITY) continue;  // no seen key in this chunk (the same on every lane)
    const float m2 = fmaxf(m, mc), alpha = expf(m - m2);  // exp(-inf) = 0 on the first chunk
    const float p = s == -INFINITY ? 0.0f : expf(s - m2);
    l = l * alpha + warp_sum(p);
#pragma unroll
    for (int e = 0; e < kMaxDhPerLane; ++e) acc[e] *= alpha;
#pragma unroll
    for (int k0 = 0; k0 < kAttnChunk; k0 += kAttnLoads) {  // the values of kAttnLoads keys loaded at once
      float pk[kAttnLoads], vf[kAttnLoads][kMaxDhPerLane];
#pragma unroll
      for (int u = 0; u < kAttnLoads; ++u) {
        pk[u] = __shfl_sync(0xffffffffu, p, k0 + u);
        const int jk = __shfl_sync(0xffffffffu, j, k0 + u);
        const bf16_t* vr = vh + (size_t)max(jk, 0) * a.Dh;  // (pk 0: not read)
#pragma unroll
        for (int e = 0; e < kMaxDhPerLane; ++e) {
          const int d = lane + 32 * e;
          vf[u][e] = pk[u] != 0.0f && d < a.Dh ? bf16_to_fp32(vr[d]) : 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kAttnLoads; ++u) {
        if (pk[u] == 0.0f) continue;  // the same on every lane
#pragma unroll
        for (int e = 0; e < kMaxDhPerLane; ++e) acc[e] = fmaf(pk[u], vf[u][e], acc[e]);
      }
    }
    m = m2;
  }
  if (lane == 0) rec_m[warp] = m, rec_l[warp] = l;
#pragma unroll
  for (int e = 0; e < kMaxDhPerLane; ++e) {
    const int d = lane + 32 * e;
    if (d < a.Dh) rec_acc[warp][d] = acc[e];
  }
  __syncthreads();
  if (warp != 0) return;
  float M = -INFINITY;
  for (int w = 0; w < kAttnSplit; ++w)
    if (rec_l[w] > 0.0f) M = fmaxf(M, rec_m[w]);
  float L = 0.0f;
#pragma unroll
  for (int e = 0; e < kMaxDhPerLane; ++e) acc[e] = 0.0f;
  for (int w = 0; w < kAttnSplit; ++w) {
    if (!(rec_l[w] > 0.0f)) continue;
    const float f = expf(rec_m[w] - M);
    L = fmaf(rec_l[w], f, L);
#pragma unroll
    for (int e = 0; e < kMaxDhPerLane; ++e) {
      const int d = lane + 32 * e;
      if (d < a.Dh) acc[e] = fmaf(rec_acc[w][d], f, acc[e]);
    }
  }
  bf16_t* out = a.out + (size_t)t * a.H * a.Dh + (size_t)h * a.Dh;
#pragma unroll
  for (int e = 0; e < kMaxDhPerLane; ++e) {
    const int d = lane + 32 * e;
    if (d < a.Dh) out[d] = fp32_to_bf16(acc[e] / L);
  }
}

__global__ void glu_kernel(const float* __restrict__ gu, int T, int F, bool gelu, bf16_t* __restrict__ out) {
  const long n = (long)T * F;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
    const long t = i / F, c = i % F;
    const float g = gu[t * 2 * F + c], u = gu[t * 2 * F + F + c];
    out[i] = fp32_to_bf16(gelu ? dev::geglu(g, u) : dev::swiglu(g, u));
  }
}

// x[t] += rmsnorm(y[t]) * w, one block per row.
__global__ void add_norm_kernel(float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ w,
                                int D, float eps) {
  __shared__ float shared[kNormThreads / 32];
  const int t = blockIdx.x;
  const float* yr = y + (size_t)t * D;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < D; i += kNormThreads) ss += yr[i] * yr[i];
  const float inv = rsqrtf(block_sum<kNormThreads>(ss, shared) / (float)D + eps);
  for (int i = threadIdx.x; i < D; i += kNormThreads) x[(size_t)t * D + i] += yr[i] * inv * w[i];
}

template <typename Out>
__global__ void gather_kernel(const float* __restrict__ src, const int32_t* __restrict__ rows, int n, int D,
                              Out* __restrict__ dst) {
  const long total = (long)n * D;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
    const float v = src[(size_t)rows[i / D] * D + i % D];
    if constexpr (sizeof(Out) == 2) dst[i] = fp32_to_bf16(v);
    else dst[i] = v;
  }
}

// Row-invariant GEMM, y[M, N] (+)= x[M, K] w[N, K]^T: each output's reduction order depends
// on K alone, never on M or on the row's place in the batch, so a token's result is the same
// bits in any batch (the target prefix's batch invariance).
//
// Vector kernel (K a multiple of 8, x and w 16-byte aligned): one warp per column n and group
// of kGemmRows rows; lane l takes the 8-element chunks l, l + 32, ... of the K axis (16-byte
// loads), each chunk's 8 products accumulated in order, then a fixed shuffle tree. A weight
// chunk is loaded once for the group's rows.
constexpr int kGemmWarps = 8;
constexpr int kGemmRows = 4;


__global__ void gemm_invariant_vec_kernel(int M, int N, int K, const bf16_t* __restrict__ x,
                                          const bf16_t* __restrict__ w, float* __restrict__ y, int ldy,
                                          bool accumulate) {
  const long groups = (M + kGemmRows - 1) / kGemmRows;
  const long item = (long)blockIdx.x * kGemmWarps + threadIdx.x / 32;
  if (item >= groups * N) return;  // whole warps: item is the same on every lane
  const int lane = threadIdx.x % 32, n = (int)(item % N), m0 = (int)(item / N) * kGemmRows;
  const int chunks = K / 8;
  const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)n * K);
  float acc[kGemmRows];
#pragma unroll
  for (int r = 0; r < kGemmRows; ++r) acc[r] = 0.0f;
  for (int c = lane; c < chunks; c += 32) {
    float wf[8];
    bf16x8_to_fp32(__ldg(wr + c), wf);
#pragma unroll
    for (int r = 0; r < kGemmRows; ++r) {
      if (m0 + r >= M) break;  // the same on every lane
      float xf[8];
      bf16x8_to_fp32(*(reinterpret_cast<const uint4*>(x + (size_t)(m0 + r) * K) + c), xf);
      float s = acc[r];
#pragma unroll
      for (int e = 0; e < 8; ++e) s = fmaf(xf[e], wf[e], s);
      acc[r] = s;
    }
  }
#pragma unroll
  for (int r = 0; r < kGemmRows; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0 && m0 + r < M) {
      float& out = y[(size_t)(m0 + r) * ldy + n];
      out = accumulate ? out + v : v;
    }
  }
}

// Any K or alignment: one warp per output (m, n), lanes take k = lane, lane + 32, ... in
// order, then the same shuffle tree.
__global__ void gemm_invariant_kernel(int M, int N, int K, const bf16_t* __restrict__ x,
                                      const bf16_t* __restrict__ w, float* __restrict__ y, int ldy,
                                      bool accumulate) {
  const long item = (long)blockIdx.x * kGemmWarps + threadIdx.x / 32;
  if (item >= (long)M * N) return;  // whole warps: item is the same on every lane
  const int lane = threadIdx.x % 32, m = (int)(item / N), n = (int)(item % N);
  const bf16_t* xr = x + (size_t)m * K;
  const bf16_t* wr = w + (size_t)n * K;
  float acc = 0.0f;
  for (int i = lane; i < K; i += 32) acc += bf16_to_fp32(xr[i]) * bf16_to_fp32(wr[i]);
  acc = warp_sum(acc);
  if (lane == 0) {
    float& out = y[(size_t)m * ldy + n];
    out = accumulate ? out + acc : acc;
  }
}

__global__ void embed_kernel(const bf16_t* __restrict__ table, const int32_t* __restrict__ tokens, int T, int D,
                             float scale, float* __restrict__ out) {
  const long n = (long)T * D;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    out[i] = bf16_to_fp32(table[(size_t)tokens[i / D] * D + i % D]) * scale;
}

constexpr int kTopkThreads = 256;

// One block per row: max, sum of exponentials (double), then k selection passes; pass j
// takes the best entry after entry j-1 in top-k order (larger value, then lower index).
__global__ void topk_kernel(const float* __restrict__ logits, int V, int k, const int32_t* __restrict__ vocab_map,
                            int32_t* __restrict__ ids, float* __restrict__ logp) {
  __shared__ float sv[kTopkThreads];
  __shared__ int32_t si[kTopkThreads];
  __shared__ double sd[kTopkThreads];
  const int r = blockIdx.x, tid = threadIdx.x;
  const float* x = logits + (size_t)r * V;
  float mx = -INFINITY;
  for (int i = tid; i < V; i += kTopkThreads) mx = fmaxf(mx, x[i]);
  sv[tid] = mx;
  __syncthreads();
  for (int s = kTopkThreads / 2; s > 0; s >>= 1) {
    if (tid < s) sv[tid] = fmaxf(sv[tid], sv[tid + s]);
    __syncthreads();
  }
  mx = sv[0];
  __syncthreads();
  double sum = 0.0;
  for (int i = tid; i < V; i += kTopkThreads) sum += exp((double)(x[i] - mx));
  sd[tid] = sum;
  __syncthreads();
  for (int s = kTopkThreads / 2; s > 0; s >>= 1) {
    if (tid < s) sd[tid] += sd[tid + s];
    __syncthreads();
  }
  const float lse = mx + (float)log(sd[0]);
  float prev_v = INFINITY;
  int32_t prev_i = -1;
  for (int j = 0; j < k; ++j) {
    float bv = -INFINITY;
    int32_t bi = -1;
    for (int i = tid; i < V; i += kTopkThreads)
      if (dev::topk_before(prev_v, prev_i, x[i], i) && (bi < 0 || dev::topk_before(x[i], i, bv, bi))) {
        bv = x[i];
        bi = i;
      }
    __syncthreads();
    sv[tid] = bv;
    si[tid] = bi;
    __syncthreads();
    for (int s = kTopkThreads / 2; s > 0; s >>= 1) {
      if (tid < s && si[tid + s] >= 0 && (si[tid] < 0 || dev::topk_before(sv[tid + s], si[tid + s], sv[tid], si[tid]))) {
        sv[tid] = sv[tid + s];
        si[tid] = si[tid + s];
      }
      __syncthreads();
    }
    prev_v = sv[0];
    prev_i = si[0];
    if (tid == 0) {  // (prev_i < 0 only when NaNs leave fewer than k candidates)
      ids[(size_t)r * k + j] = vocab_map && prev_i >= 0 ? vocab_map[prev_i] : prev_i;
      logp[(size_t)r * k + j] = prev_v - lse;
    }
  }
}

// One thread per (cache, layer, head, element): the kept rows in order (each source row
// lies at or after its destination, so the sequential order of one element is safe).
__global__ void kv_compact_kernel(bf16_t* k, bf16_t* v, int L, int KV, int S, int Dh, int base,
                                  const int32_t* __restrict__ kept, int n) {
  const long total = 2L * L * KV * Dh;
  for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
    const int i = (int)(idx % Dh);
    const long lh = (idx / Dh) % ((long)L * KV);
    bf16_t* head = (idx / ((long)Dh * L * KV) ? v : k) + (size_t)lh * S * Dh;
    for (int r = 0; r < n; ++r) head[(size_t)(base + r) * Dh + i] = head[(size_t)(base + kept[r]) * Dh + i];
  }
}

class CudaOps final : public DeviceOps {
 public:
  explicit CudaOps(int device) : device_(device), blas_lib_(Cublas::get()) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      n = 0;
    }
    DT_CHECK(device >= 0 && device < n, "no CUDA device with index " + std::to_string(device) + " (" +
                                            std::to_string(n) + " visible)");
    // The caller's current device is restored on the way out (DeviceScope for the calls).
    const int previous = enter();
    try {
      cudaDeviceProp prop{};
      cuda_check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
      name_ = prop.name;
      cuda_check(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking), "cudaStreamCreate");
      cuda_check(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking), "cudaStreamCreate");
      for (cudaEvent_t* e : {&h2d_begin_, &h2d_end_, &d2h_begin_, &d2h_end_})
        cuda_check(cudaEventCreate(e), "cudaEventCreate");
      for (cudaEvent_t* e : {&compute_ready_, &compute_done_})
        cuda_check(cudaEventCreateWithFlags(e, cudaEventDisableTiming), "cudaEventCreate");
      // finish() polls its events for a short while (a draft call is done in well under a
      // millisecond, and a blocking wait's wake-up can cost as much again), yielding the
      // core between polls, then blocks: a long wait leaves the CPU cores to the target's
      // verification. Blocking-sync events leave the process-wide device flags, and so other
      // libraries' waits, as they were. DOVETAIL_CUDA_WAIT=block skips the polling.
      poll_ = wait_policy_from_env();
      for (cudaEvent_t* e : {&compute_synced_, &copy_synced_})
        cuda_check(cudaEventCreateWithFlags(e, cudaEventDisableTiming | cudaEventBlockingSync), "cudaEventCreate");
      cublas_check(blas_lib_.create(&blas_), "cublasCreate");
      cublas_check(blas_lib_.set_stream(blas_, compute_), "cublasSetStream");
      // A fixed workspace keeps cuBLAS graph-capturable (set after the stream, which resets
      // it); cuBLAS asks for 32 MiB on Hopper and later, 4 MiB before.
      // DOVETAIL_CUBLAS_WORKSPACE_MB sets another size.
      workspace_bytes_ = workspace_mib_from_env(prop.major >= 9 ? 32 : 4) << 20;
      if (workspace_bytes_) cuda_check(cudaMalloc(&workspace_, workspace_bytes_), "cudaMalloc (cuBLAS workspace)");
      cublas_check(blas_lib_.set_workspace(blas_, workspace_, workspace_bytes_), "cublasSetWorkspace");
    } catch (...) {
      destroy();
      leave(previous);
      throw;
    }
    leave(previous);
  }

  int enter() override {
    int previous = -1;
    if (cudaGetDevice(&previous) != cudaSuccess) {
      cudaGetLastError();
      previous = -1;
    }
    select();
    return previous;
  }
  void leave(int previous) override {
    if (previous >= 0 && previous != device_) cudaSetDevice(previous);
  }

  ~CudaOps() override { destroy(); }

  std::string name() const override { return "cuda"; }
  std::string device_name() const override { return name_; }

  void* alloc(size_t bytes) override {
    select();
    void* p = nullptr;
    cuda_check(cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc");
    // Zeroed on the compute stream and waited for: the legacy default stream (cudaMemset)
    // is not ordered with the non-blocking compute and copy streams.
    const cudaError_t st = cudaMemsetAsync(p, 0, bytes, compute_);
    cuda_check(st == cudaSuccess ? cudaStreamSynchronize(compute_) : st, "cudaMemset");
    return p;
  }
  void release(void* p) override {
    cudaSetDevice(device_);
    cudaFree(p);
  }
  void* alloc_staging(size_t bytes) override {
    select();
    void* p = nullptr;
    cuda_check(cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocDefault), "cudaHostAlloc");
    return p;
  }
  void release_staging(void* p) override { cudaFreeHost(p); }
  void upload(void* dst, const void* src, size_t bytes) override {
    select();
    // cudaMemcpy from pageable memory may return before the data lands, and on the legacy
    // stream, which the non-blocking streams do not wait for: copy on compute, then wait.
    cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, compute_), "cudaMemcpy (upload)");
    cuda_check(cudaStreamSynchronize(compute_), "cudaMemcpy (upload)");
  }

  // h2d waits for earlier compute (which may still read dst) and compute waits for it;
  // d2h waits for the compute so far.
  void h2d(void* dst, const void* staging, size_t bytes) override {
    timed_copy(dst, staging, bytes, cudaMemcpyHostToDevice, compute_ready_, h2d_begin_, h2d_end_, "h2d");
    cuda_check(cudaStreamWaitEvent(compute_, h2d_end_, 0), "cudaStreamWaitEvent");
    h2d_pending_ = true;
  }
  void d2h(void* staging, const void* src, size_t bytes) override {
    timed_copy(staging, src, bytes, cudaMemcpyDeviceToHost, compute_done_, d2h_begin_, d2h_end_, "d2h");
    d2h_pending_ = true;
  }
  double finish() override {
    select();
    cuda_check(cudaEventRecord(compute_synced_, compute_), "cudaEventRecord");
    cuda_check(cudaEventRecord(copy_synced_, copy_), "cudaEventRecord");
    wait(compute_synced_, "compute stream");
    wait(copy_synced_, "copy stream");
    double ms = 0.0;
    float part = 0.0f;
    if (h2d_pending_) {
      cuda_check(cudaEventElapsedTime(&part, h2d_begin_, h2d_end_), "cudaEventElapsedTime");
      ms += part;
    }
    if (d2h_pending_) {
      cuda_check(cudaEventElapsedTime(&part, d2h_begin_, d2h_end_), "cudaEventElapsedTime");
      ms += part;
    }
    h2d_pending_ = d2h_pending_ = false;
    return ms;
  }

  bool can_record() const override { return true; }
  bool replay(uint64_t key) override {
    auto it = graphs_.find(key);
    if (it == graphs_.end()) return false;
    select();
    cuda_check(cudaGraphLaunch(it->second, compute_), "cudaGraphLaunch");
    return true;
  }
  void begin_record(uint64_t) override {
    select();
    cuda_check(cudaStreamBeginCapture(compute_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    recording_ = true;
  }
  void end_record(uint64_t key) override {
    cudaGraph_t graph = nullptr;
    recording_ = false;
    cuda_check(cudaStreamEndCapture(compute_, &graph), "cudaStreamEndCapture");
    cudaGraphExec_t exec = nullptr;
    const cudaError_t st = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    cuda_check(st, "cudaGraphInstantiate");
    graphs_[key] = exec;
    cuda_check(cudaGraphLaunch(exec, compute_), "cudaGraphLaunch");
  }
  size_t recorded() const override { return graphs_.size(); }

  void gemm(int M, int N, int K, const bf16_t* x, const bf16_t* w, float* y, int ldy, bool accumulate) override {
    // Row-major y[M, N] = x[M, K] w[N, K]^T is column-major y^T = w^T' x^T: op(w) = T.
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    guarded_blas(blas_lib_.gemm_ex(blas_, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, w, CUDA_R_16BF, K, x,
                                   CUDA_R_16BF, K, &beta, y, CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx");
  }
  void gemm_invariant(int M, int N, int K, const bf16_t* x, const bf16_t* w, float* y, int ldy,
                      bool accumulate) override {
    // The kernel is chosen by K and the buffers' alignment alone, so a row's result still
    // does not depend on M.
    const bool vec = K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
    if (vec) {
      const long items = (long)(M + kGemmRows - 1) / kGemmRows * N;
      gemm_invariant_vec_kernel<<<blocks_for(items, kGemmWarps), 32 * kGemmWarps, 0, compute_>>>(M, N, K, x, w, y,
                                                                                                ldy, accumulate);
    } else {
      gemm_invariant_kernel<<<blocks_for((long)M * N, kGemmWarps), 32 * kGemmWarps, 0, compute_>>>(M, N, K, x, w, y,
                                                                                                  ldy, accumulate);
    }
    after_launch("gemm_invariant");
  }
  void embed(const bf16_t* table, const int32_t* tokens, int T, int D, float scale, float* out) override {
    embed_kernel<<<grid((long)T * D), kThreads, 0, compute_>>>(table, tokens, T, D, scale, out);
    after_launch("embed");
  }
  void embed_norm(const bf16_t* table, const int32_t* tokens, int T, int D, const float* w, float eps,
                  bf16_t* out) override {
    norm_kernel<true><<<T, kNormThreads, 0, compute_>>>(nullptr, table, tokens, w, D, eps, out);
    after_launch("embed_norm");
  }
  void norm(const float* x, const float* w, int T, int D, float eps, bf16_t* out) override {
    norm_kernel<false><<<T, kNormThreads, 0, compute_>>>(x, nullptr, nullptr, w, D, eps, out);
    after_launch("norm");
  }
  void add_norm(float* x, const float* y, const float* w, int T, int D, float eps) override {
    add_norm_kernel<<<T, kNormThreads, 0, compute_>>>(x, y, w, D, eps);
    after_launch("add_norm");
  }
  void dgf_pack(const float* h1, const float* a, int T, int D, bf16_t* hz) override {
    dgf_pack_kernel<<<grid((long)T * D), kThreads, 0, compute_>>>(h1, a, T, D, hz);
    after_launch("dgf_pack");
  }
  void dgf_mix(const float* h1, const float* a, const float* zpre, int T, int D, float* g) override {
    dgf_mix_kernel<<<grid((long)T * D), kThreads, 0, compute_>>>(h1, a, zpre, (long)T * D, g);
    after_launch("dgf_mix");
  }
  void rope_store(const RopeStoreArgs& a) override {
    if (a.bias || a.q_norm) {
      // (head_dim <= 32 * kMaxDhPerLane: the engine refuses larger heads at construction)
      qkv_prep_kernel<<<blocks_for((long)a.T * (a.H + 2 * a.KV), kAttnWarps), 32 * kAttnWarps, 0, compute_>>>(a);
      after_launch("qkv_prep");
    }
    rope_store_kernel<<<grid((long)a.T * (a.H + 2 * a.KV) * (a.Dh / 2)), kThreads, 0, compute_>>>(a);
    after_launch("rope_store");
  }
  void attention(const AttentionCall& a) override {
    // (head_dim <= 32 * kMaxDhPerLane: the engine refuses larger heads at construction)
    attention_kernel<<<(unsigned)(a.T * a.H), 32 * kAttnSplit, sizeof(int) * (size_t)(a.P + a.T), compute_>>>(a);
    after_launch("attention");
  }
  void glu(const float* gu, int T, int F, bool gelu, bf16_t* out) override {
    glu_kernel<<<grid((long)T * F), kThreads, 0, compute_>>>(gu, T, F, gelu, out);
    after_launch("glu");
  }
  void gather(const float* src, const int32_t* rows, int n, int D, float* dst) override {
    gather_kernel<float><<<grid((long)n * D), kThreads, 0, compute_>>>(src, rows, n, D, dst);
    after_launch("gather");
  }
  void gather_bf16(const float* src, const int32_t* rows, int n, int D, bf16_t* dst) override {
    gather_kernel<bf16_t><<<grid((long)n * D), kThreads, 0, compute_>>>(src, rows, n, D, dst);
    after_launch("gather_bf16");
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    guarded(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, compute_), "cudaMemcpyAsync (d2d)");
  }
  void topk(const float* logits, int R, int V, int k, const int32_t* vocab_map, int32_t* ids, float* logp) override {
    topk_kernel<<<R, kTopkThreads, 0, compute_>>>(logits, V, k, vocab_map, ids, logp);
    after_launch("topk");
  }
  void kv_compact(bf16_t* k, bf16_t* v, int L, int KV, int S, int Dh, int base, const int32_t* kept,
                  int n) override {
    kv_compact_kernel<<<grid(2L * L * KV * Dh), kThreads, 0, compute_>>>(k, v, L, KV, S, Dh, base, kept, n);
    after_launch("kv_compact");
  }

 private:
  static constexpr int kThreads = 256;
  static unsigned grid(long n) { return std::max(1u, std::min(blocks_for(n, kThreads), 4096u)); }

  void select() { cuda_check(cudaSetDevice(device_), "cudaSetDevice"); }
  // An event's completion: polled for up to kPollMicros (yielding between polls), then
  // waited for with the thread blocked.
  void wait(cudaEvent_t e, const char* what) const {
    if (poll_) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kPollMicros);
      for (;;) {
        const cudaError_t st = cudaEventQuery(e);
        if (st == cudaSuccess) return;
        if (st != cudaErrorNotReady) cuda_check(st, what);
        if (std::chrono::steady_clock::now() >= until) break;
        std::this_thread::yield();
      }
    }
    cuda_check(cudaEventSynchronize(e), what);
  }
  static bool wait_policy_from_env() {
    const char* env = std::getenv("DOVETAIL_CUDA_WAIT");
    if (env == nullptr || *env == '\0' || std::string(env) == "poll") return true;
    DT_CHECK(std::string(env) == "block", std::string("DOVETAIL_CUDA_WAIT must be 'poll' or 'block', not '") + env + "'");
    return false;
  }
  static size_t workspace_mib_from_env(size_t fallback) {
    const char* env = std::getenv("DOVETAIL_CUBLAS_WORKSPACE_MB");
    if (env == nullptr || *env == '\0') return fallback;
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    DT_CHECK(*end == '\0' && v >= 0 && v <= 1024, std::string("DOVETAIL_CUBLAS_WORKSPACE_MB must be an integer "
                                                              "from 0 to 1024, not '") + env + "'");
    return (size_t)v;
  }
  // A copy on the copy stream after the compute stream's work so far, between two timing events.
  void timed_copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaEvent_t after,
                  cudaEvent_t begin, cudaEvent_t end, const char* what) {
    select();
    cuda_check(cudaEventRecord(after, compute_), "cudaEventRecord");
    cuda_check(cudaStreamWaitEvent(copy_, after, 0), "cudaStreamWaitEvent");
    cuda_check(cudaEventRecord(begin, copy_), "cudaEventRecord");
    cuda_check(cudaMemcpyAsync(dst, src, bytes, kind, copy_), what);
    cuda_check(cudaEventRecord(end, copy_), "cudaEventRecord");
  }
  // Frees what exists (also after a constructor failure half-way); errors are ignored.
  void destroy() noexcept {
    int previous = -1;
    if (cudaGetDevice(&previous) != cudaSuccess) cudaGetLastError();
    cudaSetDevice(device_);
    abort_recording();
    if (compute_) cudaStreamSynchronize(compute_);
    if (copy_) cudaStreamSynchronize(copy_);
    for (auto& kv : graphs_) cudaGraphExecDestroy(kv.second);
    graphs_.clear();
    if (blas_) blas_lib_.destroy(blas_);
    if (workspace_) cudaFree(workspace_);
    for (cudaEvent_t e : {h2d_begin_, h2d_end_, d2h_begin_, d2h_end_, compute_ready_, compute_done_,
                          compute_synced_, copy_synced_})
      if (e) cudaEventDestroy(e);
    if (compute_) cudaStreamDestroy(compute_);
    if (copy_) cudaStreamDestroy(copy_);
    blas_ = nullptr;
    workspace_ = nullptr;
    h2d_begin_ = h2d_end_ = d2h_begin_ = d2h_end_ = compute_ready_ = compute_done_ = nullptr;
    compute_synced_ = copy_synced_ = nullptr;
    compute_ = copy_ = nullptr;
    cudaGetLastError();
    if (previous >= 0 && previous != device_) cudaSetDevice(previous);
  }
  // A failure inside a recording ends the capture first, so the stream stays usable.
  void abort_recording() {
    if (!recording_) return;
    recording_ = false;
    cudaGraph_t g = nullptr;
    cudaStreamEndCapture(compute_, &g);
    if (g) cudaGraphDestroy(g);
  }
  void after_launch(const char* what) {
    const cudaError_t st = cudaGetLastError();
    if (st != cudaSuccess) abort_recording();
    cuda_check(st, what);
  }
  void guarded(cudaError_t st, const char* what) {
    if (st != cudaSuccess) abort_recording();
    cuda_check(st, what);
  }
  void guarded_blas(cublasStatus_t st, const char* what) {
    if (st != CUBLAS_STATUS_SUCCESS) abort_recording();
    cublas_check(st, what);
  }

  int device_ = 0;
  const Cublas& blas_lib_;
  std::string name_;
  cudaStream_t compute_ = nullptr, copy_ = nullptr;
  cudaEvent_t h2d_begin_ = nullptr, h2d_end_ = nullptr, d2h_begin_ = nullptr, d2h_end_ = nullptr;
  cudaEvent_t compute_ready_ = nullptr, compute_done_ = nullptr;
  cudaEvent_t compute_synced_ = nullptr, copy_synced_ = nullptr;  // blocking-sync waits in finish()
  bool poll_ = true;                                               // finish() polls before it blocks
  static constexpr long kPollMicros = 2000;
  bool h2d_pending_ = false, d2h_pending_ = false, recording_ = false;
  cublasHandle_t blas_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<uint64_t, cudaGraphExec_t> graphs_;
};

}  // namespace

std::unique_ptr<DeviceOps> make_cuda_ops(int device) { return std::make_unique<CudaOps>(device); }

std::string cublas_library() {
  const Cublas& c = Cublas::loaded();
  return c.create ? c.name : std::string();
}

}  // namespace dovetail
