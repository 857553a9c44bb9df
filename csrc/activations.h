// Epilogue activations and their derivatives, shared by the CPU kernels, the CUDA kernels and the
// host emulation of the CUDA kernels. Formulas follow PyTorch's kernels (hardtanh, hardswish,
// silu) so fp32 results agree to rounding; derivatives follow PyTorch's backward conventions at
// the kinks (threshold_backward, hardtanh_backward, hardswish_backward); NaN propagates.
#pragma once
#include <cmath>
#include <type_traits>

#include "params.h"

#if defined(__CUDACC__)
#define FASTDW_HD __host__ __device__ __forceinline__
#else
#define FASTDW_HD inline
#endif

namespace fastdw {

FASTDW_HD float fexp(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  return std::exp(x);
#endif
}

FASTDW_HD double fexp(double x) {
#ifdef __CUDA_ARCH__
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// min(max(u, lo), hi) with NaN passing through (as std::min(std::max(...)) does), by compares
// and selects on every target.
template <typename T>
FASTDW_HD T clamp_nan_sel(T u, T lo, T hi) {
  return u < lo ? lo : (u > hi ? hi : u);
}

// The same clamp; specialised below where the target has a cheaper form.
template <typename T>
FASTDW_HD T clamp_nan(T u, T lo, T hi) {
  return clamp_nan_sel(u, lo, hi);
}

// fp32 on sm_80+: max.NaN / min.NaN return NaN when an operand is NaN, so the clamp is two
// instructions (FMNMX.NAN) instead of two compares and two selects.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
template <>
__device__ __forceinline__ float clamp_nan<float>(float u, float lo, float hi) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(u), "f"(lo));
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(r), "f"(hi));
  return r;
}
#endif

template <Act A, typename T>
FASTDW_HD T act_fwd(T u) {
  if constexpr (A == Act::None) {
    return u;
  } else if constexpr (A == Act::Relu) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same_v<T, float>) {
      float r;
      asm("max.NaN.f32 %0, %1, 0f00000000;" : "=f"(r) : "f"(u));  // NaN passes
      return r;
    }
#endif
    return (u > T(0) || u != u) ? u : T(0);
  } else if constexpr (A == Act::Relu6) {
    return clamp_nan(u, T(0), T(6));
  } else if constexpr (A == Act::Hardswish) {
    return u * clamp_nan(u + T(3), T(0), T(6)) / T(6);
  } else {
    return u / (T(1) + fexp(-u));
  }
}

// act_fwd for a result that is rounded to fp16 / bf16 next (11 / 8 significant bits): hardswish
// multiplies by 1/6 instead of dividing, silu uses the GPU's approximate exp2 and reciprocal
// (MUFU: a few fp32 ulps, far below the 16-bit rounding) instead of the exact expf and division
// (about 20 instructions per element). Same NaN propagation and limits; fp32 results keep
// act_fwd.
template <Act A>
FASTDW_HD float act_fwd_lowp(float u) {
  if constexpr (A == Act::Hardswish) {
    return u * clamp_nan_sel(u + 3.f, 0.f, 6.f) * (1.f / 6.f);
  } else if constexpr (A == Act::Silu) {
#ifdef __CUDA_ARCH__
    return __fdividef(u, 1.f + __expf(-u));
#else
    return u / (1.f + std::exp(-u));
#endif
  } else {
    return act_fwd<A>(u);
  }
}

template <Act A, typename T>
FASTDW_HD T act_bwd(T u, T g) {
  if constexpr (A == Act::None) {
    return g;
  } else if constexpr (A == Act::Relu) {
    return u <= T(0) ? T(0) : g;
  } else if constexpr (A == Act::Relu6) {
    return (u <= T(0) || u >= T(6)) ? T(0) : g;
  } else if constexpr (A == Act::Hardswish) {
    return u <= T(-3) ? T(0) : (u < T(3) ? g * (u / T(3) + T(0.5)) : g);
  } else {
    const T s = T(1) / (T(1) + fexp(-u));
    return g * s * (T(1) + u * (T(1) - s));
  }
}

// Runtime activation -> compile-time constant: f(std::integral_constant<Act, A>{}).
template <typename F>
inline void act_switch(Act act, F&& f) {
  switch (act) {
    case Act::None: f(std::integral_constant<Act, Act::None>{}); break;
    case Act::Relu: f(std::integral_constant<Act, Act::Relu>{}); break;
    case Act::Relu6: f(std::integral_constant<Act, Act::Relu6>{}); break;
    case Act::Hardswish: f(std::integral_constant<Act, Act::Hardswish>{}); break;
    case Act::Silu: f(std::integral_constant<Act, Act::Silu>{}); break;
  }
}

}  // namespace fastdw
