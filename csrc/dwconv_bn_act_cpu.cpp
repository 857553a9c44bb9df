// CPU host entries of fastdw::dwconv_bn_act, fastdw::_dwconv_bn_act_backward and the training
// pair: argument checks, allocation, the per-channel algebra, and the call of the kernels
// (dwconv_bn_act_cpu_kernels.inc) at the ISA level chosen at run time (dwconv_bn_act_cpu.h).
//
// Reductions (dweight, dscale, dshift, the batch statistics) come back from the kernels in
// double and are always deterministic on the CPU: they are split into chunks fixed by the
// problem shape (never by the thread count) and merged in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>

#include "dwconv_bn_act_cpu.h"
#include "dwconv_bn_act_host.h"

namespace fastdw {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// ISA selection

namespace {

Isa best_isa() {
#if FASTDW_CPU_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::Avx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::Avx2;
#endif
  return Isa::Default;
}

bool parse_isa(const std::string& name, Isa& out) {
  if (name == "auto") return out = best_isa(), true;
  for (Isa i : {Isa::Default, Isa::Avx2, Isa::Avx512})
    if (name == isa_name(i)) return out = i, true;
  return false;
}

// -1 until the first call resolves FASTDW_CPU_ISA (or the best level).
std::atomic<int> g_isa{-1};

Isa checked_isa(const std::string& name, const char* origin) {
  Isa isa = Isa::Default;
  TORCH_CHECK_VALUE(parse_isa(name, isa), "fastdw: ", origin, " must be one of 'auto', 'default', 'avx2', 'avx512'; got '",
                    name, "'");
  TORCH_CHECK_VALUE(static_cast<int>(isa) <= static_cast<int>(best_isa()), "fastdw: ", origin, " = '", name,
                    "' is not available here: this processor and build run at most '", isa_name(best_isa()), "'");
  return isa;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    default: return "default";
  }
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> v;
  for (int i = 0; i <= static_cast<int>(best_isa()); ++i) v.emplace_back(isa_name(static_cast<Isa>(i)));
  return v;
}

Isa active_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("FASTDW_CPU_ISA");
    const Isa isa = (env != nullptr && *env != '\0') ? checked_isa(env, "FASTDW_CPU_ISA") : best_isa();
    int expected = -1;
    g_isa.compare_exchange_strong(expected, static_cast<int>(isa));
    v = g_isa.load();
  }
  return static_cast<Isa>(v);
}

std::string set_isa(const std::string& name) {
  const Isa isa = checked_isa(name, "the CPU ISA");
  const Isa prev = active_isa();
  g_isa.store(static_cast<int>(isa));
  return isa_name(prev);
}

// ---------------------------------------------------------------------------------------------
// Host entries registered with the dispatcher.

namespace {

// (C,) vector of acc_t from an optional tensor (absent: dflt).
template <typename acc_t>
std::vector<acc_t> channel_vector(const c10::optional<at::Tensor>& t, int64_t C, acc_t dflt) {
  std::vector<acc_t> v(C, dflt);
  if (t.has_value() && t->defined()) {
    const auto tc = t->to(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat).contiguous();
    std::copy(tc.template const_data_ptr<acc_t>(), tc.template const_data_ptr<acc_t>() + C, v.begin());
  }
  return v;
}

template <typename acc_t>
ChannelParams<acc_t> channel_params(const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                                    const c10::optional<at::Tensor>& shift, bool transpose) {
  const auto acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  const int64_t C = weight.size(0), T = weight.size(2) * weight.size(3);
  ChannelParams<acc_t> cp;
  auto w = weight.reshape({C, T}).to(acc_dtype);
  if (transpose) w = w.t();
  w = w.contiguous();
  cp.w.assign(w.template const_data_ptr<acc_t>(), w.template const_data_ptr<acc_t>() + C * T);
  cp.scale = channel_vector<acc_t>(scale, C, acc_t(1));
  cp.shift = channel_vector<acc_t>(shift, C, acc_t(0));
  cp.center.assign(C, acc_t(0));
  return cp;
}

at::Tensor f64_zeros(at::IntArrayRef sizes) { return at::zeros(sizes, at::TensorOptions().dtype(at::kDouble)); }

at::Tensor dwconv_bn_act_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             c10::string_view act) {
  DwConvParams p{};
  check_and_fill(p, x_in, weight, scale, shift, stride, padding, dilation, std::string(act), true);
  const auto fmt = p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor out = at::empty({p.N, p.C, p.OH, p.OW}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  p.x_ptr = x.const_data_ptr();
  p.out_ptr = out.data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_act_cpu", [&] {
    const auto cp = channel_params<acc_type<scalar_t>>(weight, scale, shift, p.channels_last);
    isa_switch([&](auto k) { decltype(k)::template fwd<scalar_t>(p, cp); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view act, std::array<bool, 4> output_mask,
    bool deterministic) {
  DwConvBwdParams p{};
  check_and_fill(p, x_in, weight, scale, shift, stride, padding, dilation, std::string(act), true);
  check_grad_out(grad_out_in, x_in, p);
  const bool has_scale = scale.has_value() && scale->defined();
  const bool has_shift = shift.has_value() && shift->defined();
  const bool need_dx = output_mask[0], need_dw = output_mask[1];
  const bool need_ds = output_mask[2] && has_scale, need_db = output_mask[3] && has_shift;
  const auto fmt = p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  // grad_out may arrive with any strides (expanded from a sum, say): bring it to x's layout.
  const at::Tensor dy = grad_out_in.contiguous(fmt);
  auto empty0 = [&](const at::TensorOptions& o) { return at::empty({0}, o); };
  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options().memory_format(fmt)) : empty0(x.options());
  at::Tensor dw_acc = f64_zeros({p.C, p.KH * p.KW}), ds_acc = f64_zeros({p.C}), db_acc = f64_zeros({p.C});
  (void)deterministic;  // the CPU reductions are always deterministic (fixed chunking)
  if (p.N > 0 && p.C > 0 && p.OH > 0 && p.OW > 0) {
    p.x_ptr = x.const_data_ptr();
    p.grad_out_ptr = dy.const_data_ptr();
    p.grad_x_ptr = need_dx ? dx.data_ptr() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_act_backward_cpu", [&] {
      const auto cp = channel_params<acc_type<scalar_t>>(weight, scale, shift, p.channels_last);
      double* dwp = need_dw ? dw_acc.data_ptr<double>() : nullptr;
      isa_switch([&](auto k) {
        decltype(k)::template bwd<scalar_t, false>(p, cp, dwp, ds_acc.data_ptr<double>(), db_acc.data_ptr<double>());
      });
    });
  } else if (need_dx) {
    dx.zero_();
  }
  at::Tensor dw = need_dw ? dw_acc.view(weight.sizes()).to(weight.scalar_type()) : empty0(weight.options());
  // Absent or unrequested gradients are empty (0,) tensors of the dtype the gradient would have.
  const auto ds_dtype = has_scale ? scale->scalar_type() : at::kFloat;
  const auto db_dtype = has_shift ? shift->scalar_type() : at::kFloat;
  at::Tensor ds = need_ds ? ds_acc.to(ds_dtype) : empty0(x.options().dtype(ds_dtype));
  at::Tensor db = need_db ? db_acc.to(db_dtype) : empty0(x.options().dtype(db_dtype));
  return {dx, dw, ds, db};
}

// ---------------------------------------------------------------------------------------------
// Training mode (batch-statistics BatchNorm): fastdw::dwconv_bn_act_train and its backward.
//
// Forward, two passes over x, nothing written between them (the conv is recomputed, which moves
// fewer bytes than storing z and reading it back):
//   1. stats: per output row (NHWC) or plane (NCHW), the per-channel mean and M2 = sum (z - mean)^2
//      of z in double; the partials are merged in a fixed order (Chan et al.'s pairwise formula),
//      so the result is deterministic and free of the sum / sum-of-squares cancellation.
//   2. the inference forward's epilogue with center = mean, scale = gamma * invstd, shift = beta:
//      u = (z - mean) * scale + beta, as BatchNorm computes it (no cancellation when |mean| >> std).
// Backward, two passes over (x, dy) (pre-activation recomputed):
//   A. S = sum gu * (z - mean), B = sum gu;  dgamma = invstd * S, dbeta = B
//   B. dz = scale * gu + lin * (z - mean) + cst, then dx and dweight from dz as in inference, with
//      lin = (2 * grad_var - gamma * invstd^3 * S) / M,  cst = (grad_mean - gamma * invstd * B) / M.
// invstd is computed in double from the returned (rounded) variance, in both passes.

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_train_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, c10::string_view act) {
  DwConvParams p{};
  check_train_and_fill(p, x_in, weight, bias, gamma, beta, stride, padding, dilation, eps, std::string(act), true);
  const auto fmt = p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor out = at::empty({p.N, p.C, p.OH, p.OW}, x.options().memory_format(fmt));
  const auto stat_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({p.C}, x.options().dtype(stat_dtype));
  at::Tensor var = at::empty({p.C}, x.options().dtype(stat_dtype));
  if (out.numel() == 0) {  // no values per channel: the statistics of an empty set
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {out, mean, var};
  }
  p.x_ptr = x.const_data_ptr();
  p.out_ptr = out.data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_act_train_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    auto cp = channel_params<acc_t>(weight, c10::nullopt, c10::nullopt, p.channels_last);
    std::vector<double> md(p.C), vd(p.C);
    isa_switch([&](auto k) { decltype(k)::template batch_stats<scalar_t>(p, cp, md.data(), vd.data()); });
    acc_t* m = mean.data_ptr<acc_t>();
    acc_t* v = var.data_ptr<acc_t>();
    const auto g = channel_vector<acc_t>(gamma, p.C, acc_t(1));
    const auto b = channel_vector<acc_t>(beta, p.C, acc_t(0));
    const auto cb = channel_vector<acc_t>(bias, p.C, acc_t(0));
    for (int64_t c = 0; c < p.C; ++c) {
      m[c] = static_cast<acc_t>(md[c]);
      v[c] = static_cast<acc_t>(vd[c]);
      const double invstd = 1.0 / std::sqrt(static_cast<double>(v[c]) + eps);
      cp.scale[c] = static_cast<acc_t>(static_cast<double>(g[c]) * invstd);
      cp.shift[c] = b[c];
      cp.center[c] = m[c];
    }
    isa_switch([&](auto k) { decltype(k)::template fwd<scalar_t>(p, cp); });
    for (int64_t c = 0; c < p.C; ++c) m[c] += cb[c];  // the mean of conv(x) + bias
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_train_backward_cpu(
    const at::Tensor& grad_y_in, const c10::optional<at::Tensor>& grad_mean, const c10::optional<at::Tensor>& grad_var,
    const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double eps, c10::string_view act,
    std::array<bool, 4> output_mask, bool deterministic) {
  (void)deterministic;  // the CPU reductions are always deterministic (fixed chunking)
  DwConvBwdParams p{};
  check_train_and_fill(p, x_in, weight, c10::nullopt, gamma, beta, stride, padding, dilation, eps, std::string(act),
                       true);
  check_grad_out(grad_y_in, x_in, p);
  check_train_stats(mean, var, grad_mean, grad_var, x_in);
  const bool has_gamma = gamma.has_value() && gamma->defined(), has_beta = beta.has_value() && beta->defined();
  const bool need_dx = output_mask[0], need_dw = output_mask[1];
  const bool need_dg = output_mask[2] && has_gamma, need_db = output_mask[3] && has_beta;
  const auto fmt = p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor dy = grad_y_in.contiguous(fmt);
  auto empty0 = [&](const at::TensorOptions& o) { return at::empty({0}, o); };
  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options().memory_format(fmt)) : empty0(x.options());
  at::Tensor dw_acc = f64_zeros({p.C, p.KH * p.KW}), dg_acc = f64_zeros({p.C}), db_acc = f64_zeros({p.C});
  const int64_t M = p.N * p.OH * p.OW;
  if (M > 0 && p.C > 0) {
    p.x_ptr = x.const_data_ptr();
    p.grad_out_ptr = dy.const_data_ptr();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_act_train_backward_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      auto cp = channel_params<acc_t>(weight, c10::nullopt, c10::nullopt, p.channels_last);
      const auto g = channel_vector<double>(gamma, p.C, 1.0);
      const auto b = channel_vector<acc_t>(beta, p.C, acc_t(0));
      const auto mu = channel_vector<acc_t>(mean, p.C, acc_t(0));
      const auto var_v = channel_vector<acc_t>(var, p.C, acc_t(0));
      const auto gm = channel_vector<double>(grad_mean, p.C, 0.0);
      const auto gv = channel_vector<double>(grad_var, p.C, 0.0);
      std::vector<double> invstd(p.C), scale(p.C);
      for (int64_t c = 0; c < p.C; ++c) {
        invstd[c] = 1.0 / std::sqrt(static_cast<double>(var_v[c]) + eps);
        scale[c] = g[c] * invstd[c];
        cp.scale[c] = static_cast<acc_t>(scale[c]);
        cp.shift[c] = b[c];
        cp.center[c] = mu[c];
      }
      // Pass A: S = sum gu * (z - mean), B = sum gu
      std::vector<double> S(p.C), B(p.C);
      p.grad_x_ptr = nullptr;
      isa_switch([&](auto k) { decltype(k)::template bwd<scalar_t, false>(p, cp, nullptr, S.data(), B.data()); });
      double* dgp = dg_acc.data_ptr<double>();
      double* dbp = db_acc.data_ptr<double>();
      for (int64_t c = 0; c < p.C; ++c) {
        dgp[c] = invstd[c] * S[c];
        dbp[c] = B[c];
      }
      // Pass B: dz -> dx, dweight
      if (need_dx || need_dw) {
        const double invM = 1.0 / static_cast<double>(M);
        cp.lin.resize(p.C);
        cp.cst.resize(p.C);
        for (int64_t c = 0; c < p.C; ++c) {
          const double is = invstd[c];
          cp.lin[c] = static_cast<acc_t>((2.0 * gv[c] - g[c] * is * is * is * S[c]) * invM);
          cp.cst[c] = static_cast<acc_t>((gm[c] - scale[c] * B[c]) * invM);
        }
        p.grad_x_ptr = need_dx ? dx.data_ptr() : nullptr;
        double* dwp = need_dw ? dw_acc.data_ptr<double>() : nullptr;
        isa_switch([&](auto k) { decltype(k)::template bwd<scalar_t, true>(p, cp, dwp, S.data(), B.data()); });
      }
    });
  } else if (need_dx) {
    dx.zero_();
  }
  at::Tensor dw = need_dw ? dw_acc.view(weight.sizes()).to(weight.scalar_type()) : empty0(weight.options());
  const auto dg_dtype = has_gamma ? gamma->scalar_type() : at::kFloat;
  const auto db_dtype = has_beta ? beta->scalar_type() : at::kFloat;
  at::Tensor dg = need_dg ? dg_acc.to(dg_dtype) : empty0(x.options().dtype(dg_dtype));
  at::Tensor db = need_db ? db_acc.to(db_dtype) : empty0(x.options().dtype(db_dtype));
  return {dx, dw, dg, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdw, CPU, m) {
  m.impl("dwconv_bn_act", &dwconv_bn_act_cpu);
  m.impl("_dwconv_bn_act_backward", &dwconv_bn_act_backward_cpu);
  m.impl("dwconv_bn_act_train", &dwconv_bn_act_train_cpu);
  m.impl("_dwconv_bn_act_train_backward", &dwconv_bn_act_train_backward_cpu);
}

}  // namespace cpu
}  // namespace fastdw
