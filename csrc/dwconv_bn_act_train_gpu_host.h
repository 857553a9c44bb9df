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

// Backward: (dx, dweight, dgamma, dbeta) under the output_mask rule of the inference backward.
template <typename Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_train_bwd(
    const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_mean, const c10::optional<at::Tensor>& grad_var,
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, const std::string& act, std::array<bool, 4> mask,
    Exec&& exec) {
  DwConvParams chk{};
  check_train_and_fill(chk, x, weight, c10::nullopt, gamma, beta, stride, padding, dilation, eps, act, false);
  check_grad_out(grad_y, x, chk);
  check_train_stats(mean, var, grad_mean, grad_var, x);
  const bool need_dx = mask[0], need_dw = mask[1];
  const bool need_dg = mask[2] && present(gamma), need_db = mask[3] && present(beta);
  GpuBwdPlan g = plan_bwd(grad_y, x, weight, c10::nullopt, c10::nullopt, stride, padding, dilation, act,
                          {need_dx, need_dw, false, false});
  const DwConvParams& p = g.f.args.p;
  const auto f32 = g.f.x.options().dtype(at::kFloat);
  at::Tensor dg = at::zeros({p.C}, f32), db = at::zeros({p.C}, f32);
  const int64_t M = p.N * p.OH * p.OW;
  if (M > 0 && p.C > 0) {
    // The per-channel algebra in double: invstd, and below the sums and the dz coefficients.
    const auto f64 = f32.dtype(at::kDouble);
    const at::Tensor invstd = (var.to(at::kFloat).to(at::kDouble) + eps).rsqrt();
    const at::Tensor gam = present(gamma) ? gamma->to(at::kDouble) : at::ones({p.C}, f64);
    const at::Tensor center = mean.to(at::kFloat).contiguous();
    const at::Tensor scale_d = gam * invstd;
    const at::Tensor scale = scale_d.to(at::kFloat).contiguous();
    const at::Tensor shift = present(beta) ? beta->to(at::kFloat).contiguous() : at::zeros({p.C}, f32);
    ensure_packed(g.f, exec);
    kern::Args a = g.f.args;
    a.scale = scale.const_data_ptr<float>();
    a.shift = shift.const_data_ptr<float>();
    a.center = center.const_data_ptr<float>();
    // Pass A: per-chunk sums of gu * (z - mean) and gu, summed over the chunks in order.
    const bool vec = train_vec_ok(p, static_cast<int>(g.f.x.element_size()), p.x_ptr, g.dy.const_data_ptr());
    const int64_t V = vec ? 16 / g.f.x.element_size() : 1;
    int64_t nchunks = 0, rpc = 1;
    kern::train_chunks(p.N * p.OH, p.C / V, nchunks, rpc);
    at::Tensor part = at::empty({nchunks, 2, p.C}, f64);
    kern::StatArgs ra{a, g.dy.const_data_ptr(), part.data_ptr<double>(), rpc};
    gpu_dtype_switch(g.f.x.scalar_type(), [&](auto t) {
      using scalar_t = decltype(t);
      act_switch(p.act, [&](auto ac) {
        constexpr Act A = decltype(ac)::value;
        if (vec) {
          exec(kern::TrainBwdReduce<scalar_t, A, true>{}, ra, nchunks * (p.C / V));
        } else {
          exec(kern::TrainBwdReduce<scalar_t, A, false>{}, ra, nchunks * p.C);
        }
      });
    });
    const at::Tensor S = part.select(1, 0).sum(0), B = part.select(1, 1).sum(0);
    dg = (invstd * S).to(at::kFloat);
    db = B.to(at::kFloat);
    if (need_dx || need_dw) {
      // Pass B: dz = scale * gu + lin * (z - mean) + cst into g.gu, then dx / dweight with scale 1.
      const double invM = 1.0 / static_cast<double>(M);
      at::Tensor lin = -(gam * invstd.pow(3) * S);
      if (present(grad_var)) lin = lin + 2.0 * grad_var->to(at::kDouble);
      lin = (lin * invM).to(at::kFloat).contiguous();
      at::Tensor cst = -(scale_d * B);
      if (present(grad_mean)) cst = cst + grad_mean->to(at::kDouble);
      cst = (cst * invM).to(at::kFloat).contiguous();
      kern::BwdArgs bz = g.b;
      bz.a = a;
      bz.a.lin = lin.const_data_ptr<float>();
      bz.a.cst = cst.const_data_ptr<float>();
      gpu_dtype_switch(g.f.x.scalar_type(), [&](auto t) {
        using scalar_t = decltype(t);
        act_switch(p.act, [&](auto ac) { exec(kern::TrainBwdDz<scalar_t, decltype(ac)::value>{}, bz, g.n_out); });
      });
      schedule_bwd_rest(g, exec);
    }
  } else {
    if (need_dx) g.dx.zero_();
    if (need_dw) g.dw.zero_();
  }
  const auto dg_dtype = present(gamma) ? gamma->scalar_type() : at::kFloat;
  const auto db_dtype = present(beta) ? beta->scalar_type() : at::kFloat;
  const auto opts = g.f.x.options();
  return {g.dx, g.dw, need_dg ? dg.to(dg_dtype) : at::empty({0}, opts.dtype(dg_dtype)),
          need_db ? db.to(db_dtype) : at::empty({0}, opts.dtype(db_dtype))};
}

}  // namespace fastdw
