// CUDA implementation of fastdw::dwconv_bn_act_train (forward, batch-statistics BatchNorm): the
// statistics kernel, the per-channel merge and the inference forward kernels, all on the current
// stream under a device guard. Bodies in dwconv_bn_act_train_kernels.h, plan in
// dwconv_bn_act_train_gpu_host.h (shared with the CPU emulation).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_exec.cuh"
#include "dwconv_bn_act_train_gpu_host.h"

namespace fastdw {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_train_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, c10::string_view act) {
  TORCH_INTERNAL_ASSERT(x.is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  return run_train_fwd(x, weight, bias, gamma, beta, stride, padding, dilation, eps, std::string(act),
                       CudaExec{c10::cuda::getCurrentCUDAStream().stream()});
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdw, CUDA, m) { m.impl("dwconv_bn_act_train", &dwconv_bn_act_train_cuda); }

}  // namespace fastdw
