// CUDA implementation of fastdw::_dwconv_bn_act_train_backward: the gu reductions (pass A), then
// the fused backward with the batch-statistics terms folded into its q (3x3 stride 1 / 2; other
// shapes: dz into a workspace, then the inference backward's dx and dweight kernels).
// Deterministic: fixed orders, no atomics. Bodies in dwconv_bn_act_bwd_kernels.h, plan in
// dwconv_bn_act_bwd_gpu_host.h.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_exec.cuh"
#include "dwconv_bn_act_bwd_gpu_host.h"

namespace fastdw {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_train_backward_cuda(
    const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_mean, const c10::optional<at::Tensor>& grad_var,
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, c10::string_view act,
    std::array<bool, 4> output_mask, bool deterministic) {
  (void)deterministic;
  TORCH_INTERNAL_ASSERT(x.is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  return run_train_bwd(grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var, stride, padding, dilation, eps,
                       std::string(act), output_mask, CudaExec{c10::cuda::getCurrentCUDAStream().stream()});
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdw, CUDA, m) { m.impl("_dwconv_bn_act_train_backward", &dwconv_bn_act_train_backward_cuda); }

}  // namespace fastdw
