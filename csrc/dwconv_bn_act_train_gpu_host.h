// Host side of the GPU training op (fastdw::dwconv_bn_act_train and its backward): checks, the
// launches of dwconv_bn_act_train_kernels.h in order (the per-channel algebra between the passes,
// merging the chunk statistics, BatchNorm folding, the dz coefficients, is kernels too: no tensor
// op runs between the launches). Shared by the CUDA host entries and the CPU emulation.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>

#include <array>
#include <limits>
#include <string>
#include <tuple>

#include "dwconv_bn_act_gpu_host.h"
#include "dwconv_bn_act_train_kernels.h"

namespace fastdw {

// The per-(chunk, channel vector) kernels read 16-byte packs of channels_last x (and dy) when the
// channel count and the base pointers allow it.
inline bool train_vec_ok(const DwConvParams& p, int elem_size, const void* a, const void* b) {
  const int vec = 16 / elem_size;
  return p.channels_last && p.C % vec == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
         (b == nullptr || reinterpret_cast<uintptr_t>(b) % 16 == 0);
}

// Points the finish at the chunk sums `part` ((nchunks, R, C) in double) and its groups; returns
// the group sums' workspace ((ngroups, R, C)), which the caller keeps until the finish has run.
inline at::Tensor attach_parts(kern::TrainFinishArgs& f, const at::Tensor& part) {
  f.part = part.const_data_ptr<double>();
  f.nchunks = part.size(0);
  kern::sqrt_groups(f.nchunks, f.ngroups, f.group);
  at::Tensor gpart = at::empty({f.ngroups, part.size(1), part.size(2)}, part.options());
  f.gpart = gpart.data_ptr<double>();
  return gpart;
}

// Forward: (y, mean + bias, biased var); launches go through exec (CUDA or CPU emulation):
// PackParams, TrainStats, TrainStatGroups, TrainStatFinish, the forward kernel.
template <typename Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_train_fwd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, const std::string& act, Exec&& exec) {
  DwConvParams chk{};
  check_train_and_fill(chk, x, weight, bias, gamma, beta, stride, padding, dilation, eps, act, /*allow_double=*/false);
  GpuFwdPlan s = plan_fwd(x, weight, c10::nullopt, c10::nullopt, stride, padding, dilation, act);
  const DwConvParams& p = s.args.p;
  const auto f32 = s.x.options().dtype(at::kFloat);
  if (s.out.numel() == 0) {  // no values per channel: the statistics of an empty set
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {s.out, at::empty({p.C}, f32).fill_(nan), at::empty({p.C}, f32).fill_(nan)};
  }
  const bool vec = train_vec_ok(p, static_cast<int>(s.x.element_size()), p.x_ptr, nullptr);
  const int64_t V = vec ? 16 / s.x.element_size() : 1;
  int64_t nchunks = 0, rpc = 1;
  kern::train_chunks(p.N * p.OH, p.C / V, nchunks, rpc);
  at::Tensor part = at::empty({nchunks, 3, p.C}, f32.dtype(at::kDouble));
  kern::StatArgs sa{s.args, nullptr, part.data_ptr<double>(), rpc};
  ensure_packed(s, exec);
  gpu_dtype_switch(s.x.scalar_type(), [&](auto t) {
    using scalar_t = decltype(t);
    if (vec) {
      exec(kern::TrainStats<scalar_t, true>{}, sa, nchunks * (p.C / V));
    } else {
      exec(kern::TrainStats<scalar_t, false>{}, sa, nchunks * p.C);
    }
  });
  // The chunks merged in double in a fixed order, and the per-channel algebra, by two small
  // kernels (no atomics, no host tensor ops): mean, var, and the packed parameters' scale and
  // shift rows (the statistics plan already holds x, y and the weights: only the affine changes).
  kern::TrainFinishArgs fa;
  fa.C = p.C;
  fa.eps = eps;
  const at::Tensor gpart = attach_parts(fa, part);
  at::Tensor mean_out = at::empty({p.C}, f32), var_out = at::empty({p.C}, f32);
  at::Tensor center = present(bias) ? at::empty({p.C}, f32) : mean_out;
  fa.bias = chan_param(bias);
  fa.gamma = chan_param(gamma);
  fa.beta = chan_param(beta);
  fa.mean_out = mean_out.data_ptr<float>();
  fa.center = center.data_ptr<float>();
  fa.var_out = var_out.data_ptr<float>();
  float* pk = s.packed.data_ptr<float>();  // never a user's buffer here: plan_fwd got no scale / shift
  fa.scale_row = pk + p.KH * p.KW * p.C;
  fa.shift_row = pk + (p.KH * p.KW + 1) * p.C;
  exec(kern::TrainStatGroups{}, fa, fa.ngroups * p.C);
  exec(kern::TrainStatFinish{}, fa, p.C);
  s.args.center = center.const_data_ptr<float>();
  schedule_fwd</*kCenter=*/true>(s, exec);
  return {s.out, mean_out, var_out};
}

}  // namespace fastdw
