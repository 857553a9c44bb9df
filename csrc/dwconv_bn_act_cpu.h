// Shared declarations of the CPU kernels of fastdw's ops.
//
// The kernels (dwconv_bn_act_cpu_kernels.inc) are compiled once per x86 ISA level, each in its
// own translation unit and namespace under `#pragma GCC target`:
//   cpu::isa_default  (baseline x86-64 / any other architecture), dwconv_bn_act_cpu_default.cpp
//   cpu::isa_avx2     (x86-64-v3: AVX2, FMA, F16C),                 dwconv_bn_act_cpu_avx2.cpp
//   cpu::isa_avx512   (x86-64-v4: AVX-512 F/BW/DQ/VL),              dwconv_bn_act_cpu_avx512.cpp
// and the host entries (dwconv_bn_act_cpu.cpp) call the best level the processor runs, or the one
// forced by FASTDW_CPU_ISA / fastdw.set_cpu_isa(): the rounding of every ISA path can then be
// tested on one machine (ATen's ATEN_CPU_CAPABILITY does the same for its own kernels).
// Only kernel code lives under the pragma; the headers below are parsed before it, so the
// inline and template code they define (std::, ATen) stays baseline code wherever it is
// instantiated, and one binary runs on any x86-64.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "activations.h"
#include "params.h"

// Several ISA levels need GCC's target pragma (GCC >= 11 for the x86-64-vN names) on x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    !defined(FASTDW_CPU_SINGLE_ISA)
#define FASTDW_CPU_MULTI_ISA 1
#else
#define FASTDW_CPU_MULTI_ISA 0
#endif

namespace fastdw {
namespace cpu {

// Per-channel data of the backward epilogue; NCHW passes pointers at channel c (cstride 0), NHWC
// the per-channel arrays (cstride 1). center is 0 for the inference op, the batch mean in training.
template <typename acc_t>
struct EpiView {
  const acc_t *scale, *shift, *center, *lin, *cst;
};

// Per-channel parameters as acc_t vectors: weights (C, KH*KW) for NCHW or transposed
// (KH*KW, C) for NHWC so the channel loop is contiguous; scale defaults to 1, shift to 0.
template <typename acc_t>
struct ChannelParams {
  std::vector<acc_t> w, scale, shift;
  std::vector<acc_t> center, lin, cst;  // backward epilogue (EpiView): 0 for inference
  EpiView<acc_t> view(int64_t c) const {
    return {&scale[c], &shift[c], &center[c], lin.empty() ? nullptr : &lin[c], cst.empty() ? nullptr : &cst[c]};
  }
};

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // fp32, or fp64 for fp64 inputs

// The kernel entries, one set per ISA namespace (explicitly instantiated for float, double,
// c10::Half and c10::BFloat16 in each ISA's translation unit). Every per-channel reduction
// comes back in double (see the .inc for how it is summed):
//   fwd:         y = act((conv(x) - center) * scale + shift), either layout
//   bwd:         dx (p.grad_x_ptr, may be null), and dw (C, KH*KW), ds = sum gu * (z - center),
//                db = sum gu (each may be null); kTrain adds lin * (z - center) + cst to dz
//   batch_stats: batch mean and biased variance of z = conv(x) per channel
#define FASTDW_CPU_DECLARE_ISA(NS)                                                                             \
  namespace NS {                                                                                                \
  template <typename scalar_t>                                                                                  \
  void fwd(const DwConvParams& p, const ChannelParams<acc_type<scalar_t>>& cp);                                \
  template <typename scalar_t, bool kTrain>                                                                     \
  void bwd(const DwConvBwdParams& p, const ChannelParams<acc_type<scalar_t>>& cp, double* dw, double* ds,      \
           double* db);                                                                                         \
  template <typename scalar_t>                                                                                  \
  void batch_stats(const DwConvParams& p, const ChannelParams<acc_type<scalar_t>>& cp, double* mean,           \
                   double* var);                                                                                \
  }
FASTDW_CPU_DECLARE_ISA(isa_default)
#if FASTDW_CPU_MULTI_ISA
FASTDW_CPU_DECLARE_ISA(isa_avx2)
FASTDW_CPU_DECLARE_ISA(isa_avx512)
#endif

// ISA levels, lowest first.
enum class Isa : int { Default = 0, Avx2 = 1, Avx512 = 2 };

const char* isa_name(Isa isa);
// The levels compiled into this binary that this processor runs, lowest first.
std::vector<std::string> supported_isas();
// The level the kernels use now: the best supported one, unless FASTDW_CPU_ISA (read once, at
// the first call) or set_isa() asked for a lower one.
Isa active_isa();
// Forces a level by name ("default", "avx2", "avx512", or "auto" for the best); returns the
// previous level's name. Throws (c10::ValueError) on an unknown name or a level this binary or
// processor cannot run.
std::string set_isa(const std::string& name);

// Calls f(tag) with the active ISA's namespace tag: tag.template fwd<scalar_t>(...) etc.
#define FASTDW_CPU_ISA_TAG(NS)                                                                             \
  struct NS##_tag {                                                                                        \
    template <typename scalar_t, typename... A>                                                            \
    static void fwd(A&&... a) { NS::fwd<scalar_t>(std::forward<A>(a)...); }                               \
    template <typename scalar_t, bool kTrain, typename... A>                                               \
    static void bwd(A&&... a) { NS::bwd<scalar_t, kTrain>(std::forward<A>(a)...); }                      \
    template <typename scalar_t, typename... A>                                                            \
    static void batch_stats(A&&... a) { NS::batch_stats<scalar_t>(std::forward<A>(a)...); }               \
  };
FASTDW_CPU_ISA_TAG(isa_default)
#if FASTDW_CPU_MULTI_ISA
FASTDW_CPU_ISA_TAG(isa_avx2)
FASTDW_CPU_ISA_TAG(isa_avx512)
#endif

template <typename F>
void isa_switch(F&& f) {
  switch (active_isa()) {
#if FASTDW_CPU_MULTI_ISA
    case Isa::Avx512: f(isa_avx512_tag{}); return;
    case Isa::Avx2: f(isa_avx2_tag{}); return;
#endif
    default: f(isa_default_tag{}); return;
  }
}

}  // namespace cpu
}  // namespace fastdw
