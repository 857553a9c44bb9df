// Plain-old-data description of one dwconv_bn_act call, shared by the CPU and GPU kernels.
// Sizes and strides are in elements; pointers are untyped so this header needs no torch.
#pragma once
#include <cstdint>

namespace fastdw {

// Epilogue activation applied to u = conv(x, w) * scale + shift.
enum class Act : int { None = 0, Relu = 1, Relu6 = 2, Hardswish = 3, Silu = 4 };

struct DwConvParams {
  int64_t N, C, H, W;     // input
  int64_t OH, OW;         // output
  int64_t KH, KW;         // kernel
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;  // pad_h / pad_w: top / left
  int64_t pad_b, pad_r;   // bottom / right padding (== pad_h / pad_w unless asymmetric)
  bool channels_last;     // x, y (and grad tensors) are NHWC-dense when true, NCHW-dense when false
  Act act;
  const void* x_ptr;      // (N, C, H, W) in the layout above
  const void* weight_ptr; // (C, 1, KH, KW), contiguous
  const void* scale_ptr;  // (C,) or nullptr (== 1)
  const void* shift_ptr;  // (C,) or nullptr (== 0)
  void* out_ptr;          // (N, C, OH, OW) in the layout above
};

struct DwConvBwdParams : DwConvParams {
  const void* grad_out_ptr;  // (N, C, OH, OW), same layout as out
  void* grad_x_ptr;          // (N, C, H, W) or nullptr when not requested
  void* grad_weight_ptr;     // (C, 1, KH, KW) or nullptr
  void* grad_scale_ptr;      // (C,) or nullptr
  void* grad_shift_ptr;      // (C,) or nullptr
  bool deterministic;
};

}  // namespace fastdw
