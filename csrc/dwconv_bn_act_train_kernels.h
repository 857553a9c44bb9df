// Per-thread bodies of the GPU kernels of fastdw::dwconv_bn_act_train (batch-statistics
// BatchNorm) and its backward; wrapped in __global__ kernels by dwconv_bn_act_train_{fwd,bwd}.cu
// and emulated on the CPU by dwconv_bn_act_emulate.cpp, like dwconv_bn_act_kernels.h.
//
// Forward: 1. TrainStats: per (chunk of output rows, channel or channel vector), the count, mean
//             and M2 = sum (z - mean)^2 of z = conv(x) by the shifted-data algorithm (shift =
//             the chunk's first z: no sum / sum-of-squares cancellation); see train_stats;
//          2. TrainStatGroups, TrainStatFinish: the chunks merged in double, in a fixed order
//             (groups of about sqrt(chunks), then the groups) -> batch mean, biased variance,
//             and the per-channel algebra: scale = gamma * invstd and shift = beta written into
//             the packed parameters, mean + bias;
//          3. the inference forward (FwdVec / FwdGeneral) with center = mean, scale = gamma *
//             invstd, shift = beta: the conv is recomputed, nothing is stored in between.
// Backward (pass A and B bodies in dwconv_bn_act_bwd_kernels.h, the per-channel ones here):
//           0. TrainBwdPrep: scale, shift, center of each channel from gamma, beta, mean, var;
//           A. TrainBwdReduce: per chunk, sum gu and sum gu * (z - mean), gu = act'(u) * dy;
//              TrainBwdGroups, TrainBwdFinish: the chunks summed in double in a fixed order,
//              dgamma, dbeta and the coefficients lin, cst below;
//           B. dz = scale * gu + lin * (z - mean) + cst, folded into the fused backward (3x3) or
//              written by TrainBwdDz (fp32, one per output) for the inference backward's dx /
//              dweight kernels with scale 1.
// Nothing between the launches runs on the host: a call is these launches and no tensor ops.
#pragma once
#include "dwconv_bn_act_kernels.h"

namespace fastdw {
namespace kern {

struct StatArgs {
  Args a;
  const void* dy;          // backward reduce only: (N, C, OH, OW) in the op's layout
  double* part;            // (nchunks, 3, C) stats / (nchunks, 2, C) backward sums
  int64_t rows_per_chunk;  // chunks of the N*OH output rows
};

// z at (n, oh, ow) for V consecutive channels from c0: 16-byte packs of channels_last x when
// kVec (C % V == 0 and x aligned, checked by the host), one channel by conv_at otherwise.
template <typename scalar_t, bool kVec>
struct ChanVec {
  static constexpr int V = kVec ? Pack<scalar_t>::kVec : 1;
};

template <typename scalar_t, bool kVec>
FASTDW_HD void conv_vec_at(const Args& A, const scalar_t* x, int64_t n, int64_t c0, int64_t oh, int64_t ow,
                           float (&z)[ChanVec<scalar_t, kVec>::V]) {
  if constexpr (!kVec) {
    z[0] = conv_at<scalar_t>(A, x, n, c0, oh, ow);
  } else {
    using P = Pack<scalar_t>;
    const DwConvParams& p = A.p;
    for (int v = 0; v < P::kVec; ++v) z[v] = 0.f;
    for (int64_t kh = 0; kh < p.KH; ++kh) {
      const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dil_h;
      if (ih < 0 || ih >= p.H) continue;
      for (int64_t kw = 0; kw < p.KW; ++kw) {
        const int64_t iw = ow * p.stride_w - p.pad_w + kw * p.dil_w;
        if (iw < 0 || iw >= p.W) continue;
        const P xv = *reinterpret_cast<const P*>(x + ((n * p.H + ih) * p.W + iw) * p.C + c0);
        const float* wp = A.wt + (kh * p.KW + kw) * p.C + c0;
        for (int v = 0; v < P::kVec; ++v) z[v] += to_f(xv.v[v]) * wp[v];
      }
    }
  }
}

template <typename scalar_t, bool kVec>
FASTDW_HD void load_vec(const scalar_t* src, int64_t off, float (&out)[ChanVec<scalar_t, kVec>::V]) {
  if constexpr (!kVec) {
    out[0] = to_f(src[off]);
  } else {
    const Pack<scalar_t> v = *reinterpret_cast<const Pack<scalar_t>*>(src + off);
    for (int i = 0; i < Pack<scalar_t>::kVec; ++i) out[i] = to_f(v.v[i]);
  }
}

// Thread i of a per-(chunk, channel vector) kernel: first channel c0 = (i % (C / V)) * V, chunk
// i / (C / V) = output rows [r0, r1). Consecutive threads read consecutive channels of the same
// pixel (coalesced in channels_last).
struct ChunkThread {
  int64_t c0, chunk, r0, r1;
};

FASTDW_HD ChunkThread chunk_thread(const StatArgs& s, int64_t i, int V) {
  const DwConvParams& p = s.a.p;
  const int64_t ncv = p.C / V, chunk = i / ncv, rows = p.N * p.OH, r0 = chunk * s.rows_per_chunk;
  return {(i % ncv) * V, chunk, r0, r0 + s.rows_per_chunk < rows ? r0 + s.rows_per_chunk : rows};
}

template <typename scalar_t, bool kVec>
FASTDW_HD void train_stats(const StatArgs& s, int64_t i) {
  constexpr int V = ChanVec<scalar_t, kVec>::V;
  const DwConvParams& p = s.a.p;
  const auto [c0, chunk, r0, r1] = chunk_thread(s, i, V);
  const auto* x = static_cast<const scalar_t*>(s.a.p.x_ptr);
  float k[V];
  for (int v = 0; v < V; ++v) k[v] = 0.f;
  // s1 = sum z cancels to much less than its terms: CompSum (not of z - k: rounding z - k to fp32
  // drops k's low bits the same way for every term, a bias that grows with the count).
  // s2 = sum (z - k)^2, positive terms: BlockSum.
  CompSum<V> s1;
  BlockSum<V> s2;
  bool first = true;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / p.OH, oh = r % p.OH;
    for (int64_t ow = 0; ow < p.OW; ++ow) {
      float z[V];
      conv_vec_at<scalar_t, kVec>(s.a, x, n, c0, oh, ow, z);
      if (first) {
        for (int v = 0; v < V; ++v) k[v] = z[v];
        first = false;
      }
      for (int v = 0; v < V; ++v) {
        const float d = z[v] - k[v];
        s1.add(v, z[v]);
        s2.add(v, d * d);
      }
      s2.step();
    }
  }
  const double cnt = static_cast<double>((r1 > r0 ? r1 - r0 : 0) * p.OW);
  for (int v = 0; v < V; ++v) {
    const double mean = cnt > 0.0 ? s1.value(v) / cnt : 0.0, e = mean - static_cast<double>(k[v]);
    const double m2 = s2.value(v) - cnt * e * e;
    s.part[(chunk * 3 + 0) * p.C + c0 + v] = cnt;
    s.part[(chunk * 3 + 1) * p.C + c0 + v] = mean;
    s.part[(chunk * 3 + 2) * p.C + c0 + v] = m2 > 0.0 ? m2 : 0.0;
  }
}

// Chunks of the N*OH output rows for the per-(chunk, channel vector) kernels: about 64K threads
// (an H100 holds 132 x 2048), fixed by the shape and never by the device, so the results are
// bitwise repeatable.
FASTDW_HD void train_chunks(int64_t rows, int64_t cvecs, int64_t& nchunks, int64_t& rows_per_chunk) {
  const int64_t cv = cvecs > 0 ? cvecs : 1;
  int64_t want = (65536 + cv - 1) / cv;
  want = want < rows ? want : rows;
  rows_per_chunk = want > 0 ? (rows + want - 1) / want : 1;
  nchunks = rows > 0 ? (rows + rows_per_chunk - 1) / rows_per_chunk : 0;
}

// Groups for a two-stage fixed-order reduction of n partial results: about sqrt(n) groups of
// about sqrt(n) each, so both stages are short loops; fixed by the shape (never the device).
inline void sqrt_groups(int64_t n, int64_t& ngroups, int64_t& group) {
  int64_t g = 1;
  while (g * g < n) ++g;
  group = g;
  ngroups = n > 0 ? (n + g - 1) / g : 1;
}

FASTDW_HD void store_as(void* base, int64_t idx, int dtype, float v) {
  if (dtype == 1) {
    static_cast<c10::Half*>(base)[idx] = static_cast<c10::Half>(v);
  } else if (dtype == 2) {
    static_cast<c10::BFloat16*>(base)[idx] = static_cast<c10::BFloat16>(v);
  } else {
    static_cast<float*>(base)[idx] = v;
  }
}

// invstd in double from the variance as the forward returns it (fp32): 1 / sqrt, both correctly
// rounded (the same on the host and every GPU; the sums around it may differ in the last bit of
// a double, where nvcc contracts a multiply-add into an FMA and the host compiler does not).
FASTDW_HD double invstd_of(float var, double eps) { return 1.0 / sqrt(static_cast<double>(var) + eps); }

// The per-channel finish of the training forward and backward (one set of arguments for the
// group stage and the channel stage of each).
struct TrainFinishArgs {
  const double* part = nullptr;  // (nchunks, R, C): forward R = 3 (count, mean, M2), backward R = 2 (S, B)
  double* gpart = nullptr;       // (ngroups, R, C)
  int64_t C = 0, nchunks = 0, ngroups = 0, group = 0;
  double eps = 0.0, invM = 0.0;  // invM: 1 / (N * OH * OW)
  ChanParam bias, gamma, beta, mean, var, grad_mean, grad_var;
  // forward outputs: mean + bias, the mean itself (the conv's center; == mean_out without a
  // bias), the biased variance, and the packed parameters' scale and shift rows
  float* mean_out = nullptr;
  float* center = nullptr;
  float* var_out = nullptr;
  float* scale_row = nullptr;
  float* shift_row = nullptr;
  // backward: coef (5, C) = scale, shift, center (TrainBwdPrep), lin, cst (TrainBwdFinish);
  // dgamma / dbeta in their parameters' dtypes (nullptr: not wanted)
  float* coef = nullptr;
  void* dgamma = nullptr;
  void* dbeta = nullptr;
  int dg_dtype = 0, db_dtype = 0;
};

// Count, mean and M2 of the parts [t0, t1) of row block `in` (rows R, stride C), in order, by the
// two-pass parallel-axis form: mean = sum n_i m_i / n, M2 = sum M2_i + sum n_i (m_i - mean)^2.
FASTDW_HD void merge_stats(const double* in, int64_t t0, int64_t t1, int64_t C, int64_t c, double& n, double& mean,
                           double& m2) {
  double cnt = 0.0, s = 0.0;
  for (int64_t t = t0; t < t1; ++t) {
    const double ni = in[(t * 3 + 0) * C + c];
    cnt += ni;
    s += ni * in[(t * 3 + 1) * C + c];
  }
  const double m = cnt > 0.0 ? s / cnt : 0.0;
  double q = 0.0, d2 = 0.0;
  for (int64_t t = t0; t < t1; ++t) {
    const double ni = in[(t * 3 + 0) * C + c], d = in[(t * 3 + 1) * C + c] - m;
    q += in[(t * 3 + 2) * C + c];
    d2 += ni * d * d;
  }
  n = cnt;
  mean = m;
  m2 = q + d2;
}

// Forward finish, stage 1: thread (group gi, channel c), c fastest.
FASTDW_HD void train_stat_groups(const TrainFinishArgs& f, int64_t i) {
  const int64_t c = i % f.C, gi = i / f.C;
  const int64_t t0 = gi * f.group, t1 = t0 + f.group < f.nchunks ? t0 + f.group : f.nchunks;
  double n, mean, m2;
  merge_stats(f.part, t0, t1, f.C, c, n, mean, m2);
  f.gpart[(gi * 3 + 0) * f.C + c] = n;
  f.gpart[(gi * 3 + 1) * f.C + c] = mean;
  f.gpart[(gi * 3 + 2) * f.C + c] = m2;
}

// Forward finish, stage 2: thread c: the groups merged; mean and biased variance rounded to fp32
// (what the op returns), invstd from that variance in double, scale = gamma * invstd and shift =
// beta into the packed parameters, mean + bias.
FASTDW_HD void train_stat_finish(const TrainFinishArgs& f, int64_t c) {
  double n, mean, m2;
  merge_stats(f.gpart, 0, f.ngroups, f.C, c, n, mean, m2);
  const float m = static_cast<float>(mean), v = static_cast<float>(m2 / n);
  f.center[c] = m;
  f.var_out[c] = v;
  if (f.mean_out != f.center) f.mean_out[c] = m + chan_at(f.bias, c, 0.f);
  const double g = chan_at(f.gamma, c, 1.f);
  f.scale_row[c] = static_cast<float>(g * invstd_of(v, f.eps));
  f.shift_row[c] = chan_at(f.beta, c, 0.f);
}

// Backward, before pass A: thread c: coef rows scale (gamma * invstd), shift (beta), center (mean).
FASTDW_HD void train_bwd_prep(const TrainFinishArgs& f, int64_t c) {
  const double g = chan_at(f.gamma, c, 1.f);
  f.coef[c] = static_cast<float>(g * invstd_of(chan_at(f.var, c, 0.f), f.eps));
  f.coef[f.C + c] = chan_at(f.beta, c, 0.f);
  f.coef[2 * f.C + c] = chan_at(f.mean, c, 0.f);
}

// Backward finish, stage 1: thread (group gi, row j in {S, B}, channel c), c fastest: the group's
// chunks summed in order.
FASTDW_HD void train_bwd_groups(const TrainFinishArgs& f, int64_t i) {
  const int64_t c = i % f.C, j = (i / f.C) % 2, gi = i / (2 * f.C);
  const int64_t t0 = gi * f.group, t1 = t0 + f.group < f.nchunks ? t0 + f.group : f.nchunks;
  double s = 0.0;
  for (int64_t t = t0; t < t1; ++t) s += f.part[(t * 2 + j) * f.C + c];
  f.gpart[(gi * 2 + j) * f.C + c] = s;
}

// Backward finish, stage 2: thread c: S = sum gu * (z - mean), B = sum gu over the groups in
// order; dgamma = invstd * S, dbeta = B; the coefficients of dz = scale * gu + lin * (z - mean) +
// cst: lin = (2 * grad_var - gamma * invstd^3 * S) / M, cst = (grad_mean - scale * B) / M.
FASTDW_HD void train_bwd_finish(const TrainFinishArgs& f, int64_t c) {
  double S = 0.0, B = 0.0;
  for (int64_t gi = 0; gi < f.ngroups; ++gi) {
    S += f.gpart[(gi * 2 + 0) * f.C + c];
    B += f.gpart[(gi * 2 + 1) * f.C + c];
  }
  const double invstd = invstd_of(chan_at(f.var, c, 0.f), f.eps);
  const double g = chan_at(f.gamma, c, 1.f);
  if (f.dgamma != nullptr) store_as(f.dgamma, c, f.dg_dtype, static_cast<float>(invstd * S));
  if (f.dbeta != nullptr) store_as(f.dbeta, c, f.db_dtype, static_cast<float>(B));
  const double invstd3 = invstd * invstd * invstd;
  double lin = -(g * invstd3 * S);
  if (f.grad_var.p != nullptr) lin += 2.0 * static_cast<double>(chan_at(f.grad_var, c, 0.f));
  double cst = -(g * invstd * B);
  if (f.grad_mean.p != nullptr) cst += static_cast<double>(chan_at(f.grad_mean, c, 0.f));
  f.coef[3 * f.C + c] = static_cast<float>(lin * f.invM);
  f.coef[4 * f.C + c] = static_cast<float>(cst * f.invM);
}

template <typename scalar_t, bool kVec>
struct TrainStats {
  static FASTDW_HD void body(const StatArgs& s, int64_t i) { train_stats<scalar_t, kVec>(s, i); }
};
struct TrainStatGroups {
  static FASTDW_HD void body(const TrainFinishArgs& f, int64_t i) { train_stat_groups(f, i); }
};
struct TrainStatFinish {
  static FASTDW_HD void body(const TrainFinishArgs& f, int64_t i) { train_stat_finish(f, i); }
};
struct TrainBwdPrep {
  static FASTDW_HD void body(const TrainFinishArgs& f, int64_t i) { train_bwd_prep(f, i); }
};
struct TrainBwdGroups {
  static FASTDW_HD void body(const TrainFinishArgs& f, int64_t i) { train_bwd_groups(f, i); }
};
struct TrainBwdFinish {
  static FASTDW_HD void body(const TrainFinishArgs& f, int64_t i) { train_bwd_finish(f, i); }
};

}  // namespace kern
}  // namespace fastdw
