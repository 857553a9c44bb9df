// Host side of the GPU backward of fastdw::dwconv_bn_act and fastdw::dwconv_bn_act_train: the
// plan (checks, outputs, workspaces), the launches of dwconv_bn_act_bwd_kernels.h in order, and
// the training backward's per-channel algebra. Shared by the CUDA host entries
// (dwconv_bn_act_bwd.cu, dwconv_bn_act_train_bwd.cu) and the CPU emulation, like
// dwconv_bn_act_gpu_host.h; apart from the forward's so a backward change rebuilds only the
// backward's objects.
#pragma once
#include "dwconv_bn_act_bwd_kernels.h"
#include "dwconv_bn_act_train_gpu_host.h"

namespace fastdw {

struct GpuBwdPlan {
  GpuFwdPlan f;
  at::Tensor dy, gu, partial, dx, dw, ds, db;  // ds, db fp32 (cast to scale/shift dtype after)
  at::Tensor tpart, gpart;                     // the fused path's per-tile and per-group sums
  kern::BwdArgs b{};
  bool fused = false;  // kern::bwd_fused_ok: one fused kernel and the two-stage finish
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
  g.fused = kern::bwd_fused_ok(p);
  const int64_t T = p.KH * p.KW;
  const bool need_red = g.need_dw || g.need_ds || g.need_db;
  int64_t nchunks = 0, rpc = 1;
  if (g.fused) {  // no activation-sized workspace
    g.gu = at::empty({0}, f32);
    g.b.tiles = p.N * kern::bwd_row_tiles(p) * kern::bwd_col_tiles(p);
    kern::sqrt_groups(g.b.tiles, g.b.ngroups, g.b.group);
    const int64_t R = kern::bwd_rows(3);
    g.tpart = at::empty({need_red ? g.b.tiles * R * p.C : 0}, f32);
    g.gpart = at::empty({need_red ? g.b.ngroups * R * p.C : 0}, f32.dtype(at::kDouble));
  } else {
    g.gu = at::empty({p.N, p.C, p.OH, p.OW}, f32.memory_format(fmt));
    kern::bwd_chunks(p.N * p.OH, nchunks, rpc);
  }
  g.partial = at::empty({need_red && !g.fused ? nchunks * (T + 1) * p.C : 0}, f32.dtype(at::kDouble));
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
  g.b.tpart = g.fused && need_red ? g.tpart.data_ptr<float>() : nullptr;
  g.b.gpart = g.fused && need_red ? g.gpart.data_ptr<double>() : nullptr;
  g.b.nchunks = nchunks;
  g.b.rows_per_chunk = rpc;
  g.n_out = p.N * p.C * p.OH * p.OW;
  g.n_in = g.need_dx ? p.N * p.C * p.H * p.W : 0;
  g.n_partial = need_red && !g.fused ? nchunks * (T + 1) * p.C : 0;
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

// The fused path: one kernel for dx and the per-tile sums, then the two finish stages. a: the
// kernel's arguments (the plan's, or in training the batch-statistics affine and coefficients;
// kTrain: q = scale * gu + lin * (z - mean) + cst, dx and dweight with scale 1). The finish reads
// the plan's own scale (1 in training).
template <bool kTrain, typename Exec>
void schedule_bwd_fused(GpuBwdPlan& g, const kern::Args& a, Exec&& exec) {
  const DwConvParams& p = g.f.args.p;
  const int64_t threads = kern::bwd_fused_threads(p);
  if (threads > 0) {
    kern::BwdArgs bf = g.b;
    bf.a = a;
    bf.a.div_vec = kern::FastDiv(static_cast<uint32_t>(p.C));
    bf.a.div_tw = kern::FastDiv(static_cast<uint32_t>(kern::bwd_col_tiles(p)));
    bf.a.div_th = kern::FastDiv(static_cast<uint32_t>(kern::bwd_row_tiles(p)));
    const bool smooth = p.act == Act::Hardswish || p.act == Act::Silu;
    gpu_dtype_switch(g.f.x.scalar_type(), [&](auto s) {
      using scalar_t = decltype(s);
      const auto go = [&](auto st) {
        constexpr int S = decltype(st)::value;
        if (p.channels_last) {
          smooth ? exec(kern::BwdFused<scalar_t, 3, S, true, true, kTrain>{}, bf, threads)
                 : exec(kern::BwdFused<scalar_t, 3, S, true, false, kTrain>{}, bf, threads);
        } else {
          smooth ? exec(kern::BwdFused<scalar_t, 3, S, false, true, kTrain>{}, bf, threads)
                 : exec(kern::BwdFused<scalar_t, 3, S, false, false, kTrain>{}, bf, threads);
        }
      };
      p.stride_h == 1 ? go(std::integral_constant<int, 1>{}) : go(std::integral_constant<int, 2>{});
    });
  } else if (g.need_dx) {
    g.dx.zero_();
  }
  if (g.need_dw || g.need_ds || g.need_db) {  // (no tiles: the stage-1 sums are empty, i.e. 0)
    const int64_t R = kern::bwd_rows(3);
    exec(kern::BwdReduceTiles{}, g.b, g.b.ngroups * R * p.C);
    kern::FinishArgs fin{g.b, g.need_dw ? g.dw.data_ptr() : nullptr, g.need_ds ? g.ds.data_ptr<float>() : nullptr,
                         g.need_db ? g.db.data_ptr<float>() : nullptr};
    gpu_dtype_switch(g.dw.scalar_type(), [&](auto w) { exec(kern::BwdReduceGroups<decltype(w)>{}, fin, R * p.C); });
  }
}

// The launches of the backward, in order: the fused path, or gu then the rest.
template <typename Exec>
void schedule_bwd(GpuBwdPlan& g, Exec&& exec) {
  const DwConvParams& p = g.f.args.p;
  ensure_packed(g.f, exec);
  if (g.fused) {
    schedule_bwd_fused<false>(g, g.f.args, exec);
    return;
  }
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
  const auto dg_dtype = present(gamma) ? gamma->scalar_type() : at::kFloat;
  const auto db_dtype = present(beta) ? beta->scalar_type() : at::kFloat;
  const auto opts = g.f.x.options();
  const int64_t M = p.N * p.OH * p.OW;
  if (M == 0 || p.C == 0) {
    if (need_dx) g.dx.zero_();
    if (need_dw) g.dw.zero_();
    return {g.dx, g.dw, need_dg ? at::zeros({p.C}, opts.dtype(dg_dtype)) : at::empty({0}, opts.dtype(dg_dtype)),
            need_db ? at::zeros({p.C}, opts.dtype(db_dtype)) : at::empty({0}, opts.dtype(db_dtype))};
  }
  // The per-channel algebra runs in two small kernels, in double (no host tensor ops):
  // TrainBwdPrep (scale, shift, center) before pass A, TrainBwdFinish (dgamma, dbeta, lin, cst)
  // after it.
  at::Tensor coef = at::empty({5, p.C}, f32);
  const float* cf = coef.const_data_ptr<float>();
  at::Tensor dg = at::empty({need_dg ? p.C : 0}, opts.dtype(dg_dtype));
  at::Tensor db = at::empty({need_db ? p.C : 0}, opts.dtype(db_dtype));
  kern::TrainFinishArgs fa;
  fa.C = p.C;
  fa.eps = eps;
  fa.invM = 1.0 / static_cast<double>(M);
  fa.gamma = chan_param(gamma);
  fa.beta = chan_param(beta);
  fa.mean = chan_param(mean);
  fa.var = chan_param(var);
  fa.grad_mean = chan_param(grad_mean);
  fa.grad_var = chan_param(grad_var);
  fa.coef = coef.data_ptr<float>();
  fa.dgamma = need_dg ? dg.data_ptr() : nullptr;
  fa.dbeta = need_db ? db.data_ptr() : nullptr;
  fa.dg_dtype = dtype_code(dg_dtype);
  fa.db_dtype = dtype_code(db_dtype);
  exec(kern::TrainBwdPrep{}, fa, p.C);
  ensure_packed(g.f, exec);
  kern::Args a = g.f.args;
  a.scale = cf;
  a.shift = cf + p.C;
  a.center = cf + 2 * p.C;
  // Pass A: per-chunk sums of gu * (z - mean) and gu, then the chunks summed in a fixed order.
  const bool vec = train_vec_ok(p, static_cast<int>(g.f.x.element_size()), p.x_ptr, g.dy.const_data_ptr());
  const int64_t V = vec ? 16 / g.f.x.element_size() : 1;
  int64_t nchunks = 0, rpc = 1;
  kern::train_chunks(p.N * p.OH, p.C / V, nchunks, rpc);
  at::Tensor part = at::empty({nchunks, 2, p.C}, f32.dtype(at::kDouble));
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
  const at::Tensor gpart = attach_parts(fa, part);
  exec(kern::TrainBwdGroups{}, fa, fa.ngroups * 2 * p.C);
  exec(kern::TrainBwdFinish{}, fa, p.C);
  if (need_dx || need_dw) {
    // Pass B: dz = scale * gu + lin * (z - mean) + cst, then dx / dweight with scale 1.
    kern::BwdArgs bz = g.b;
    bz.a = a;
    bz.a.lin = cf + 3 * p.C;
    bz.a.cst = cf + 4 * p.C;
    if (g.fused) {
      schedule_bwd_fused<true>(g, bz.a, exec);
    } else {
      gpu_dtype_switch(g.f.x.scalar_type(), [&](auto t) {
        using scalar_t = decltype(t);
        act_switch(p.act, [&](auto ac) { exec(kern::TrainBwdDz<scalar_t, decltype(ac)::value>{}, bz, g.n_out); });
      });
      schedule_bwd_rest(g, exec);
    }
  }
  return {g.dx, g.dw, dg, db};
}

}  // namespace fastdw
