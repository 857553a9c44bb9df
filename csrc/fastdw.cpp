// All fastdw operator schemas live here so the public contract can be reviewed in one place.
// Implementations register per dispatch key in their own files (dwconv_bn_act_cpu.cpp, *.cu);
// fake kernels and autograd are registered in Python (fastdw/ops.py). No Python here: the same
// file serves the Python extension and the libtorch library built by CMake.
#include <torch/library.h>

TORCH_LIBRARY(fastdw, m) {
  // y = act(conv2d(x, weight, groups=C) * scale[c] + shift[c]); see DESIGN.md for the contract.
  // padding: (h, w) on both sides, or (top, left, bottom, right) (asymmetric, as TF "same").
  m.def(
      "dwconv_bn_act(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int[2] stride, "
      "int[] padding, int[2] dilation, str act) -> Tensor");
  // Returns (grad_x, grad_weight, grad_scale, grad_shift). An output whose output_mask entry is
  // false (or whose input was None) is returned as an empty tensor of shape (0,): the arity is
  // fixed so that fake kernels and torch.compile see one signature.
  m.def(
      "_dwconv_bn_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? scale, "
      "Tensor? shift, int[2] stride, int[] padding, int[2] dilation, str act, "
      "bool[4] output_mask, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");

  // Training mode (batch-statistics BatchNorm): z = conv2d(x, weight, groups=C);
  // y = act((z - mean) * rsqrt(var + eps) * gamma + beta) with the batch mean and biased variance
  // of z per channel over (N, OH, OW). Returns (y, mean + bias, var); mean and var are fp32 (C,)
  // (fp64 for fp64 x). The conv bias only shifts the returned mean (BatchNorm cancels it in y).
  m.def(
      "dwconv_bn_act_train(Tensor x, Tensor weight, Tensor? bias, Tensor? gamma, Tensor? beta, int[2] stride, "
      "int[] padding, int[2] dilation, float eps, str act) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_gamma, grad_beta) under the output_mask rule of
  // _dwconv_bn_act_backward. mean is the batch mean of conv(x) without the bias; grad_mean and
  // grad_var are the gradients of the forward's mean and var outputs (None: zero). The gradient
  // of the conv bias is grad_mean (y does not depend on it).
  m.def(
      "_dwconv_bn_act_train_backward(Tensor grad_y, Tensor? grad_mean, Tensor? grad_var, Tensor x, Tensor weight, "
      "Tensor? gamma, Tensor? beta, Tensor mean, Tensor var, int[2] stride, int[] padding, int[2] dilation, "
      "float eps, str act, bool[4] output_mask, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");

  // Debug ops, CPU only: the GPU kernels' per-thread bodies run on the host
  // (dwconv_bn_act_emulate.cpp), so their indexing is tested on machines without a GPU.
  m.def(
      "_dwconv_bn_act_gpu_emulated(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int[2] stride, "
      "int[] padding, int[2] dilation, str act) -> Tensor");
  m.def(
      "_dwconv_bn_act_backward_gpu_emulated(Tensor grad_out, Tensor x, Tensor weight, Tensor? scale, "
      "Tensor? shift, int[2] stride, int[] padding, int[2] dilation, str act, "
      "bool[4] output_mask, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_dwconv_bn_act_train_gpu_emulated(Tensor x, Tensor weight, Tensor? bias, Tensor? gamma, Tensor? beta, "
      "int[2] stride, int[] padding, int[2] dilation, float eps, str act) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_dwconv_bn_act_train_backward_gpu_emulated(Tensor grad_y, Tensor? grad_mean, Tensor? grad_var, Tensor x, "
      "Tensor weight, Tensor? gamma, Tensor? beta, Tensor mean, Tensor var, int[2] stride, int[] padding, "
      "int[2] dilation, float eps, str act, bool[4] output_mask, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_dwconv_bn_act_gpu_path(Tensor x, Tensor weight, int[2] stride, int[] padding, int[2] dilation) -> str");
  // The kernels the GPU forward launches for these arguments, in order (the pack launch absent
  // when weight / scale / shift are prepacked; tests of the launches per call).
  m.def(
      "_dwconv_bn_act_gpu_launches(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int[2] stride, "
      "int[] padding, int[2] dilation, str act) -> str[]");
  // The same for the GPU backward (the fused path or the general one).
  m.def(
      "_dwconv_bn_act_backward_gpu_launches(Tensor grad_out, Tensor x, Tensor weight, Tensor? scale, "
      "Tensor? shift, int[2] stride, int[] padding, int[2] dilation, str act, bool[4] output_mask) -> str[]");
  // The same for the training op's forward and backward (its whole call: no host tensor ops).
  m.def(
      "_dwconv_bn_act_train_gpu_launches(Tensor x, Tensor weight, Tensor? bias, Tensor? gamma, Tensor? beta, "
      "int[2] stride, int[] padding, int[2] dilation, float eps, str act) -> str[]");
  m.def(
      "_dwconv_bn_act_train_backward_gpu_launches(Tensor grad_y, Tensor? grad_mean, Tensor? grad_var, Tensor x, "
      "Tensor weight, Tensor? gamma, Tensor? beta, Tensor mean, Tensor var, int[2] stride, int[] padding, "
      "int[2] dilation, float eps, str act, bool[4] output_mask) -> str[]");
}
