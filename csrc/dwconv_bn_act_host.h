// Host-side argument checks and output-layout rule for fastdw::dwconv_bn_act, shared by every
// backend's host entry (CPU now, CUDA later). Messages name the constraint in the user's terms;
// fastdw/_utils.py raises the same messages for the fake kernel and the Python wrapper.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string>

#include "params.h"

namespace fastdw {

inline Act parse_act(const std::string& act) {
  if (act == "none") return Act::None;
  if (act == "relu") return Act::Relu;
  if (act == "relu6") return Act::Relu6;
  if (act == "hardswish") return Act::Hardswish;
  if (act == "silu") return Act::Silu;
  TORCH_CHECK_VALUE(false, "fastdw: act must be one of 'none', 'relu', 'relu6', 'hardswish', "
                    "'silu'; got '", act, "'");
  return Act::None;
}

// The layout rule (written once in C++, mirrored by fastdw._utils.output_memory_format):
// the output is channels_last when x is channels_last-contiguous and not also contiguous
// (C == 1 or H == W == 1 make both true: then contiguous wins), else contiguous.
inline bool use_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

inline void check_vector_param(const c10::optional<at::Tensor>& t, const char* name,
                               const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return;
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, "fastdw: ", name,
                    " must be a 1-D tensor of C = ", C, " elements (one per channel); got shape ",
                    t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == x.scalar_type(),
                   "fastdw: ", name, " must be float32 or x's dtype (", x.scalar_type(),
                   "); got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == x.device(), "fastdw: ", name,
                    " must be on the same device as x (", x.device(), "); got ", t->device());
}

inline void check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK_VALUE(v.size() == 2, "fastdw: ", name, " must have 2 elements (h, w); got ", v);
  TORCH_CHECK_VALUE(v[0] >= min_value && v[1] >= min_value, "fastdw: ", name, " must be >= ",
                    min_value, "; got ", v);
}

// padding: (h, w), symmetric, or (top, left, bottom, right) (TF's "same" pads the extra row and
// column at the bottom / right).
inline void check_padding(at::IntArrayRef v) {
  TORCH_CHECK_VALUE(v.size() == 2 || v.size() == 4,
                    "fastdw: padding must have 2 elements (h, w) or 4 (top, left, bottom, right); got ", v);
  for (const int64_t e : v) TORCH_CHECK_VALUE(e >= 0, "fastdw: padding must be >= 0; got ", v);
}

// Validates a call and fills the size/stride/act fields of `p` (pointers are left to the
// caller). `allow_double` is true on the CPU (fp64 exists there for gradcheck).
inline void check_and_fill(DwConvParams& p, const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& scale,
                           const c10::optional<at::Tensor>& shift, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation,
                           const std::string& act, bool allow_double) {
  p.act = parse_act(act);
  TORCH_CHECK_VALUE(x.dim() == 4, "fastdw: x must be a 4-D (N, C, H, W) tensor; got ", x.dim(),
                    "-D with shape ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16 ||
                       (allow_double && xt == at::kDouble),
                   "fastdw: x must be float32, float16 or bfloat16 (or float64 on the CPU); got ", xt);
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4, "fastdw: weight must be (C, 1, kH, kW); got a ",
                    weight.dim(), "-D tensor of shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == 1,
                    "fastdw: weight must be (C, 1, kH, kW) (depthwise: one input channel per "
                    "group); got shape ", weight.sizes());
  const bool is_multiplier = C > 0 && weight.size(0) > C && weight.size(0) % C == 0;
  TORCH_CHECK_VALUE(!is_multiplier,
                    "fastdw: channel multiplier must be 1 (out_channels == in_channels == groups); "
                    "got weight with ", weight.size(0), " output channels for C = ", C, " (multiplier ",
                    is_multiplier ? weight.size(0) / C : 1, ")");
  TORCH_CHECK_VALUE(weight.size(0) == C, "fastdw: weight must be (C, 1, kH, kW) with C == x.size(1) = ",
                    C, "; got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(2) >= 1 && weight.size(3) >= 1,
                    "fastdw: kernel size must be >= 1; got weight shape ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == xt || weight.scalar_type() == at::kFloat,
                   "fastdw: weight must be float32 or x's dtype (", xt, "); got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "fastdw: weight must be on the same device as x (",
                    x.device(), "); got ", weight.device());
  check_vector_param(scale, "scale", x);
  check_vector_param(shift, "shift", x);
  check_pair(stride, "stride", 1);
  check_padding(padding);
  check_pair(dilation, "dilation", 1);

  p.N = x.size(0);
  p.C = C;
  p.H = x.size(2);
  p.W = x.size(3);
  p.KH = weight.size(2);
  p.KW = weight.size(3);
  p.stride_h = stride[0];
  p.stride_w = stride[1];
  p.pad_h = padding[0];
  p.pad_w = padding[1];
  p.pad_b = padding.size() == 4 ? padding[2] : padding[0];
  p.pad_r = padding.size() == 4 ? padding[3] : padding[1];
  p.dil_h = dilation[0];
  p.dil_w = dilation[1];
  const int64_t ekh = p.dil_h * (p.KH - 1) + 1, ekw = p.dil_w * (p.KW - 1) + 1;
  const int64_t hp = p.H + p.pad_h + p.pad_b, wp = p.W + p.pad_w + p.pad_r;
  TORCH_CHECK_VALUE(ekh <= hp && ekw <= wp,
                    "fastdw: kernel larger than the padded input: effective kernel (dilation*(k-1)+1) "
                    "is ", ekh, "x", ekw, " but the padded input (H + top + bottom padding, W + left + "
                    "right padding) is ", hp, "x", wp);
  p.OH = (hp - ekh) / p.stride_h + 1;
  p.OW = (wp - ekw) / p.stride_w + 1;
  p.channels_last = use_channels_last(x);
}

// grad_out of the backward: the output's shape, x's dtype and device (any strides).
inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& x, const DwConvParams& p) {
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == p.N && grad_out.size(1) == p.C &&
                        grad_out.size(2) == p.OH && grad_out.size(3) == p.OW,
                    "fastdw: grad_out must have the output's shape [", p.N, ", ", p.C, ", ", p.OH, ", ", p.OW,
                    "]; got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "fastdw: grad_out must have x's dtype (",
                   x.scalar_type(), "); got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), "fastdw: grad_out must be on the same device as x (",
                    x.device(), "); got ", grad_out.device());
}

// The training op (fastdw::dwconv_bn_act_train): the conv checks of check_and_fill, plus the
// per-channel tensors of BatchNorm (conv bias, gamma, beta: (C,), fp32 or x's dtype) and eps.
inline void check_train_and_fill(DwConvParams& p, const at::Tensor& x, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& gamma,
                                 const c10::optional<at::Tensor>& beta, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, double eps,
                                 const std::string& act, bool allow_double) {
  check_and_fill(p, x, weight, c10::nullopt, c10::nullopt, stride, padding, dilation, act, allow_double);
  check_vector_param(bias, "bias", x);
  check_vector_param(gamma, "gamma", x);
  check_vector_param(beta, "beta", x);
  TORCH_CHECK_VALUE(eps >= 0, "fastdw: eps must be >= 0; got ", eps);
}

// The batch statistics handed to the training backward (what the forward returned, the mean
// without the conv bias) and the gradients of the forward's mean / var outputs: (C,) each.
inline void check_train_stats(const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& grad_mean,
                              const c10::optional<at::Tensor>& grad_var, const at::Tensor& x) {
  check_vector_param(mean, "mean", x);
  check_vector_param(var, "var", x);
  check_vector_param(grad_mean, "grad_mean", x);
  check_vector_param(grad_var, "grad_var", x);
}

}  // namespace fastdw
