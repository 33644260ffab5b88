// DT_HD marks small functions shared by host and device code: compiled for both by nvcc,
// plain inline functions in the CPU build (so the CPU tests cover what the GPU runs).
#pragma once

#if defined(__CUDACC__)
#define DT_HD __host__ __device__ __forceinline__
#else
#define DT_HD inline
#endif
