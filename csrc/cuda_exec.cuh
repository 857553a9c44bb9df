// One __global__ template launches any kernel tag of dwconv_bn_act_kernels.h: thread i runs
// Tag::body(args, i). 256 threads per block by default: 8 warps keep enough loads in flight per
// SM for these memory-bound bodies at a register budget (<= 255/thread) that never spills. A tag
// with a large per-thread register window declares its own Tag::kThreads (fewer threads per
// block, so more blocks fit the register file and small problems spread over more SMs). The grid
// is ceil(n / threads) blocks of a 1-D index, so every launch covers its whole problem.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace fastdw {

constexpr int kThreads = 256;

template <class Tag, class = void>
struct TagThreads : std::integral_constant<int, kThreads> {};
template <class Tag>
struct TagThreads<Tag, std::void_t<decltype(Tag::kThreads)>> : std::integral_constant<int, Tag::kThreads> {};

template <class Tag, class ArgT>
__global__ void __launch_bounds__(TagThreads<Tag>::value) body_kernel(const ArgT args, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * TagThreads<Tag>::value + threadIdx.x;
  if (i < n) Tag::body(args, i);
}

struct CudaExec {
  cudaStream_t stream;
  template <class Tag, class ArgT>
  void operator()(Tag, const ArgT& args, int64_t n) const {
    if (n <= 0) return;
    constexpr int threads = TagThreads<Tag>::value;
    const int64_t blocks = (n + threads - 1) / threads;
    body_kernel<Tag, ArgT><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(args, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace fastdw
