// Host side of the GPU training op (fastdw::dwconv_bn_act_train and its backward): checks, the
// launches of dwconv_bn_act_train_kernels.h, and the per-channel algebra between them (merging
// the chunk statistics, BatchNorm folding, the dz coefficients) as (C,)-sized tensor ops on the
// same device and stream. Shared by the CUDA host entries and the CPU emulation.
#pragma once
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>

#include <array>
#include <limits>
#include <string>
#include <tuple>

#include "dwconv_bn_act_gpu_host.h"
#include "dwconv_bn_act_train_kernels.h"

namespace fastdw {

inline bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The per-(chunk, channel vector) kernels read 16-byte packs of channels_last x (and dy) when the
// channel count and the base pointers allow it.
inline bool train_vec_ok(const DwConvParams& p, int elem_size, const void* a, const void* b) {
  const int vec = 16 / elem_size;
  return p.channels_last && p.C % vec == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
         (b == nullptr || reinterpret_cast<uintptr_t>(b) % 16 == 0);
}

// Forward: (y, mean + bias, biased var); launches go through exec (CUDA or CPU emulation).
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
  // Chan et al.'s merge of the chunks, in double, in a fixed order (no atomics anywhere).
  const at::Tensor& pd = part;
  const at::Tensor cnt = pd.select(1, 0), pm = pd.select(1, 1), pq = pd.select(1, 2);
  const at::Tensor total = cnt.sum(0);
  const at::Tensor mean_d = (cnt * pm).sum(0) / total;
  const at::Tensor var_d = (pq.sum(0) + (cnt * (pm - mean_d).square()).sum(0)) / total;
  const at::Tensor mean = mean_d.to(at::kFloat), var = var_d.to(at::kFloat);
  // invstd in double from the returned (rounded) variance, as the backward computes it.
  const at::Tensor invstd = (var.to(at::kDouble) + eps).rsqrt();
  const at::Tensor scale = (present(gamma) ? gamma->to(at::kDouble) * invstd : invstd).to(at::kFloat);
  // The statistics plan already holds x, y and the weights: only the affine changes.
  set_affine(s, scale, beta);
  s.args.center = mean.const_data_ptr<float>();
  schedule_fwd</*kCenter=*/true>(s, exec);
  return {s.out, present(bias) ? mean + bias->to(at::kFloat) : mean, var};
}

}  // namespace fastdw
