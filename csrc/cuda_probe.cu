// A one-kernel translation unit that tells which kernel image of this binary the driver
// loads on a device (cudaFuncGetAttributes reports its binaryVersion). fastdw/__init__.py
// uses it to warn, at import, when the GPU's arch is not in the binary; CI's cuobjdump check
// reads the SASS of this kernel for every compiled arch.
#include <cuda_runtime.h>

#include <string>

#include "build_info.h"

namespace fastdw {

__global__ void probe_kernel(int* out) {
  if (out != nullptr) *out = 1;
}

std::string cuda_compiled_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

int cuda_binary_version(int device) {
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  if (cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  cudaFuncAttributes attr{};
  cudaError_t err = cudaFuncGetAttributes(&attr, probe_kernel);
  cudaSetDevice(prev);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no kernel image" error
    return -1;
  }
  return attr.binaryVersion;
}

}  // namespace fastdw
