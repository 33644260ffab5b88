// DaViT attention on the GPU (fp32, device pointers, contiguous channels-last tensors).
// Same ops and argument order as cpu/davit.h; weights stay in PyTorch layout ([out, in]),
// and the launch goes on `stream`. Bad arguments throw dovetail::ValueError; CUDA API or
// launch failures throw std::runtime_error naming the call.
#pragma once
#include <cuda_runtime.h>

namespace dovetail::cuda::davit {

struct WindowAttentionParams {
  const float* x = nullptr;    // [B, H, W, C], normalised
  float* out = nullptr;        // [B, H, W, C]
  const float* res = nullptr;  // optional residual added to out (may alias out)
  const float* qkv_w = nullptr;   // [3C, C]
  const float* qkv_b = nullptr;   // [3C] or null
  const float* proj_w = nullptr;  // [C, C]
  const float* proj_b = nullptr;  // [C] or null
  int B = 0, H = 0, W = 0, C = 0, heads = 0, ws = 7;
};
void window_attention(const WindowAttentionParams& p, cudaStream_t stream);

struct ChannelAttentionParams {
  const float* x = nullptr;    // [B, N, C], normalised
  float* out = nullptr;        // [B, N, C]
  const float* res = nullptr;
  const float* qkv_w = nullptr;
  const float* qkv_b = nullptr;
  const float* proj_w = nullptr;
  const float* proj_b = nullptr;
  int B = 0, N = 0, C = 0, groups = 0;
};
void channel_attention(const ChannelAttentionParams& p, cudaStream_t stream);

}  // namespace dovetail::cuda::davit
