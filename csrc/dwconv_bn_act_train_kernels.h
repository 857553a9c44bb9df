// Per-thread bodies of the GPU kernels of fastdw::dwconv_bn_act_train (batch-statistics
// BatchNorm) and its backward; wrapped in __global__ kernels by dwconv_bn_act_train_{fwd,bwd}.cu
// and emulated on the CPU by dwconv_bn_act_emulate.cpp, like dwconv_bn_act_kernels.h.
//
// Forward: 1. TrainStats: per (chunk of output rows, channel or channel vector), the count, mean
//             and M2 = sum (z - mean)^2 of z = conv(x) by the shifted-data algorithm (shift =
//             the chunk's first z: no sum / sum-of-squares cancellation); see train_stats;
//          2. (host) the chunks merged in order (Chan et al.) -> batch mean, biased variance;
//          3. the inference forward (FwdVec / FwdGeneral) with center = mean, scale = gamma *
//             invstd, shift = beta: the conv is recomputed, nothing is stored in between.
// Backward (bodies in dwconv_bn_act_bwd_kernels.h):
//           A. TrainBwdReduce: per chunk, sum gu and sum gu * (z - mean), gu = act'(u) * dy;
//           B. dz = scale * gu + lin * (z - mean) + cst, folded into the fused backward (3x3) or
//              written by TrainBwdDz (fp32, one per output) for the inference backward's dx /
//              dweight kernels with scale 1.
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

template <typename scalar_t, bool kVec>
struct TrainStats {
  static FASTDW_HD void body(const StatArgs& s, int64_t i) { train_stats<scalar_t, kVec>(s, i); }
};

}  // namespace kern
}  // namespace fastdw
