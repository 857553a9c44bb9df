// CUDA implementation of fastdw::dwconv_bn_act (forward). The per-thread bodies and the math are
// in dwconv_bn_act_kernels.h; the plan (checks, layout rule, path choice) in
// dwconv_bn_act_gpu_host.h, shared with the CPU emulation that tests these bodies without a GPU.
// Launches run on the current stream under a device guard.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_exec.cuh"
#include "dwconv_bn_act_gpu_host.h"

namespace fastdw {
namespace {

at::Tensor dwconv_bn_act_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                              const c10::optional<at::Tensor>& shift, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view act) {
  TORCH_INTERNAL_ASSERT(x.is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  GpuFwdPlan g = plan_fwd(x, weight, scale, shift, stride, padding, dilation, std::string(act));
  schedule_fwd(g, CudaExec{c10::cuda::getCurrentCUDAStream().stream()});
  return g.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdw, CUDA, m) { m.impl("dwconv_bn_act", &dwconv_bn_act_cuda); }

}  // namespace fastdw
