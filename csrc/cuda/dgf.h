// Launchers for the fused DGF gate kernels (device pointers, fp32, contiguous [rows, D]).
#pragma once
#include <cuda_runtime.h>

namespace dovetail::cuda {

void dgf_silu(const float* a, float* h2, long n, cudaStream_t stream);
void dgf_mix(const float* h1, const float* h2, const float* zpre, float* g, long n,
             cudaStream_t stream);

}  // namespace dovetail::cuda
