// One __global__ template launches any kernel tag of dwconv_bn_act_kernels.h: thread i runs
// Tag::body(args, i). 256 threads per block: 8 warps keep enough loads in flight per SM for these
// memory-bound bodies at a register budget (<= 255/thread) that never spills; the grid is
// ceil(n / 256) blocks of a 1-D index, so every launch covers its whole problem.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastdw {

constexpr int kThreads = 256;

template <class Tag, class ArgT>
__global__ void __launch_bounds__(kThreads) body_kernel(const ArgT args, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) Tag::body(args, i);
}

struct CudaExec {
  cudaStream_t stream;
  template <class Tag, class ArgT>
  void operator()(Tag, const ArgT& args, int64_t n) const {
    if (n <= 0) return;
    const int64_t blocks = (n + kThreads - 1) / kThreads;
    body_kernel<Tag, ArgT><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace fastdw
