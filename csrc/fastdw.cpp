// All fastdw operator schemas live here so the public contract can be reviewed in one place.
// Implementations register per dispatch key in their own files (dwconv_bn_act_cpu.cpp, *.cu);
// fake kernels and autograd are registered in Python (fastdw/ops.py).
//
// The .so is also a tiny pybind11 module (fastdw._C) that carries what is not an op:
// build_info().
#include <Python.h>
#include <torch/library.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "build_info.h"

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
}

namespace py = pybind11;

static py::dict build_info() {
  py::dict d;
  d["version"] = FASTDW_VERSION_STR;
#ifdef FASTDW_WITH_CUDA
  d["with_cuda"] = true;
  d["cuda_version"] = fastdw::cuda_compiled_version();
  d["cuda_archs"] = py::cast(fastdw::split_archs(FASTDW_CUDA_ARCHS_STR));
#else
  d["with_cuda"] = false;
  d["cuda_version"] = py::none();
  d["cuda_archs"] = py::list();
#endif
  d["torch_version"] = FASTDW_TORCH_VERSION_STR;
  py::list backends;
  backends.append("cpu");
#ifdef FASTDW_WITH_CUDA
  backends.append("cuda");
#endif
  d["backends"] = backends;
  return d;
}

static py::object cuda_binary_version(int device) {
#ifdef FASTDW_WITH_CUDA
  return py::int_(fastdw::cuda_binary_version(device));
#else
  (void)device;
  return py::none();
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdw compiled extension: ops register through TORCH_LIBRARY(fastdw)";
  m.def("build_info", &build_info,
        "Build facts: version, with_cuda, cuda_version, cuda_archs (compiled SASS/PTX targets), "
        "torch_version, backends compiled in.");
  m.def("cuda_binary_version", &cuda_binary_version, py::arg("device"),
        "SM version (e.g. 90) of the kernel image the CUDA driver picks for `device`; "
        "-1 when the binary holds no image that runs there; None without CUDA.");
}
