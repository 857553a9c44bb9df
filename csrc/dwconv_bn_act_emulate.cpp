// CPU emulation of the GPU kernels: fastdw::_dwconv_bn_act_gpu_emulated and its backward run the
// exact per-thread bodies of dwconv_bn_act_kernels.h, planned by dwconv_bn_act_gpu_host.h, in a
// loop over every thread index. The bodies write disjoint outputs (no shared memory, barriers or
// atomics), so looping over them in any order reproduces the GPU result; tests compare it with
// the reference on every machine, GPU or not. Debug ops: slow, not for users.
#include <ATen/Parallel.h>
#include <c10/util/Type.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "dwconv_bn_act_bwd_gpu_host.h"

namespace fastdw {
namespace {

struct CpuExec {
  template <class Tag, class ArgT>
  void operator()(Tag, const ArgT& a, int64_t n) const {
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) Tag::body(a, i);
    });
  }
};

// Runs nothing: records the name of each kernel a schedule launches ("PackParams", "FwdWin", ...).
struct ListExec {
  std::vector<std::string>* names;
  template <class Tag, class ArgT>
  void operator()(Tag, const ArgT&, int64_t) const {
    std::string n = c10::demangle_type<Tag>();
    n = n.substr(0, n.find('<'));
    const size_t colon = n.rfind("::");
    names->push_back(colon == std::string::npos ? n : n.substr(colon + 2));
  }
};

at::Tensor emulated_fwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                        const c10::optional<at::Tensor>& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, c10::string_view act) {
  GpuFwdPlan g = plan_fwd(x, weight, scale, shift, stride, padding, dilation, std::string(act));
  schedule_fwd(g, CpuExec{});
  return g.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulated_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, c10::string_view act, std::array<bool, 4> output_mask, bool deterministic) {
  (void)deterministic;  // the GPU reductions are deterministic by construction
  GpuBwdPlan g = plan_bwd(grad_out, x, weight, scale, shift, stride, padding, dilation, std::string(act), output_mask);
  schedule_bwd(g, CpuExec{});
  return bwd_outputs(g, scale, shift);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulated_train_fwd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, c10::string_view act) {
  return run_train_fwd(x, weight, bias, gamma, beta, stride, padding, dilation, eps, std::string(act), CpuExec{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulated_train_bwd(
    const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_mean, const c10::optional<at::Tensor>& grad_var,
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, c10::string_view act,
    std::array<bool, 4> output_mask, bool deterministic) {
  (void)deterministic;
  return run_train_bwd(grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var, stride, padding, dilation, eps,
                       std::string(act), output_mask, CpuExec{});
}

std::vector<std::string> emulated_fwd_launches(const at::Tensor& x, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& scale,
                                               const c10::optional<at::Tensor>& shift, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view act) {
  GpuFwdPlan g = plan_fwd(x, weight, scale, shift, stride, padding, dilation, std::string(act));
  std::vector<std::string> names;
  schedule_fwd(g, ListExec{&names});
  return names;
}

// The kernels the GPU backward launches for these arguments, in order.
std::vector<std::string> emulated_bwd_launches(const at::Tensor& grad_out, const at::Tensor& x,
                                               const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                                               const c10::optional<at::Tensor>& shift, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view act,
                                               std::array<bool, 4> output_mask) {
  GpuBwdPlan g = plan_bwd(grad_out, x, weight, scale, shift, stride, padding, dilation, std::string(act), output_mask);
  std::vector<std::string> names;
  schedule_bwd(g, ListExec{&names});
  return names;
}

// The kernels the GPU training op launches (forward, backward), in order. The host code reads
// nothing back between launches, so it runs as it would with the kernels left out.
std::vector<std::string> emulated_train_fwd_launches(const at::Tensor& x, const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias,
                                                     const c10::optional<at::Tensor>& gamma,
                                                     const c10::optional<at::Tensor>& beta, at::IntArrayRef stride,
                                                     at::IntArrayRef padding, at::IntArrayRef dilation, double eps,
                                                     c10::string_view act) {
  std::vector<std::string> names;
  run_train_fwd(x, weight, bias, gamma, beta, stride, padding, dilation, eps, std::string(act), ListExec{&names});
  return names;
}

std::vector<std::string> emulated_train_bwd_launches(
    const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_mean, const c10::optional<at::Tensor>& grad_var,
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, c10::string_view act,
    std::array<bool, 4> output_mask) {
  std::vector<std::string> names;
  run_train_bwd(grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var, stride, padding, dilation, eps,
                std::string(act), output_mask, ListExec{&names});
  return names;
}

inline bool p_is_cl(const GpuFwdPlan& g) { return g.args.p.channels_last; }

// "" without dilation, "d2" for dilation (2, 2), "d2x4" for (2, 4)
inline std::string dil_suffix(const DwConvParams& p) {
  if (p.dil_h == 1 && p.dil_w == 1) return "";
  return "d" + std::to_string(p.dil_h) + (p.dil_w != p.dil_h ? "x" + std::to_string(p.dil_w) : "");
}

// Which forward path the GPU launcher takes for these arguments (for tests of the dispatch).
std::string emulated_fwd_path(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  GpuFwdPlan g = plan_fwd(x, weight, c10::nullopt, c10::nullopt, stride, padding, dilation, "none");
  const char* tile = g.choice.tile == kern::WinTile::Strip ? "strip" : "single";
  switch (g.choice.path) {
    case kern::FwdPath::Win3S1: return std::string("nhwc_win3s1_") + tile;
    case kern::FwdPath::Win3S2: return std::string("nhwc_win3s2_") + tile;
    case kern::FwdPath::Nchw3S1: return "nchw_win3s1";
    case kern::FwdPath::Nchw3S2: return "nchw_win3s2";
    case kern::FwdPath::ScalarWin:
      return std::string(p_is_cl(g) ? "nhwc" : "nchw") + "_scalar_win" + std::to_string(g.args.p.KH) + "s" +
             std::to_string(g.args.p.stride_h) +
             dil_suffix(g.args.p);
    case kern::FwdPath::NhwcVec3: return "nhwc_vec3";
    case kern::FwdPath::NhwcVec5: return "nhwc_vec5";
    case kern::FwdPath::NhwcVec7: return "nhwc_vec7";
    default: return "general";
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdw, CPU, m) {
  m.impl("_dwconv_bn_act_gpu_emulated", &emulated_fwd);
  m.impl("_dwconv_bn_act_backward_gpu_emulated", &emulated_bwd);
  m.impl("_dwconv_bn_act_gpu_path", &emulated_fwd_path);
  m.impl("_dwconv_bn_act_gpu_launches", &emulated_fwd_launches);
  m.impl("_dwconv_bn_act_backward_gpu_launches", &emulated_bwd_launches);
  m.impl("_dwconv_bn_act_train_gpu_emulated", &emulated_train_fwd);
  m.impl("_dwconv_bn_act_train_backward_gpu_emulated", &emulated_train_bwd);
  m.impl("_dwconv_bn_act_train_gpu_launches", &emulated_train_fwd_launches);
  m.impl("_dwconv_bn_act_train_backward_gpu_launches", &emulated_train_bwd_launches);
}

}  // namespace fastdw
