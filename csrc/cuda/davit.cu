// DaViT attention on the GPU: tiled fp32 projections whose A rows / C rows follow the window
// partition as index arithmetic (cpu/davit_window.h, shared with the CPU path), a per-(window,
// head) attention kernel with fp32 softmax in shared memory, and the channel-attention
// pipeline (k^T v partial maps over token splits, fixed-order reduction + softmax, q A^T).
// Kernels see only the plain Params structs; launchers pick grids and check every call.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/error.h"
#include "cpu/davit_window.h"
#include "cuda/davit_cuda.h"

namespace dovetail::cuda::davit {

using dovetail::davit::WindowGrid;
using dovetail::davit::make_window_grid;
using dovetail::davit::window_token;

namespace {

void check_cuda(cudaError_t st, const char* what) {
  if (st != cudaSuccess) throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(st));
}
void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

// A device buffer released on the stream when the scope ends (stream-ordered allocator).
struct DeviceBuffer {
  float* ptr = nullptr;
  cudaStream_t stream;
  DeviceBuffer(size_t n, cudaStream_t s) : stream(s) {
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&ptr), n * sizeof(float), s), "cudaMallocAsync");
  }
  ~DeviceBuffer() {
    if (ptr) cudaFreeAsync(ptr, stream);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// ---- projection: c[r] = res[r] + a[r] W^T + b --------------------------------------------------
enum class RowMap : int { Identity = 0, Window = 1 };

struct LinearParams {
  const float* a;        // rows of K floats (row stride lda)
  long lda;
  RowMap a_map;          // Window: row r is padded-window token r of `grid` (zeros if padding)
  const float* w;        // [N, K] (PyTorch layout)
  const float* bias;     // [N] or null
  float* c;              // rows of N floats (row stride ldc)
  long ldc;
  const float* res;      // like c, or null
  RowMap c_map;          // Window: row r goes to token window_token(r); padding rows dropped
  WindowGrid grid;
  int M, N, K;
};

constexpr int kTile = 64, kTK = 16;

__device__ __forceinline__ long map_row(RowMap m, const WindowGrid& g, long r) {
  return m == RowMap::Window ? window_token(g, r) : r;
}

// 64 x 64 output tile per block, 256 threads each computing a 4 x 4 micro-tile.
__global__ void __launch_bounds__(256) linear_kernel(const LinearParams p) {
  __shared__ float As[kTK][kTile + 4];
  __shared__ float Ws[kTK][kTile + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const long m0 = (long)blockIdx.y * kTile;
  const int n0 = blockIdx.x * kTile;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < p.K; k0 += kTK) {
    // Each thread loads 4 elements of each tile; k fastest across the warp for coalescing.
    for (int e = threadIdx.x; e < kTile * kTK; e += 256) {
      const int row = e / kTK, kk = e % kTK;
      const long r = m0 + row;
      const int k = k0 + kk;
      float av = 0.f;
      if (r < p.M && k < p.K) {
        const long src = map_row(p.a_map, p.grid, r);
        if (src >= 0) av = p.a[src * p.lda + k];
      }
      As[kk][row] = av;
      const int n = n0 + row;
      Ws[kk][row] = (n < p.N && k < p.K) ? p.w[(long)n * p.K + k] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Ws[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const long r = m0 + ty * 4 + i;
    if (r >= p.M) continue;
    const long dst = map_row(p.c_map, p.grid, r);
    if (dst < 0) continue;  // a padding token: cropped
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx * 4 + j;
      if (n >= p.N) continue;
      float v = acc[i][j];
      if (p.bias) v += p.bias[n];
      if (p.res) v += p.res[dst * p.ldc + n];
      p.c[dst * p.ldc + n] = v;
    }
  }
}

void launch_linear(const LinearParams& p, cudaStream_t s) {
  if (p.M <= 0) return;
  dim3 grid((p.N + kTile - 1) / kTile, (unsigned)((p.M + kTile - 1) / kTile));
  linear_kernel<<<grid, 256, 0, s>>>(p);
  check_launch("davit linear_kernel");
}

// ---- window attention core ---------------------------------------------------------------------
struct WindowCoreParams {
  const float* qkv;  // [windows * L, 3C], padded window order
  float* o;          // [windows * L, C]
  int C, d, L, heads;
  float scale;
};

// One block per (window, head): q, k, v (L x d, padded to d+1 against bank conflicts) and
// the L x L logits in shared memory; softmax in fp32, one warp per row.
__global__ void window_core_kernel(const WindowCoreParams p) {
  extern __shared__ float sm[];
  const int ld = p.d + 1, L = p.L;
  float* q = sm;
  float* k = q + L * ld;
  float* v = k + L * ld;
  float* s = v + L * ld;
  const long w = blockIdx.x;
  const int h = blockIdx.y;
  const float* base = p.qkv + w * L * 3L * p.C + h * p.d;
  for (int e = threadIdx.x; e < L * p.d; e += blockDim.x) {
    const int t = e / p.d, c = e % p.d;
    const float* row = base + (long)t * 3 * p.C + c;
    q[t * ld + c] = row[0];
    k[t * ld + c] = row[p.C];
    v[t * ld + c] = row[2 * p.C];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < L * L; e += blockDim.x) {
    const int i = e / L, j = e % L;
    float acc = 0.f;
    for (int c = 0; c < p.d; ++c) acc = fmaf(q[i * ld + c], k[j * ld + c], acc);
    s[e] = acc * p.scale;
  }
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int i = warp; i < L; i += warps) {
    float* row = s + i * L;
    float mx = -INFINITY;
    for (int j = lane; j < L; j += 32) mx = fmaxf(mx, row[j]);
    for (int off = 16; off; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.f;
    for (int j = lane; j < L; j += 32) {
      const float e = __expf(row[j] - mx);
      row[j] = e;
      sum += e;
    }
    for (int off = 16; off; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const float inv = 1.f / sum;
    for (int j = lane; j < L; j += 32) row[j] *= inv;
  }
  __syncthreads();
  float* out = p.o + w * L * (long)p.C + h * p.d;
  for (int e = threadIdx.x; e < L * p.d; e += blockDim.x) {
    const int i = e / p.d, c = e % p.d;
    float acc = 0.f;
    for (int j = 0; j < L; ++j) acc = fmaf(s[i * L + j], v[j * ld + c], acc);
    out[(long)i * p.C + c] = acc;
  }
}

// Dynamic shared memory above 48 KB needs an opt-in per kernel; refuse what the device lacks.
void reserve_smem(const void* kernel, size_t bytes, const char* what) {
  if (bytes <= 48 * 1024) return;
  int dev = 0, optin = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute");
  DT_CHECK(bytes <= (size_t)optin, std::string(what) + " needs " + std::to_string(bytes) +
                                       " bytes of shared memory, the device offers " + std::to_string(optin));
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
             "cudaFuncSetAttribute");
}

// ---- channel attention ------------------------------------------------------------------------
struct ChannelMapParams {
  const float* qkv;  // [B*N, 3C]
  float* partial;    // [splits][B*G][d][d]
  int B, N, C, G, d, splits;
};

// Partial S_g = sum_n k[n][g d + i] v[n][g d + j] over one token split; fixed order inside.
__global__ void channel_map_kernel(const ChannelMapParams p) {
  const int bg = blockIdx.x, split = blockIdx.y;
  const int b = bg / p.G, g = bg % p.G;
  const long n0 = (long)p.N * split / p.splits, n1 = (long)p.N * (split + 1) / p.splits;
  const float* base = p.qkv + (long)b * p.N * 3 * p.C + g * p.d;
  float* out = p.partial + ((long)split * p.B * p.G + bg) * p.d * p.d;
  for (int e = threadIdx.x; e < p.d * p.d; e += blockDim.x) {
    const int i = e / p.d, j = e % p.d;
    float acc = 0.f;
    for (long n = n0; n < n1; ++n) {
      const float* row = base + n * 3 * p.C;
      acc = fmaf(row[p.C + i], row[2 * p.C + j], acc);
    }
    out[e] = acc;
  }
}

// A[bg][i][:] = softmax(scale * sum_split partial[split][bg][i][:]); one block per (b, g).
__global__ void channel_softmax_kernel(const float* partial, float* amap, int BG, int d, int splits, float scale) {
  const int bg = blockIdx.x;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float* row = amap + ((long)bg * d + i) * d;
    float mx = -INFINITY;
    for (int j = 0; j < d; ++j) {
      float s = 0.f;
      for (int sp = 0; sp < splits; ++sp) s += partial[(((long)sp * BG + bg) * d + i) * d + j];
      row[j] = s * scale;
      mx = fmaxf(mx, row[j]);
    }
    float sum = 0.f;
    for (int j = 0; j < d; ++j) {
      row[j] = expf(row[j] - mx);
      sum += row[j];
    }
    for (int j = 0; j < d; ++j) row[j] /= sum;
  }
}

// o[n][g d + i] = sum_j A[b, g][i][j] q[n][g d + j]; one block per token, threads over C.
__global__ void channel_apply_kernel(const float* qkv, const float* amap, float* o, int N, int C, int G, int d) {
  const long n = blockIdx.x;
  const int b = (int)(n / N);
  const float* q = qkv + n * 3 * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const int g = c / d, i = c % d;
    const float* a = amap + (((long)b * G + g) * d + i) * d;
    const float* qg = q + g * d;
    float acc = 0.f;
    for (int j = 0; j < d; ++j) acc = fmaf(a[j], qg[j], acc);
    o[n * C + c] = acc;
  }
}

void check_common(const float* x, const float* out, const float* qkv_w, const float* proj_w, int C,
                  int heads, const char* op, const char* heads_name) {
  DT_CHECK(x && out && qkv_w && proj_w, std::string(op) + ": null device pointer");
  DT_CHECK(C > 0 && heads > 0 && C % heads == 0, std::string(op) + ": C=" + std::to_string(C) +
                                                     " is not divisible by " + heads_name + "=" +
                                                     std::to_string(heads));
}

}  // namespace

void window_attention(const WindowAttentionParams& p, cudaStream_t stream) {
  check_common(p.x, p.out, p.qkv_w, p.proj_w, p.C, p.heads, "window_attention", "num_heads");
  DT_CHECK(p.B > 0 && p.H > 0 && p.W > 0, "window_attention: empty input");
  DT_CHECK(p.ws >= 1 && p.ws <= 16, "window_attention: window_size must be in [1, 16]");
  const WindowGrid grid = make_window_grid(p.H, p.W, p.ws);
  const int L = p.ws * p.ws, d = p.C / p.heads;
  const long windows = (long)p.B * grid.nW, rows = windows * L;
  DT_CHECK(rows < (1L << 31) / 3, "window_attention: input too large for one launch");
  DeviceBuffer qkv((size_t)rows * 3 * p.C, stream), o((size_t)rows * p.C, stream);

  launch_linear({p.x, p.C, RowMap::Window, p.qkv_w, p.qkv_b, qkv.ptr, 3L * p.C, nullptr, RowMap::Identity,
                 grid, (int)rows, 3 * p.C, p.C}, stream);

  const size_t smem = sizeof(float) * ((size_t)3 * L * (d + 1) + (size_t)L * L);
  reserve_smem(reinterpret_cast<const void*>(window_core_kernel), smem, "window attention");
  DT_CHECK(windows < (1L << 31), "window_attention: too many windows");
  window_core_kernel<<<dim3((unsigned)windows, p.heads), 128, smem, stream>>>(
      {qkv.ptr, o.ptr, p.C, d, L, p.heads, 1.f / sqrtf((float)d)});
  check_launch("davit window_core_kernel");

  // proj rows in window order, scattered to their tokens; padding rows are dropped (crop).
  launch_linear({o.ptr, p.C, RowMap::Identity, p.proj_w, p.proj_b, p.out, p.C, p.res, RowMap::Window, grid,
                 (int)rows, p.C, p.C}, stream);
}

void channel_attention(const ChannelAttentionParams& p, cudaStream_t stream) {
  check_common(p.x, p.out, p.qkv_w, p.proj_w, p.C, p.groups, "channel_attention", "num_groups");
  DT_CHECK(p.B > 0 && p.N > 0, "channel_attention: empty input");
  const int d = p.C / p.groups, BG = p.B * p.groups;
  const long rows = (long)p.B * p.N;
  DT_CHECK(rows < (1L << 31) / 3, "channel_attention: input too large for one launch");
  // Token splits: enough blocks to fill the GPU, each summing a few hundred tokens.
  const int splits = (int)std::max(1L, std::min(64L, (long)p.N / 256));
  DeviceBuffer qkv((size_t)rows * 3 * p.C, stream), o((size_t)rows * p.C, stream);
  DeviceBuffer partial((size_t)splits * BG * d * d, stream), amap((size_t)BG * d * d, stream);
  const WindowGrid none{};

  launch_linear({p.x, p.C, RowMap::Identity, p.qkv_w, p.qkv_b, qkv.ptr, 3L * p.C, nullptr, RowMap::Identity,
                 none, (int)rows, 3 * p.C, p.C}, stream);
  channel_map_kernel<<<dim3(BG, splits), 256, 0, stream>>>({qkv.ptr, partial.ptr, p.B, p.N, p.C, p.groups, d, splits});
  check_launch("davit channel_map_kernel");
  channel_softmax_kernel<<<BG, 64, 0, stream>>>(partial.ptr, amap.ptr, BG, d, splits, 1.f / sqrtf((float)d));
  check_launch("davit channel_softmax_kernel");
  channel_apply_kernel<<<(unsigned)rows, 128, 0, stream>>>(qkv.ptr, amap.ptr, o.ptr, p.N, p.C, p.groups, d);
  check_launch("davit channel_apply_kernel");
  launch_linear({o.ptr, p.C, RowMap::Identity, p.proj_w, p.proj_b, p.out, p.C, p.res, RowMap::Identity, none,
                 (int)rows, p.C, p.C}, stream);
}

}  // namespace dovetail::cuda::davit
