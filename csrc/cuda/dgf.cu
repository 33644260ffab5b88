// Fused DGF gate on the GPU: g = sigmoid(zpre) * h1 + (1 - sigmoid(zpre)) * SiLU(a),
// one pass over [rows, D] after the three GEMMs (h1 = f W1, a = e W2, zpre = [h1;h2] Wz).
#include <cuda_runtime.h>

#include "common/error.h"
#include "cuda/dgf.h"
#include "common/dgf_math.h"

namespace dovetail::cuda {

namespace {

__global__ void silu_kernel(const float* __restrict__ a, float* __restrict__ h2, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) h2[i] = ::dovetail::dgf_silu(a[i]);
}

__global__ void dgf_mix_kernel(const float* __restrict__ h1, const float* __restrict__ h2,
                               const float* __restrict__ zpre, float* __restrict__ g, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) g[i] = ::dovetail::dgf_mix(h1[i], h2[i], zpre[i]);
}

void check_launch(const char* what) {
  cudaError_t st = cudaGetLastError();
  DT_CHECK(st == cudaSuccess, std::string(what) + " launch failed: " + cudaGetErrorString(st));
}

}  // namespace

void dgf_silu(const float* a, float* h2, long n, cudaStream_t stream) {
  if (n <= 0) return;
  const int threads = 256;
  silu_kernel<<<(unsigned)((n + threads - 1) / threads), threads, 0, stream>>>(a, h2, n);
  check_launch("dgf_silu");
}

void dgf_mix(const float* h1, const float* h2, const float* zpre, float* g, long n,
             cudaStream_t stream) {
  if (n <= 0) return;
  const int threads = 256;
  dgf_mix_kernel<<<(unsigned)((n + threads - 1) / threads), threads, 0, stream>>>(h1, h2, zpre, g, n);
  check_launch("dgf_mix");
}

}  // namespace dovetail::cuda
