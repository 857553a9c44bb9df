// Per-thread bodies of the GPU kernels of fastdw::dwconv_bn_act and its backward.
//
// Each body computes what one CUDA thread computes, given its linear thread index. The .cu files
// wrap them in __global__ kernels (dwconv_bn_act_fwd.cu, dwconv_bn_act_bwd.cu); the host
// emulation (dwconv_bn_act_emulate.cpp) runs the same bodies in loops over every thread index on
// the CPU, so the indexing, bounds, vector paths and reductions are tested without a GPU.
// Bodies use no shared memory, barriers or atomics, which is what makes that emulation exact.
//
// Math: z = sum_{kh,kw} x[n, c, oh*sh-ph+kh*dh, ow*sw-pw+kw*dw] * w[c, kh, kw] (fp32)
//       y = act(z * scale[c] + shift[c])   ((z - center[c]) * scale + shift in training mode)
// Backward (the pre-activation is recomputed, never saved):
//       gu = dy * act'(u)                 (kernel 1, one fp32 value per output element)
//       dx = sum_taps gu * scale[c] * w   (kernel 2, gather form: each thread one dx element)
//       G[c, t] = sum gu * x_tap, G[c, T] = sum gu   (kernel 3: fixed chunks -> partials;
//       kernel 4 adds the chunks in order: deterministic, no atomics)
//       dweight = scale * G[:, :T],  dshift = G[:, T],  dscale = sum_t w[c, t] * G[c, t]
// Every such sum is a BlockSum within a thread and double across threads: about as accurate as
// the fp32 terms themselves, whatever the shape.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "activations.h"
#include "params.h"

namespace fastdw {
namespace kern {

// Parameters of the GPU kernels: the op's sizes plus fp32 copies of the per-channel data.
struct Args {
  DwConvParams p;
  const float* wt;     // (KH*KW, C): weights transposed so the channel index is contiguous
  const float* scale;  // (C,), 1 when absent
  const float* shift;  // (C,), 0 when absent
  // Training mode only, nullptr otherwise: the batch mean of z (the forward then computes
  // u = (z - center) * scale + shift, BatchNorm's order: folding the mean into the shift would
  // cancel digits when |mean| >> std) and the coefficients of dz = scale * gu + lin * (z - center)
  // + cst in the backward (dwconv_bn_act_train_kernels.h).
  const float* center = nullptr;
  const float* lin = nullptr;
  const float* cst = nullptr;
};

struct BwdArgs {
  Args a;
  const void* dy;     // (N, C, OH, OW) in the op's layout
  float* gu;          // (N, C, OH, OW) fp32 workspace, same layout
  void* dx;           // (N, C, H, W) or nullptr
  double* partial;    // (nchunks, T+1, C) workspace
  int64_t nchunks, rows_per_chunk;  // chunks of the N*OH output rows
};

template <typename T>
FASTDW_HD float to_f(T v) {
  return static_cast<float>(v);
}

// A sum of many fp32 terms (the per-channel reductions). A plain fp32 sum of n terms loses about
// sqrt(n) ulps; here fp32 blocks of kSumBlock terms are folded into an unevaluated (hi, lo) pair
// by TwoSum (Knuth), which carries about twice fp32's precision without fp64 arithmetic (slow on
// most GPUs), and the result leaves the thread as a double. V lanes share one block counter.
// (Host compilers and nvcc keep the TwoSum order: no fast-math reassociation is enabled.)
constexpr int kSumBlock = 16;

template <int V>
struct BlockSum {
  float blk[V], hi[V], lo[V];
  int n;
  FASTDW_HD BlockSum() : n(0) {
    for (int v = 0; v < V; ++v) blk[v] = hi[v] = lo[v] = 0.f;
  }
  FASTDW_HD void fold() {
    for (int v = 0; v < V; ++v) {
      const float t = hi[v] + blk[v], bp = t - hi[v];
      lo[v] += (hi[v] - (t - bp)) + (blk[v] - bp);
      hi[v] = t;
      blk[v] = 0.f;
    }
    n = 0;
  }
  // Adds one term per lane; step() ends the terms of one round (every lane added one).
  FASTDW_HD void add(int v, float x) { blk[v] += x; }
  FASTDW_HD void step() {
    if (++n == kSumBlock) fold();
  }
  FASTDW_HD double value(int v) {
    if (n > 0) fold();
    return static_cast<double>(hi[v]) + static_cast<double>(lo[v]);
  }
};

// TwoSum on every term: for sums of random-signed terms that cancel to much less than the terms
// (a batch mean next to a large spread), where even a 16-term fp32 block adds about 3 ulps of the
// spread. Six flops per term instead of one.
template <int V>
struct CompSum {
  float hi[V], lo[V];
  FASTDW_HD CompSum() {
    for (int v = 0; v < V; ++v) hi[v] = lo[v] = 0.f;
  }
  FASTDW_HD void add(int v, float x) {
    const float t = hi[v] + x, bp = t - hi[v];
    lo[v] += (hi[v] - (t - bp)) + (x - bp);
    hi[v] = t;
  }
  FASTDW_HD double value(int v) const { return static_cast<double>(hi[v]) + static_cast<double>(lo[v]); }
};

// Element offset of (n, c, h, w) in a dense NCHW or NHWC tensor of spatial size hs x ws.
FASTDW_HD int64_t offset(bool cl, int64_t n, int64_t c, int64_t h, int64_t w, int64_t C, int64_t hs,
                         int64_t ws) {
  return cl ? ((n * hs + h) * ws + w) * C + c : ((n * C + c) * hs + h) * ws + w;
}

// Decodes a linear output index in memory order of the layout.
FASTDW_HD void decode(bool cl, int64_t i, int64_t C, int64_t hs, int64_t ws, int64_t& n, int64_t& c,
                      int64_t& h, int64_t& w) {
  if (cl) {
    c = i % C; i /= C;
    w = i % ws; i /= ws;
    h = i % hs; n = i / hs;
  } else {
    w = i % ws; i /= ws;
    h = i % hs; i /= hs;
    c = i % C; n = i / C;
  }
}

// Pre-activation z at one output element, any kernel / stride / dilation / layout.
template <typename scalar_t>
FASTDW_HD float conv_at(const Args& A, const scalar_t* x, int64_t n, int64_t c, int64_t oh, int64_t ow) {
  const DwConvParams& p = A.p;
  float z = 0.f;
  for (int64_t kh = 0; kh < p.KH; ++kh) {
    const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dil_h;
    if (ih < 0 || ih >= p.H) continue;
    for (int64_t kw = 0; kw < p.KW; ++kw) {
      const int64_t iw = ow * p.stride_w - p.pad_w + kw * p.dil_w;
      if (iw < 0 || iw >= p.W) continue;
      z += to_f(x[offset(p.channels_last, n, c, ih, iw, p.C, p.H, p.W)]) * A.wt[(kh * p.KW + kw) * p.C + c];
    }
  }
  return z;
}

// ---------------------------------------------------------------------------------------------
// Forward, general path: one thread per output element, in the output's memory order (so a warp
// writes consecutive addresses in both layouts). Any kernel, stride, padding, dilation, C.
template <typename scalar_t, Act A>
FASTDW_HD void fwd_general(const Args& a, int64_t i) {
  const DwConvParams& p = a.p;
  int64_t n, c, oh, ow;
  decode(p.channels_last, i, p.C, p.OH, p.OW, n, c, oh, ow);
  const auto* x = static_cast<const scalar_t*>(p.x_ptr);
  const float z = conv_at<scalar_t>(a, x, n, c, oh, ow);
  const float zc = a.center != nullptr ? z - a.center[c] : z;
  static_cast<scalar_t*>(p.out_ptr)[i] = static_cast<scalar_t>(act_fwd<A>(zc * a.scale[c] + a.shift[c]));
}

// 16-byte packs: kVec elements of scalar_t moved by one 128-bit load / store.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kVec = 16 / sizeof(scalar_t);
  scalar_t v[kVec];
};

// Forward, channels_last fast path for a KxK kernel: one thread computes kTileW consecutive
// output columns of one output row for kVec consecutive channels (8 fp16/bf16, 4 fp32). Thread
// index order is channel-vector fastest, so the 32 threads of a warp read and write 512
// contiguous bytes per pixel (four full 128-byte lines). Requires C % kVec == 0 and 16-byte
// aligned x and y. An input vector shared by neighbouring output columns of the tile is read
// from L1 after the first touch.
template <typename scalar_t, Act A, int K, int kTileW>
FASTDW_HD void fwd_nhwc_vec(const Args& a, int64_t i) {
  using P = Pack<scalar_t>;
  constexpr int V = P::kVec;
  const DwConvParams& p = a.p;
  const int64_t nvec = p.C / V, ntiles = (p.OW + kTileW - 1) / kTileW;
  const int64_t cv = i % nvec;
  const int64_t tile = (i / nvec) % ntiles;
  const int64_t row = i / (nvec * ntiles);  // n * OH + oh
  const int64_t n = row / p.OH, oh = row % p.OH, ow0 = tile * kTileW, c0 = cv * V;
  const auto* x = static_cast<const scalar_t*>(p.x_ptr);
  float acc[kTileW][V];
  for (int t = 0; t < kTileW; ++t)
    for (int v = 0; v < V; ++v) acc[t][v] = 0.f;
  for (int kh = 0; kh < K; ++kh) {
    const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dil_h;
    if (ih < 0 || ih >= p.H) continue;
    const scalar_t* xrow = x + (n * p.H + ih) * p.W * p.C + c0;
    for (int kw = 0; kw < K; ++kw) {
      float wv[V];
      const float* wp = a.wt + (kh * K + kw) * p.C + c0;
      for (int v = 0; v < V; ++v) wv[v] = wp[v];
      for (int t = 0; t < kTileW; ++t) {
        const int64_t iw = (ow0 + t) * p.stride_w - p.pad_w + kw * p.dil_w;
        if (ow0 + t >= p.OW || iw < 0 || iw >= p.W) continue;
        const P xv = *reinterpret_cast<const P*>(xrow + iw * p.C);
        for (int v = 0; v < V; ++v) acc[t][v] += wv[v] * to_f(xv.v[v]);
      }
    }
  }
  float sc[V], sh[V], ce[V];
  for (int v = 0; v < V; ++v) {
    sc[v] = a.scale[c0 + v];
    ce[v] = a.center != nullptr ? a.center[c0 + v] : 0.f;
    sh[v] = a.shift[c0 + v];
  }
  auto* y = static_cast<scalar_t*>(p.out_ptr) + (row * p.OW + ow0) * p.C + c0;
  for (int t = 0; t < kTileW; ++t) {
    if (ow0 + t >= p.OW) break;
    P out;
    for (int v = 0; v < V; ++v) out.v[v] = static_cast<scalar_t>(act_fwd<A>((acc[t][v] - ce[v]) * sc[v] + sh[v]));
    *reinterpret_cast<P*>(y + t * p.C) = out;
  }
}

template <typename scalar_t, int kTileW>
inline int64_t fwd_nhwc_vec_threads(const DwConvParams& p) {
  return p.N * p.OH * ((p.OW + kTileW - 1) / kTileW) * (p.C / Pack<scalar_t>::kVec);
}

// ---------------------------------------------------------------------------------------------
// Backward

// Kernel 1: gu = dy * act'(z * scale + shift), one thread per output element (memory order).
template <typename scalar_t, Act A>
FASTDW_HD void bwd_gu(const BwdArgs& b, int64_t i) {
  const DwConvParams& p = b.a.p;
  int64_t n, c, oh, ow;
  decode(p.channels_last, i, p.C, p.OH, p.OW, n, c, oh, ow);
  const auto* x = static_cast<const scalar_t*>(p.x_ptr);
  const float z = conv_at<scalar_t>(b.a, x, n, c, oh, ow);
  const float g = to_f(static_cast<const scalar_t*>(b.dy)[i]);
  b.gu[i] = act_bwd<A>(z * b.a.scale[c] + b.a.shift[c], g);
}

// Kernel 2: dx[n, c, ih, iw] = scale[c] * sum over the taps whose output (oh, ow) exists of
// gu[n, c, oh, ow] * w[c, kh, kw]; one thread per input element (gather: no write conflicts).
template <typename scalar_t>
FASTDW_HD void bwd_dx(const BwdArgs& b, int64_t i) {
  const DwConvParams& p = b.a.p;
  int64_t n, c, ih, iw;
  decode(p.channels_last, i, p.C, p.H, p.W, n, c, ih, iw);
  float s = 0.f;
  for (int64_t kh = 0; kh < p.KH; ++kh) {
    const int64_t hn = ih + p.pad_h - kh * p.dil_h;
    if (hn < 0 || hn % p.stride_h != 0) continue;
    const int64_t oh = hn / p.stride_h;
    if (oh >= p.OH) continue;
    for (int64_t kw = 0; kw < p.KW; ++kw) {
      const int64_t wn = iw + p.pad_w - kw * p.dil_w;
      if (wn < 0 || wn % p.stride_w != 0) continue;
      const int64_t ow = wn / p.stride_w;
      if (ow >= p.OW) continue;
      s += b.gu[offset(p.channels_last, n, c, oh, ow, p.C, p.OH, p.OW)] * b.a.wt[(kh * p.KW + kw) * p.C + c];
    }
  }
  static_cast<scalar_t*>(b.dx)[i] = static_cast<scalar_t>(s * b.a.scale[c]);
}

// Kernel 3: partial[chunk, j, c] = sum over the output positions of rows chunk*rpc .. of
// gu * x_tap(j) (j < T) or gu (j == T). Thread index: c fastest, then j, then chunk, so a warp
// reads consecutive channels (coalesced in channels_last).
template <typename scalar_t>
FASTDW_HD void bwd_partial(const BwdArgs& b, int64_t i) {
  const DwConvParams& p = b.a.p;
  const int64_t T = p.KH * p.KW;
  const int64_t c = i % p.C;
  const int64_t j = (i / p.C) % (T + 1);
  const int64_t chunk = i / (p.C * (T + 1));
  const int64_t kh = j / p.KW, kw = j % p.KW;
  const auto* x = static_cast<const scalar_t*>(p.x_ptr);
  const int64_t r_begin = chunk * b.rows_per_chunk;
  const int64_t r_end = r_begin + b.rows_per_chunk < p.N * p.OH ? r_begin + b.rows_per_chunk : p.N * p.OH;
  BlockSum<1> s;
  if (j == T) {  // dshift: sum of gu
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t n = r / p.OH, oh = r % p.OH;
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        s.add(0, b.gu[offset(p.channels_last, n, c, oh, ow, p.C, p.OH, p.OW)]);
        s.step();
      }
    }
  } else {  // tap j: sum of gu * x at that tap, over the positions where the tap is inside x
    const int64_t ow_lo_num = p.pad_w - kw * p.dil_w;  // ow*sw >= this  <=>  iw >= 0
    const int64_t ow_lo = ow_lo_num <= 0 ? 0 : (ow_lo_num + p.stride_w - 1) / p.stride_w;
    const int64_t ow_hi_num = p.W - 1 + p.pad_w - kw * p.dil_w;  // ow*sw <= this  <=>  iw < W
    const int64_t ow_hi = ow_hi_num < 0 ? 0 : (ow_hi_num / p.stride_w + 1 < p.OW ? ow_hi_num / p.stride_w + 1 : p.OW);
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t n = r / p.OH, oh = r % p.OH;
      const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dil_h;
      if (ih < 0 || ih >= p.H) continue;
      for (int64_t ow = ow_lo; ow < ow_hi; ++ow) {
        const int64_t iw = ow * p.stride_w - p.pad_w + kw * p.dil_w;
        s.add(0, b.gu[offset(p.channels_last, n, c, oh, ow, p.C, p.OH, p.OW)] *
                     to_f(x[offset(p.channels_last, n, c, ih, iw, p.C, p.H, p.W)]));
        s.step();
      }
    }
  }
  b.partial[i] = s.value(0);
}

// Kernel 4: one thread per channel adds the chunk partials in chunk order, in double
// (deterministic), and forms dweight (weight dtype), dscale and dshift (fp32).
template <typename weight_t>
FASTDW_HD void bwd_finish(const BwdArgs& b, weight_t* dw, float* dscale, float* dshift, int64_t c) {
  const DwConvParams& p = b.a.p;
  const int64_t T = p.KH * p.KW;
  double ds = 0.0;
  for (int64_t j = 0; j <= T; ++j) {
    double g = 0.0;
    for (int64_t k = 0; k < b.nchunks; ++k) g += b.partial[(k * (T + 1) + j) * p.C + c];
    if (j == T) {
      if (dshift != nullptr) dshift[c] = static_cast<float>(g);
    } else {
      if (dw != nullptr) dw[c * T + j] = static_cast<weight_t>(static_cast<float>(g * b.a.scale[c]));
      ds += g * b.a.wt[j * p.C + c];
    }
  }
  if (dscale != nullptr) dscale[c] = static_cast<float>(ds);
}

struct FinishArgs {
  BwdArgs b;
  void* dw;       // (C, 1, KH, KW) in the weight dtype, or nullptr
  float* dscale;  // (C,) or nullptr
  float* dshift;  // (C,) or nullptr
};

// Chunking of the N*OH output rows for kernel 3: fixed by the shape (never by the device), so
// results are bitwise repeatable across runs and GPUs.
FASTDW_HD void bwd_chunks(int64_t rows, int64_t& nchunks, int64_t& rows_per_chunk) {
  const int64_t want = rows < 256 ? rows : 256;
  rows_per_chunk = want > 0 ? (rows + want - 1) / want : 1;
  nchunks = rows_per_chunk > 0 ? (rows + rows_per_chunk - 1) / rows_per_chunk : 0;
}

// The forward path the launcher takes (one rule for the GPU and its emulation).
enum class FwdPath { General, NhwcVec3, NhwcVec5, NhwcVec7 };

inline FwdPath select_fwd_path(const DwConvParams& p, int elem_size, bool aligned16) {
  const int vec = 16 / elem_size;
  if (!p.channels_last || !aligned16 || p.C % vec != 0 || p.KH != p.KW) return FwdPath::General;
  if (p.KH == 3) return FwdPath::NhwcVec3;
  if (p.KH == 5) return FwdPath::NhwcVec5;
  if (p.KH == 7) return FwdPath::NhwcVec7;
  return FwdPath::General;
}

constexpr int kTileW = 4;

// ---------------------------------------------------------------------------------------------
// Kernel tags: Tag::body(args, i) is what thread i runs. One __global__ template launches any tag
// on the GPU (cuda_exec.cuh); the CPU emulation loops over i.

template <typename scalar_t, Act A, int K>
struct FwdVec {
  static FASTDW_HD void body(const Args& a, int64_t i) { fwd_nhwc_vec<scalar_t, A, K, kTileW>(a, i); }
};
template <typename scalar_t, Act A>
struct FwdGeneral {
  static FASTDW_HD void body(const Args& a, int64_t i) { fwd_general<scalar_t, A>(a, i); }
};
template <typename scalar_t, Act A>
struct BwdGu {
  static FASTDW_HD void body(const BwdArgs& b, int64_t i) { bwd_gu<scalar_t, A>(b, i); }
};
template <typename scalar_t>
struct BwdDx {
  static FASTDW_HD void body(const BwdArgs& b, int64_t i) { bwd_dx<scalar_t>(b, i); }
};
template <typename scalar_t>
struct BwdPartial {
  static FASTDW_HD void body(const BwdArgs& b, int64_t i) { bwd_partial<scalar_t>(b, i); }
};
template <typename weight_t>
struct BwdFinish {
  static FASTDW_HD void body(const FinishArgs& f, int64_t c) {
    bwd_finish<weight_t>(f.b, static_cast<weight_t*>(f.dw), f.dscale, f.dshift, c);
  }
};

}  // namespace kern
}  // namespace fastdw
