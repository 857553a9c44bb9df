// CUDA implementation of fastdw::_dwconv_bn_act_backward: 3x3 stride 1 / 2 in one fused kernel
// (pre-activation recomputed per tile, dx and per-tile sums) and a two-stage finish; other shapes
// by gu, dx by gather and chunked sums. Deterministic whatever the deterministic flag says (fixed
// orders, no atomics). Bodies in dwconv_bn_act_bwd_kernels.h, plan in dwconv_bn_act_bwd_gpu_host.h.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_exec.cuh"
#include "dwconv_bn_act_bwd_gpu_host.h"

namespace fastdw {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, c10::string_view act, std::array<bool, 4> output_mask, bool deterministic) {
  (void)deterministic;
  TORCH_INTERNAL_ASSERT(x.is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  GpuBwdPlan g = plan_bwd(grad_out, x, weight, scale, shift, stride, padding, dilation, std::string(act), output_mask);
  schedule_bwd(g, CudaExec{c10::cuda::getCurrentCUDAStream().stream()});
  return bwd_outputs(g, scale, shift);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdw, CUDA, m) { m.impl("_dwconv_bn_act_backward", &dwconv_bn_act_backward_cuda); }

}  // namespace fastdw
