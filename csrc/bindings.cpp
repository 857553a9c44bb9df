// The pybind11 side of fastdw._C: what is not an op (build facts). Ops never go through pybind:
// they register with TORCH_LIBRARY (fastdw.cpp) so the dispatcher, torch.compile and libtorch
// see them. Only the Python extension compiles this file.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "build_info.h"
#include "dwconv_bn_act_cpu.h"

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
  // Backends whose kernels are registered with the dispatcher (a CUDA build without the CUDA
  // kernels of the op does not list "cuda").
  py::list backends;
  auto op = c10::Dispatcher::singleton().findSchema({"fastdw::dwconv_bn_act", ""});
  if (op.has_value()) {
    if (op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) backends.append("cpu");
    if (op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) backends.append("cuda");
  }
  d["backends"] = backends;
  // CPU kernel ISA levels compiled in that this processor runs (see set_cpu_isa).
  d["cpu_isas"] = py::cast(fastdw::cpu::supported_isas());
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
  m.def(
      "cpu_isa",
      [] {
        try {
          return std::string(fastdw::cpu::isa_name(fastdw::cpu::active_isa()));
        } catch (const c10::Error& e) {  // a bad FASTDW_CPU_ISA
          throw py::value_error(e.what_without_backtrace());
        }
      },
        "The ISA level the CPU kernels run at now: 'default', 'avx2' or 'avx512'.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        try {
          return fastdw::cpu::set_isa(name);
        } catch (const c10::Error& e) {
          throw py::value_error(e.what_without_backtrace());
        }
      },
      py::arg("name"),
        "Forces the CPU kernels' ISA level ('auto', 'default', 'avx2', 'avx512'; at most what the "
        "processor runs) and returns the previous one. The FASTDW_CPU_ISA environment variable "
        "sets it at the first call.");
}
