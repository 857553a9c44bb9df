// Host-side planning for the GPU kernels (dwconv_bn_act_kernels.h): argument checks, output and
// workspace allocation, fp32 copies of the per-channel data, and the choice of forward path.
// Shared by the CUDA host entries (*.cu) and the CPU emulation of the GPU kernels
// (dwconv_bn_act_emulate.cpp), so the emulation tests the very same plan.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>
#include <string>

#include "dwconv_bn_act_host.h"
#include "dwconv_bn_act_kernels.h"

namespace fastdw {

struct GpuFwdPlan {
  at::Tensor x, out, wt, scale, shift;
  kern::Args args{};
  kern::FwdPath path = kern::FwdPath::General;
};

// The per-channel affine of a plan as fp32 copies (absent: scale 1, shift 0), and its pointers.
inline void set_affine(GpuFwdPlan& g, const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift) {
  DwConvParams& p = g.args.p;
  const auto f32 = g.x.options().dtype(at::kFloat);
  g.scale = (scale.has_value() && scale->defined()) ? scale->to(at::kFloat).contiguous() : at::ones({p.C}, f32);
  g.shift = (shift.has_value() && shift->defined()) ? shift->to(at::kFloat).contiguous() : at::zeros({p.C}, f32);
  p.scale_ptr = g.scale.const_data_ptr();
  p.shift_ptr = g.shift.const_data_ptr();
  g.args.scale = g.scale.const_data_ptr<float>();
  g.args.shift = g.shift.const_data_ptr<float>();
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
  g.wt = weight.reshape({p.C, p.KH * p.KW}).to(at::kFloat).t().contiguous();  // (T, C)
  p.x_ptr = g.x.const_data_ptr();
  p.out_ptr = g.out.data_ptr();
  p.weight_ptr = g.wt.const_data_ptr();
  g.args.wt = g.wt.const_data_ptr<float>();
  set_affine(g, scale, shift);
  const bool aligned16 = reinterpret_cast<uintptr_t>(p.x_ptr) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(p.out_ptr) % 16 == 0;
  g.path = kern::select_fwd_path(p, static_cast<int>(g.x.element_size()), aligned16);
  return g;
}

struct GpuBwdPlan {
  GpuFwdPlan f;
  at::Tensor dy, gu, partial, dx, dw, ds, db;  // ds, db fp32 (cast to scale/shift dtype after)
  kern::BwdArgs b{};
  bool need_dx = false, need_dw = false, need_ds = false, need_db = false;
  int64_t n_out = 0, n_in = 0, n_partial = 0;
};

inline GpuBwdPlan plan_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           const std::string& act, std::array<bool, 4> mask) {
  GpuBwdPlan g;
  g.f = plan_fwd(x, weight, scale, shift, stride, padding, dilation, act);
  const DwConvParams& p = g.f.args.p;
  check_grad_out(grad_out, x, p);
  const auto fmt = p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const bool has_scale = scale.has_value() && scale->defined();
  const bool has_shift = shift.has_value() && shift->defined();
  g.need_dx = mask[0];
  g.need_dw = mask[1];
  g.need_ds = mask[2] && has_scale;
  g.need_db = mask[3] && has_shift;
  const auto f32 = g.f.x.options().dtype(at::kFloat);
  g.dy = grad_out.contiguous(fmt);
  g.gu = at::empty({p.N, p.C, p.OH, p.OW}, f32.memory_format(fmt));
  const int64_t T = p.KH * p.KW;
  int64_t nchunks = 0, rpc = 1;
  kern::bwd_chunks(p.N * p.OH, nchunks, rpc);
  const bool need_red = g.need_dw || g.need_ds || g.need_db;
  g.partial = at::empty({need_red ? nchunks * (T + 1) * p.C : 0}, f32.dtype(at::kDouble));
  g.dx = g.need_dx ? at::empty(g.f.x.sizes(), g.f.x.options().memory_format(fmt)) : at::empty({0}, g.f.x.options());
  g.dw = g.need_dw ? at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous))
                   : at::empty({0}, weight.options());
  g.ds = at::empty({g.need_ds ? p.C : 0}, f32);
  g.db = at::empty({g.need_db ? p.C : 0}, f32);
  g.b.a = g.f.args;
  g.b.dy = g.dy.const_data_ptr();
  g.b.gu = g.gu.data_ptr<float>();
  g.b.dx = g.need_dx ? g.dx.data_ptr() : nullptr;
  g.b.partial = g.partial.data_ptr<double>();
  g.b.nchunks = nchunks;
  g.b.rows_per_chunk = rpc;
  g.n_out = p.N * p.C * p.OH * p.OW;
  g.n_in = g.need_dx ? p.N * p.C * p.H * p.W : 0;
  g.n_partial = need_red ? nchunks * (T + 1) * p.C : 0;
  return g;
}

// The four returned gradients: empty (0,) tensors where not requested, scale/shift dtypes kept.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_outputs(
    const GpuBwdPlan& g, const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift) {
  const bool has_scale = scale.has_value() && scale->defined();
  const bool has_shift = shift.has_value() && shift->defined();
  const auto ds_dtype = has_scale ? scale->scalar_type() : at::kFloat;
  const auto db_dtype = has_shift ? shift->scalar_type() : at::kFloat;
  at::Tensor ds = g.need_ds ? g.ds.to(ds_dtype) : at::empty({0}, g.f.x.options().dtype(ds_dtype));
  at::Tensor db = g.need_db ? g.db.to(db_dtype) : at::empty({0}, g.f.x.options().dtype(db_dtype));
  return {g.dx, g.dw, ds, db};
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
// (cuda_exec.cuh) or the CPU emulation loop.
template <typename Exec>
void schedule_fwd(const GpuFwdPlan& g, Exec&& exec) {
  const DwConvParams& p = g.args.p;
  const int64_t n_out = p.N * p.C * p.OH * p.OW;
  if (n_out == 0) return;
  gpu_dtype_switch(g.x.scalar_type(), [&](auto s) {
    using scalar_t = decltype(s);
    act_switch(p.act, [&](auto a) {
      constexpr Act A = decltype(a)::value;
      const int64_t n_vec = kern::fwd_nhwc_vec_threads<scalar_t, kern::kTileW>(p);
      switch (g.path) {
        case kern::FwdPath::NhwcVec3: exec(kern::FwdVec<scalar_t, A, 3>{}, g.args, n_vec); break;
        case kern::FwdPath::NhwcVec5: exec(kern::FwdVec<scalar_t, A, 5>{}, g.args, n_vec); break;
        case kern::FwdPath::NhwcVec7: exec(kern::FwdVec<scalar_t, A, 7>{}, g.args, n_vec); break;
        default: exec(kern::FwdGeneral<scalar_t, A>{}, g.args, n_out); break;
      }
    });
  });
}

// The launches of the backward after gu (dx, the weight / scale / shift reductions), in order;
// each depends on the previous through memory only. g.gu holds the gradient of the conv output
// divided by scale (inference) or, with scale = 1, the gradient itself (training).
template <typename Exec>
void schedule_bwd_rest(GpuBwdPlan& g, Exec&& exec) {
  const DwConvParams& p = g.f.args.p;
  kern::FinishArgs fin{g.b, g.need_dw ? g.dw.data_ptr() : nullptr, g.need_ds ? g.ds.data_ptr<float>() : nullptr,
                       g.need_db ? g.db.data_ptr<float>() : nullptr};
  gpu_dtype_switch(g.f.x.scalar_type(), [&](auto s) {
    using scalar_t = decltype(s);
    if (g.need_dx) {
      if (g.n_out > 0) {
        exec(kern::BwdDx<scalar_t>{}, g.b, g.n_in);
      } else {
        g.dx.zero_();
      }
    }
    if (g.n_partial > 0) exec(kern::BwdPartial<scalar_t>{}, g.b, g.n_partial);
  });
  if (g.need_dw || g.need_ds || g.need_db) {
    gpu_dtype_switch(g.dw.scalar_type(), [&](auto w) {
      exec(kern::BwdFinish<decltype(w)>{}, fin, p.C);
    });
  }
}

// The launches of the backward, in order: gu, then the rest.
template <typename Exec>
void schedule_bwd(GpuBwdPlan& g, Exec&& exec) {
  const DwConvParams& p = g.f.args.p;
  gpu_dtype_switch(g.f.x.scalar_type(), [&](auto s) {
    using scalar_t = decltype(s);
    if (g.n_out > 0) {
      act_switch(p.act, [&](auto a) { exec(kern::BwdGu<scalar_t, decltype(a)::value>{}, g.b, g.n_out); });
    } else {
      g.gu.zero_();
    }
  });
  schedule_bwd_rest(g, exec);
}

}  // namespace fastdw
