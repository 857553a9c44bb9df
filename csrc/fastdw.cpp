// All fastdw operator schemas live here so the public contract can be reviewed in one place.
// Implementations register per dispatch key in their own files (dwconv_bn_act_cpu.cpp, *.cu);
// fake kernels and autograd are registered in Python (fastdw/ops.py). No Python here: the same
// file serves the Python extension and the libtorch library built by CMake.
#include <torch/library.h>

TORCH_LIBRARY(fastdw, m) {
  // y = act(conv2d(x, weight, groups=C) * scale[c] + shift[c]); see DESIGN.md for the contract.
  m.def(
      "dwconv_bn_act(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int[2] stride, "
      "int[2] padding, int[2] dilation, str act) -> Tensor");
  // Returns (grad_x, grad_weight, grad_scale, grad_shift). An output whose output_mask entry is
  // false (or whose input was None) is returned as an empty tensor of shape (0,): the arity is
  // fixed so that fake kernels and torch.compile see one signature.
  m.def(
      "_dwconv_bn_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? scale, "
      "Tensor? shift, int[2] stride, int[2] padding, int[2] dilation, str act, "
      "bool[4] output_mask, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");

  // Debug ops, CPU only: the GPU kernels' per-thread bodies run on the host
  // (dwconv_bn_act_emulate.cpp), so their indexing is tested on machines without a GPU.
  m.def(
      "_dwconv_bn_act_gpu_emulated(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int[2] stride, "
      "int[2] padding, int[2] dilation, str act) -> Tensor");
  m.def(
      "_dwconv_bn_act_backward_gpu_emulated(Tensor grad_out, Tensor x, Tensor weight, Tensor? scale, "
      "Tensor? shift, int[2] stride, int[2] padding, int[2] dilation, str act, "
      "bool[4] output_mask, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_dwconv_bn_act_gpu_path(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation) -> str");
}
