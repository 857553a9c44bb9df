// Build facts shared by fastdw.cpp (pybind11) and cuda_probe.cu. No torch headers here.
#pragma once
#include <string>
#include <vector>

#ifdef FASTDW_HAVE_BUILD_VERSION_H
#include "fastdw_build_version.h"  // written by setup.py (the CMake build passes -D flags)
#endif
#ifndef FASTDW_VERSION_STR
#define FASTDW_VERSION_STR "unknown"
#endif
#ifndef FASTDW_TORCH_VERSION_STR
#define FASTDW_TORCH_VERSION_STR "unknown"
#endif
#ifndef FASTDW_CUDA_ARCHS_STR
#define FASTDW_CUDA_ARCHS_STR ""
#endif

namespace fastdw {

inline std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : s) {
    if (ch == ';' || ch == ',' || ch == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(ch);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

#ifdef FASTDW_WITH_CUDA
// Defined in cuda_probe.cu.
std::string cuda_compiled_version();
int cuda_binary_version(int device);
#endif

}  // namespace fastdw
