#include <cuda_runtime.h>

#include "common/error.h"
#include "cuda/runtime.h"

namespace dovetail::cuda {

bool compiled() { return true; }

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" status
    return 0;
  }
  return n;
}

std::string device_name(int index) {
  DT_CHECK(index >= 0 && index < device_count(), "no CUDA device with index " + std::to_string(index));
  cudaDeviceProp prop{};
  cudaError_t st = cudaGetDeviceProperties(&prop, index);
  DT_CHECK(st == cudaSuccess, std::string("cudaGetDeviceProperties failed: ") + cudaGetErrorString(st));
  return prop.name;
}

}  // namespace dovetail::cuda
