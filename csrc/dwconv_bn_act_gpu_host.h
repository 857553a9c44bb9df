// Host-side planning for the GPU kernels (dwconv_bn_act_kernels.h): argument checks, output and
// workspace allocation, the packed per-channel parameters, and the choice of forward path.
// Shared by the CUDA host entries (*.cu) and the CPU emulation of the GPU kernels
// (dwconv_bn_act_emulate.cpp), so the emulation tests the very same plan.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>
#include <string>

#include "dwconv_bn_act_host.h"
#include "dwconv_bn_act_kernels.h"

namespace fastdw {

struct GpuFwdPlan {
  at::Tensor x, out;
  at::Tensor packed;        // (KH*KW + 2, C) fp32: weight taps, scale, shift (kern::PackParams)
  kern::Args args{};
  kern::PackArgs pack{};
  bool packed_done = false;  // the pack kernel has been scheduled
  kern::FwdChoice choice{};
};

inline int dtype_code(at::ScalarType t) { return t == at::kHalf ? 1 : (t == at::kBFloat16 ? 2 : 0); }

inline bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The kernels' view of an optional (C,) tensor (checked by check_vector_param: fp32 or x's dtype).
inline kern::ChanParam chan_param(const c10::optional<at::Tensor>& t) {
  kern::ChanParam c;
  if (!present(t)) return c;
  c.p = t->const_data_ptr();
  c.stride = t->stride(0);
  c.dtype = dtype_code(t->scalar_type());
  return c;
}

// Weight, scale and shift that already are the packed buffer (fastdw.prepack_params, what a
// module caches): fp32 views of one (KH*KW + 2, C) layout, weight tap-major at a 16-byte aligned
// base, scale and shift the two rows after it. The kernels then read them in place and the pack
// launch is skipped. Only the element addresses are compared, so any tensors that satisfy this
// (one buffer or not) are read exactly as a fresh pack of them would be.
inline bool is_prepacked(const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& shift, const DwConvParams& p) {
  if (!scale.has_value() || !scale->defined() || !shift.has_value() || !shift->defined()) return false;
  if (weight.scalar_type() != at::kFloat || scale->scalar_type() != at::kFloat ||
      shift->scalar_type() != at::kFloat)
    return false;
  const int64_t T = p.KH * p.KW, C = p.C;
  if (C == 0 || T == 0) return false;
  // element (c, 0, kh, kw) at base + (kh * KW + kw) * C + c (a stride of a size-1 dim is free)
  if ((C > 1 && weight.stride(0) != 1) || (p.KH > 1 && weight.stride(2) != p.KW * C) ||
      (p.KW > 1 && weight.stride(3) != C))
    return false;
  if (C > 1 && (scale->stride(0) != 1 || shift->stride(0) != 1)) return false;
  const float* base = weight.const_data_ptr<float>();
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && scale->const_data_ptr<float>() == base + T * C &&
         shift->const_data_ptr<float>() == base + (T + 1) * C;
}

inline GpuFwdPlan plan_fwd(const at::Tensor& x_in, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           const std::string& act) {
  GpuFwdPlan g;
  DwConvParams& p = g.args.p;
  check_and_fill(p, x_in, weight, scale, shift, stride, padding, dilation, act, /*allow_double=*/false);
  const auto fmt = p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  g.x = x_in.contiguous(fmt);
  g.out = at::empty({p.N, p.C, p.OH, p.OW}, g.x.options().memory_format(fmt));
  // One buffer for every per-channel parameter, filled by one kernel (ensure_packed) from the
  // tensors as they are (any strides, fp32 or x's dtype): no cast or transpose launches per call.
  const int64_t T = p.KH * p.KW;
  const bool prepacked = is_prepacked(weight, scale, shift, p);  // read in place: no pack launch
  g.packed = prepacked ? weight : at::empty({(T + 2) * p.C}, g.x.options().dtype(at::kFloat));
  g.packed_done = prepacked;
  float* pk = prepacked ? const_cast<float*>(weight.const_data_ptr<float>()) : g.packed.data_ptr<float>();
  kern::PackArgs& pa = g.pack;
  pa.w = weight.const_data_ptr();
  pa.w_sc = weight.stride(0);
  pa.w_sh = weight.stride(2);
  pa.w_sw = weight.stride(3);
  pa.w_dtype = dtype_code(weight.scalar_type());
  pa.scale = chan_param(scale);
  pa.shift = chan_param(shift);
  pa.C = p.C;
  pa.KH = p.KH;
  pa.KW = p.KW;
  pa.out = pk;
  p.x_ptr = g.x.const_data_ptr();
  p.out_ptr = g.out.data_ptr();
  p.weight_ptr = pk;
  p.scale_ptr = pk + T * p.C;
  p.shift_ptr = pk + (T + 1) * p.C;
  g.args.wt = pk;
  g.args.scale = pk + T * p.C;
  g.args.shift = pk + (T + 1) * p.C;
  const bool aligned16 = reinterpret_cast<uintptr_t>(p.x_ptr) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(p.out_ptr) % 16 == 0;
  g.choice = kern::select_fwd_path(p, static_cast<int>(g.x.element_size()), aligned16);
  return g;
}

// Launches the pack kernel of a plan once, before the first kernel that reads its parameters.
template <typename Exec>
void ensure_packed(GpuFwdPlan& g, Exec&& exec) {
  if (g.packed_done) return;
  g.packed_done = true;
  const DwConvParams& p = g.args.p;
  exec(kern::PackParams{}, g.pack, (p.KH * p.KW + 2) * p.C);
}

// dtype -> compile-time type for the GPU kernels (no fp64 on the GPU path).
template <typename F>
inline void gpu_dtype_switch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, "fastdw: GPU kernels take float32, float16 or bfloat16; got ", t);
  }
}

// The launches of the forward, in order: exec(Tag{}, args, n_threads). exec is the CUDA launcher
// (cuda_exec.cuh) or the CPU emulation loop. kCenter: the training forward (args.center set),
// whose fast-path kernels subtract the batch mean before the scale.
template <bool kCenter, typename scalar_t, Act A, int S, typename Exec>
void launch_win(const GpuFwdPlan& g, Exec&& exec) {
  const DwConvParams& p = g.args.p;
  constexpr int V = kern::Pack<scalar_t>::kVec;
  const auto go = [&](auto tag, int th, int tw) {
    kern::Args a = g.args;
    a.div_vec = kern::FastDiv(static_cast<uint32_t>(p.C / V));
    a.div_tw = kern::FastDiv(static_cast<uint32_t>((p.OW + tw - 1) / tw));
    a.div_th = kern::FastDiv(static_cast<uint32_t>((p.OH + th - 1) / th));
    exec(tag, a, kern::fwd_win_threads(p, V, th, tw));
  };
  if (g.choice.tile == kern::WinTile::Strip) {
    constexpr int TH = kern::nhwc_strip_h(S), TW = kern::strip_w(S);
    go(kern::FwdWin<scalar_t, A, 3, S, TH, TW, kCenter>{}, TH, TW);
  } else {
    go(kern::FwdWin<scalar_t, A, 3, S, 1, 1, kCenter>{}, 1, 1);
  }
}

template <bool kCenter, typename scalar_t, Act A, int S, typename Exec>
void launch_nchw(const GpuFwdPlan& g, Exec&& exec) {
  const DwConvParams& p = g.args.p;
  constexpr int TH = kern::strip_h(S), TW = kern::kNchwTW;
  kern::Args a = g.args;
  a.div_tw = kern::FastDiv(static_cast<uint32_t>((p.OW + TW - 1) / TW));
  a.div_th = kern::FastDiv(static_cast<uint32_t>((p.OH + TH - 1) / TH));
  exec(kern::FwdNchw<scalar_t, A, 3, S, TH, TW, kCenter>{}, a, kern::fwd_nchw_win_threads(p, TH, TW));
}

template <typename scalar_t, typename Exec>
void launch_scalar_win(const GpuFwdPlan& g, Exec&& exec) {
  const DwConvParams& p = g.args.p;
  kern::Args a = g.args;
  const auto go = [&](auto k, auto s) {
    constexpr int K = decltype(k)::value, S = decltype(s)::value;
    constexpr int TH = kern::kScalarTH, TW = kern::scalar_tw(S);
    const kern::ScalarWinGrid grid = kern::scalar_win_grid(p, TH, TW);  // dilation: phases
    a.div_vec = kern::FastDiv(static_cast<uint32_t>(p.C));
    a.div_ph = kern::FastDiv(static_cast<uint32_t>(grid.ph));
    a.div_pw = kern::FastDiv(static_cast<uint32_t>(grid.pw));
    a.div_dh = kern::FastDiv(static_cast<uint32_t>(p.dil_h));
    a.div_dw = kern::FastDiv(static_cast<uint32_t>(p.dil_w));
    a.div_tw = kern::FastDiv(static_cast<uint32_t>(grid.cols));
    a.div_th = kern::FastDiv(static_cast<uint32_t>(grid.rows));
    const int64_t n = kern::fwd_scalar_win_threads(p, TH, TW);  // the grid above, every phase
    const bool smooth = p.act == Act::Hardswish || p.act == Act::Silu;
    // dilated: one instantiation for every activation (the phase set-up compiled in only there)
    const bool dil = p.dil_h != 1 || p.dil_w != 1;
    if (p.channels_last) {
      dil      ? exec(kern::FwdScalarWin<scalar_t, K, S, TH, TW, true, false, true>{}, a, n)
      : smooth ? exec(kern::FwdScalarWin<scalar_t, K, S, TH, TW, true, true, false>{}, a, n)
               : exec(kern::FwdScalarWin<scalar_t, K, S, TH, TW, true, false, false>{}, a, n);
    } else {
      dil      ? exec(kern::FwdScalarWin<scalar_t, K, S, TH, TW, false, false, true>{}, a, n)
      : smooth ? exec(kern::FwdScalarWin<scalar_t, K, S, TH, TW, false, true, false>{}, a, n)
               : exec(kern::FwdScalarWin<scalar_t, K, S, TH, TW, false, false, false>{}, a, n);
    }
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  const bool s1 = kern::phase_stride(p.stride_h, p.dil_h) == 1;  // the stride inside a phase
  switch (p.KH) {
    case 3: s1 ? go(std::integral_constant<int, 3>{}, I1{}) : go(std::integral_constant<int, 3>{}, I2{}); break;
    case 5: s1 ? go(std::integral_constant<int, 5>{}, I1{}) : go(std::integral_constant<int, 5>{}, I2{}); break;
    default: s1 ? go(std::integral_constant<int, 7>{}, I1{}) : go(std::integral_constant<int, 7>{}, I2{}); break;
  }
}

template <bool kCenter = false, typename Exec>
void schedule_fwd(GpuFwdPlan& g, Exec&& exec) {
  const DwConvParams& p = g.args.p;
  const int64_t n_out = p.N * p.C * p.OH * p.OW;
  if (n_out == 0) return;
  ensure_packed(g, exec);
  gpu_dtype_switch(g.x.scalar_type(), [&](auto s) {
    using scalar_t = decltype(s);
    if (g.choice.path == kern::FwdPath::ScalarWin) {  // activation and center at run time
      launch_scalar_win<scalar_t>(g, exec);
      return;
    }
    act_switch(p.act, [&](auto a) {
      constexpr Act A = decltype(a)::value;
      const int64_t n_vec = kern::fwd_nhwc_vec_threads<scalar_t, kern::kTileW>(p);
      switch (g.choice.path) {
        case kern::FwdPath::Win3S1: launch_win<kCenter, scalar_t, A, 1>(g, exec); break;
        case kern::FwdPath::Win3S2: launch_win<kCenter, scalar_t, A, 2>(g, exec); break;
        case kern::FwdPath::Nchw3S1: launch_nchw<kCenter, scalar_t, A, 1>(g, exec); break;
        case kern::FwdPath::Nchw3S2: launch_nchw<kCenter, scalar_t, A, 2>(g, exec); break;
        case kern::FwdPath::NhwcVec3: exec(kern::FwdVec<scalar_t, A, 3>{}, g.args, n_vec); break;
        case kern::FwdPath::NhwcVec5: exec(kern::FwdVec<scalar_t, A, 5>{}, g.args, n_vec); break;
        case kern::FwdPath::NhwcVec7: exec(kern::FwdVec<scalar_t, A, 7>{}, g.args, n_vec); break;
        default: exec(kern::FwdGeneral<scalar_t, A>{}, g.args, n_out); break;
      }
    });
  });
}

}  // namespace fastdw
