// Per-thread bodies of the GPU kernels of fastdw::dwconv_bn_act and its backward.
//
// Each body computes what one CUDA thread computes, given its linear thread index. The .cu files
// wrap them in __global__ kernels (dwconv_bn_act_fwd.cu, dwconv_bn_act_train_fwd.cu); the host
// emulation (dwconv_bn_act_emulate.cpp) runs the same bodies in loops over every thread index on
// the CPU, so the indexing, bounds, vector paths and reductions are tested without a GPU.
// Bodies use no shared memory, barriers or atomics, which is what makes that emulation exact.
//
// Math: z = sum_{kh,kw} x[n, c, oh*sh-ph+kh*dh, ow*sw-pw+kw*dw] * w[c, kh, kw] (fp32)
//       y = act(z * scale[c] + shift[c])   ((z - center[c]) * scale + shift in training mode)
// The backward's bodies are in dwconv_bn_act_bwd_kernels.h.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "activations.h"
#include "params.h"

// Loops with compile-time trip counts in the fast paths are unrolled on the device (register
// arrays indexed by constants only); the host compiler (emulation) decides for itself.
#if defined(__CUDA_ARCH__)
#define FASTDW_UNROLL _Pragma("unroll")
#else
#define FASTDW_UNROLL
#endif

namespace fastdw {
namespace kern {

// Parameters of the GPU kernels: the op's sizes plus fp32 copies of the per-channel data.
// Division of a non-negative int32 n (< 2^31) by a fixed divisor d >= 1 as a multiply-high, an
// add and a shift (the round-up method of Granlund and Montgomery, as in PyTorch's IntDivider):
// a runtime int32 division is a ~20-instruction subroutine on the GPU.
struct FastDiv {
  uint32_t d = 1, m = 0, shift = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t div) : d(div) {
    while (shift < 32 && (uint32_t(1) << shift) < d) ++shift;
    const uint64_t one = 1;
    m = static_cast<uint32_t>(((one << 32) * ((one << shift) - d)) / d + 1);
  }
  FASTDW_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(n, m);
#else
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * m) >> 32);
#endif
    return (t + n) >> shift;
  }
};

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
  // fwd_nhwc_win's thread decode: channel vectors, column strips, row strips (set by the launcher)
  FastDiv div_vec, div_tw, div_th;
  // fwd_scalar_win with dilation: the output phases per axis (1 without dilation) and the
  // dilations, see there
  FastDiv div_ph, div_pw, div_dh, div_dw;
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

// fp32 values of a 16-byte pack (8 fp16 / bf16 or 4 fp32), one conversion per element.
template <typename scalar_t>
FASTDW_HD void unpack(const Pack<scalar_t>& v, float (&out)[Pack<scalar_t>::kVec]) {
  FASTDW_UNROLL
  for (int j = 0; j < Pack<scalar_t>::kVec; ++j) out[j] = to_f(v.v[j]);
}

// kVec consecutive fp32 values with 16-byte loads (p 16-byte aligned).
template <int V>
FASTDW_HD void load_f32(const float* p, float (&out)[V]) {
  static_assert(V % 4 == 0, "16-byte loads of fp32");
  FASTDW_UNROLL
  for (int j = 0; j < V; j += 4) {
    const Pack<float> q = *reinterpret_cast<const Pack<float>*>(p + j);
    for (int u = 0; u < 4; ++u) out[j + u] = q.v[u];
  }
}

// Forward, channels_last fast path: a K x K kernel at stride S, both compile-time, every tap
// unrolled, no dilation. Thread = one channel vector (kVec channels: one 16-byte load or store) x
// a strip of kTW output columns x kTH output rows. The thread walks down its strip: input row r of
// the strip ((kTH-1)*S + K rows in all) goes into slot r % K of a rolling fp32 window of K rows x
// kCols columns, so each input vector of the strip is loaded and converted once, and a row's loads
// are issued together before the FMAs that consume them; output row j is computed as soon as its
// last input row (j*S + K - 1) is in. Taps outside the image read zeros (the padding).
// A strip whose whole input window lies inside the image (the common case) runs a copy of the
// body with no bounds tests and compile-time address offsets; border strips test rows, columns
// and outputs. Thread index: channel vector fastest, then the column strip, then the row strip,
// then n, so a warp reads 32 consecutive 16-byte vectors (512 B) of one pixel row when
// C >= 32 * kVec, or the channels of neighbouring pixels for smaller C; weights and the BN
// affine come from the packed fp32 buffer (PackParams) with 16-byte loads. Offsets are int32: the
// host sends larger images elsewhere (select_fwd_path).
// kCenter: u = (z - center) * scale + shift (training: the batch mean kept apart, see Args).
struct alignas(16) Words16 {
  uint32_t w[4];
};

template <typename scalar_t, Act A, int K, int S, int kTH, int kTW, bool kCenter, bool kInterior>
FASTDW_HD void fwd_nhwc_win_strip(const DwConvParams& p, const scalar_t* xs, scalar_t* ys, int32_t ih0, int32_t iw0,
                                  int32_t oh0, int32_t ow0, const float (&w)[K * K][Pack<scalar_t>::kVec],
                                  const float (&sc)[Pack<scalar_t>::kVec], const float (&sh)[Pack<scalar_t>::kVec],
                                  const float (&ce)[Pack<scalar_t>::kVec]) {
  using P = Pack<scalar_t>;
  constexpr int V = P::kVec;
  constexpr int kCols = (kTW - 1) * S + K;
  constexpr int kRows = (kTH - 1) * S + K;
  const int32_t C = static_cast<int32_t>(p.C), H = static_cast<int32_t>(p.H), W = static_cast<int32_t>(p.W);
  const int32_t OH = static_cast<int32_t>(p.OH), OW = static_cast<int32_t>(p.OW);
  // xs: the strip's top-left input (ih0, iw0), ys: its first output (oh0, ow0), at channel c0.
  // One pointer per window column, advanced by a row each row: one 64-bit add per load.
  bool col_ok[kCols];
  const scalar_t* colp[kCols];
  FASTDW_UNROLL
  for (int q = 0; q < kCols; ++q) {
    col_ok[q] = kInterior || (iw0 + q >= 0 && iw0 + q < W);
    colp[q] = xs + q * C;
  }
  const int32_t row_stride = W * C;
  float win[K][kCols][V];
  FASTDW_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const bool row_ok = kInterior || (ih0 + r >= 0 && ih0 + r < H);
    Words16 raw[kCols];
    FASTDW_UNROLL
    for (int q = 0; q < kCols; ++q) {  // the row's loads first, then the conversions
      if (row_ok && col_ok[q]) {
#if defined(__CUDA_ARCH__)
        raw[q] = *reinterpret_cast<const Words16*>(colp[q]);
#else
        memcpy(&raw[q], colp[q], sizeof(Words16));  // the emulation: no aliasing of scalar_t objects
#endif
      } else {
        raw[q] = Words16{{0u, 0u, 0u, 0u}};
      }
      colp[q] += row_stride;
    }
    FASTDW_UNROLL
    for (int q = 0; q < kCols; ++q) {
      P pk;
      memcpy(&pk, &raw[q], sizeof(P));
      unpack<scalar_t>(pk, win[r % K][q]);
    }
    if (r < K - 1 || (r - (K - 1)) % S != 0) continue;
    const int jr = (r - (K - 1)) / S;  // the output row this input row completes
    if (!kInterior && oh0 + jr >= OH) break;  // and every later row of the strip
    scalar_t* yr = ys + jr * (OW * C);
    FASTDW_UNROLL
    for (int tc = 0; tc < kTW; ++tc) {
      float acc[V];
      FASTDW_UNROLL
      for (int v = 0; v < V; ++v) acc[v] = 0.f;
      FASTDW_UNROLL
      for (int kh = 0; kh < K; ++kh)
        FASTDW_UNROLL
        for (int kw = 0; kw < K; ++kw)
          FASTDW_UNROLL
          for (int v = 0; v < V; ++v) acc[v] += w[kh * K + kw][v] * win[(jr * S + kh) % K][tc * S + kw][v];
      if (kInterior || ow0 + tc < OW) {
        P out;
        FASTDW_UNROLL
        for (int v = 0; v < V; ++v) {
          const float z = kCenter ? acc[v] - ce[v] : acc[v];
          const float u = z * sc[v] + sh[v];
          if constexpr (std::is_same_v<scalar_t, float>) {
            out.v[v] = act_fwd<A>(u);
          } else {
            out.v[v] = static_cast<scalar_t>(act_fwd_lowp<A>(u));
          }
        }
        *reinterpret_cast<P*>(yr + tc * C) = out;
      }
    }
  }
}

template <typename scalar_t, Act A, int K, int S, int kTH, int kTW, bool kCenter>
FASTDW_HD void fwd_nhwc_win(const Args& a, int64_t i) {
  using P = Pack<scalar_t>;
  constexpr int V = P::kVec;
  constexpr int kCols = (kTW - 1) * S + K;
  constexpr int kRows = (kTH - 1) * S + K;
  const DwConvParams& p = a.p;
  const int32_t C = static_cast<int32_t>(p.C), H = static_cast<int32_t>(p.H), W = static_cast<int32_t>(p.W);
  const int32_t OW = static_cast<int32_t>(p.OW);
  // i = ((n * nth + sh) * ntw + sw) * nvec + cv, decoded with the launcher's FastDivs
  const uint32_t i0 = static_cast<uint32_t>(i), i1 = a.div_vec.div(i0), i2 = a.div_tw.div(i1), i3 = a.div_th.div(i2);
  const int32_t cv = static_cast<int32_t>(i0 - i1 * a.div_vec.d), sw = static_cast<int32_t>(i1 - i2 * a.div_tw.d);
  const int32_t sh = static_cast<int32_t>(i2 - i3 * a.div_th.d);
  const int64_t n = i3;
  const int32_t c0 = cv * V, ow0 = sw * kTW, oh0 = sh * kTH;
  const int32_t iw0 = ow0 * S - static_cast<int32_t>(p.pad_w), ih0 = oh0 * S - static_cast<int32_t>(p.pad_h);
  const scalar_t* xs = static_cast<const scalar_t*>(p.x_ptr) + n * p.H * p.W * p.C + ((ih0 * W + iw0) * C + c0);
  scalar_t* ys = static_cast<scalar_t*>(p.out_ptr) + n * p.OH * p.OW * p.C + ((oh0 * OW + ow0) * C + c0);

  float w[K * K][V], sc[V], sh_[V], ce[V];
  FASTDW_UNROLL
  for (int tap = 0; tap < K * K; ++tap) load_f32<V>(a.wt + tap * p.C + c0, w[tap]);
  load_f32<V>(a.scale + c0, sc);
  load_f32<V>(a.shift + c0, sh_);
  if constexpr (kCenter) {
    load_f32<V>(a.center + c0, ce);
  } else {
    FASTDW_UNROLL
    for (int v = 0; v < V; ++v) ce[v] = 0.f;
  }
  // A window inside the image also means every output of the strip exists.
  const bool interior = ih0 >= 0 && ih0 + kRows <= H && iw0 >= 0 && iw0 + kCols <= W;
  if (interior) {
    fwd_nhwc_win_strip<scalar_t, A, K, S, kTH, kTW, kCenter, true>(p, xs, ys, ih0, iw0, oh0, ow0, w, sc, sh_, ce);
  } else {
    fwd_nhwc_win_strip<scalar_t, A, K, S, kTH, kTW, kCenter, false>(p, xs, ys, ih0, iw0, oh0, ow0, w, sc, sh_, ce);
  }
}

// The sizes a strip tests its rows, columns and outputs against: the image (and its output), or
// with dilation one phase of it (fwd_scalar_win).
struct PhaseGrid {
  int32_t H, W, OH, OW;
};

// One thread's strip of kTH x kTW outputs of one channel, walked down the rows with a rolling
// window of K input rows (kCols columns each) in fp32 registers: each input element is loaded and
// converted once. Strides in elements: rs / cs between input rows / columns, ors / ocs between
// output rows / columns (constants at the call propagate: NCHW columns get immediate offsets).
// epi(acc) -> scalar_t is the epilogue (BatchNorm affine and activation).
template <typename scalar_t, int K, int S, int kTH, int kTW, bool kInterior, typename Epi>
FASTDW_HD void window_strip(const scalar_t* xs, scalar_t* ys, int32_t ih0, int32_t iw0, int32_t oh0, int32_t ow0,
                            const PhaseGrid& g, int32_t rs, int32_t cs, int32_t ors, int32_t ocs,
                            const float (&w)[K * K], const Epi& epi) {
  constexpr int kCols = (kTW - 1) * S + K;
  constexpr int kRows = (kTH - 1) * S + K;
  bool col_ok[kCols];
  FASTDW_UNROLL
  for (int q = 0; q < kCols; ++q) col_ok[q] = kInterior || (iw0 + q >= 0 && iw0 + q < g.W);
  float win[K][kCols];
  const scalar_t* xr = xs;
  FASTDW_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const bool row_ok = kInterior || (ih0 + r >= 0 && ih0 + r < g.H);
    FASTDW_UNROLL
    for (int q = 0; q < kCols; ++q) win[r % K][q] = (row_ok && col_ok[q]) ? to_f(xr[q * cs]) : 0.f;
    xr += rs;
    if (r < K - 1 || (r - (K - 1)) % S != 0) continue;
    const int jr = (r - (K - 1)) / S;  // the output row this input row completes
    if (!kInterior && oh0 + jr >= g.OH) break;  // and every later row of the strip
    scalar_t* yr = ys + jr * ors;
    FASTDW_UNROLL
    for (int tc = 0; tc < kTW; ++tc) {
      float acc = 0.f;
      FASTDW_UNROLL
      for (int kh = 0; kh < K; ++kh)
        FASTDW_UNROLL
        for (int kw = 0; kw < K; ++kw) acc += w[kh * K + kw] * win[(jr * S + kh) % K][tc * S + kw];
      if (kInterior || ow0 + tc < g.OW) yr[tc * ocs] = epi(acc);
    }
  }
}

// Forward, NCHW (contiguous) fast path: the same rolling-window scheme along W. Thread = one
// (n, c) plane x a strip of kTW consecutive output columns x kTH output rows; W is the fast axis:
// consecutive threads take consecutive column strips, so a warp's loads of one input row are
// consecutive addresses (coalesced; the halo columns are shared with the neighbours through L1).
// The K*K weights and the affine of the channel are loaded once per thread. Interior strips run
// without bounds tests; border strips test rows, columns and outputs.
template <typename scalar_t, Act A, int K, int S, int kTH, int kTW, bool kCenter>
FASTDW_HD void fwd_nchw_win(const Args& a, int64_t i) {
  constexpr int kCols = (kTW - 1) * S + K;
  constexpr int kRows = (kTH - 1) * S + K;
  const DwConvParams& p = a.p;
  const int32_t H = static_cast<int32_t>(p.H), W = static_cast<int32_t>(p.W);
  const int32_t OW = static_cast<int32_t>(p.OW);
  // i = (plane * nth + sh) * ntw + sw: div_vec is unused (1), div_tw / div_th as in fwd_nhwc_win
  const uint32_t i0 = static_cast<uint32_t>(i), i1 = a.div_tw.div(i0), i2 = a.div_th.div(i1);
  const int32_t sw = static_cast<int32_t>(i0 - i1 * a.div_tw.d), sh = static_cast<int32_t>(i1 - i2 * a.div_th.d);
  const int64_t plane = i2;
  const int32_t c = static_cast<int32_t>(plane % p.C);
  const int32_t ow0 = sw * kTW, oh0 = sh * kTH;
  const int32_t iw0 = ow0 * S - static_cast<int32_t>(p.pad_w), ih0 = oh0 * S - static_cast<int32_t>(p.pad_h);
  const scalar_t* xs = static_cast<const scalar_t*>(p.x_ptr) + plane * p.H * p.W + (ih0 * W + iw0);
  scalar_t* ys = static_cast<scalar_t*>(p.out_ptr) + plane * p.OH * p.OW + (oh0 * OW + ow0);
  float w[K * K];
  FASTDW_UNROLL
  for (int tap = 0; tap < K * K; ++tap) w[tap] = a.wt[tap * p.C + c];
  const float sc = a.scale[c], shv = a.shift[c], ce = kCenter ? a.center[c] : 0.f;
  const auto epi = [&](float acc) -> scalar_t {
    const float u = (kCenter ? acc - ce : acc) * sc + shv;
    if constexpr (std::is_same_v<scalar_t, float>) {
      return act_fwd<A>(u);
    } else {
      return static_cast<scalar_t>(act_fwd_lowp<A>(u));
    }
  };
  const PhaseGrid g{H, W, static_cast<int32_t>(p.OH), OW};
  const bool interior = ih0 >= 0 && ih0 + kRows <= H && iw0 >= 0 && iw0 + kCols <= W;
  if (interior) {
    window_strip<scalar_t, K, S, kTH, kTW, true>(xs, ys, ih0, iw0, oh0, ow0, g, W, 1, OW, 1, w, epi);
  } else {
    window_strip<scalar_t, K, S, kTH, kTW, false>(xs, ys, ih0, iw0, oh0, ow0, g, W, 1, OW, 1, w, epi);
  }
}

inline int64_t fwd_nchw_win_threads(const DwConvParams& p, int th, int tw) {
  return p.N * p.C * ((p.OH + th - 1) / th) * ((p.OW + tw - 1) / tw);
}

// The activation as runtime values, for the fallback window kernel (which would otherwise be
// compiled once per activation). kMode 0: the ReLU family as one clamp to [lo, hi] (none:
// (-inf, inf), relu: [0, inf), relu6: [0, 6]; NaN passes), branch-free; 1: hardswish / silu by a
// uniform branch; 2: any of them (one more uniform branch; the dilated kernels).
template <int kMode, bool kLowp>
FASTDW_HD float act_fwd_rt(Act a, float u, float lo, float hi) {
  if (kMode == 1 || (kMode == 2 && (a == Act::Hardswish || a == Act::Silu))) {
    if (a == Act::Hardswish) return kLowp ? act_fwd_lowp<Act::Hardswish>(u) : act_fwd<Act::Hardswish>(u);
    return kLowp ? act_fwd_lowp<Act::Silu>(u) : act_fwd<Act::Silu>(u);
  }
  return clamp_nan(u, lo, hi);
}

// Forward, one channel per thread: the window scheme of fwd_nhwc_win / fwd_nchw_win for any
// channel count and any element alignment (scalar loads and stores), K = 3 / 5 / 7, stride 1 / 2,
// any dilation, both layouts; the activation and the training center are runtime values. It
// serves what the vector kernels cannot: channels_last with C not a multiple of the vector width
// or an unaligned view, the 5x5 / 7x7 kernels of both layouts, and dilated kernels. Thread = one
// channel of one image x a strip of kTH output rows x kTW columns. Thread index: channels_last:
// channel fastest (a warp reads 32 consecutive channels of a pixel); NCHW: column strip fastest
// (a warp reads along a row).
//
// Dilation d with stride s, per axis: with g = gcd(s, d), the outputs split into P = d / g phases
// (output o = ph + P * j), and inside one phase the convolution is an undilated one of stride
// s / g over the input rows ph * s - pad + d * r (r = j * s / g + tap): every d-th input row. So a
// phase is the undilated window kernel with the row and column strides multiplied by d (input)
// and P (output), and the template stride S is s / g. Without dilation P = 1 and the phase is the
// whole image. The strip works in the phase's virtual coordinates, shifted so that virtual row 0
// is the first real row >= 0: PhaseGrid holds the phase's virtual input extent (H, W: virtual
// rows / columns whose real row / column lies inside the image) and output extent (OH, OW).

// ceil(x / d) for x of either sign, |x| + d < 2^31, by a FastDiv (no integer division).
FASTDW_HD int32_t ceil_div_any(int32_t x, const FastDiv& d) {
  return x >= 0 ? static_cast<int32_t>(d.div(static_cast<uint32_t>(x) + d.d - 1))
                : -static_cast<int32_t>(d.div(static_cast<uint32_t>(-x)));
}

// The thread decode of the one-channel-per-thread window kernels (fwd_scalar_win, and the fused
// backward): channel c of image n x strip / tile (sh, sw) of div_th x div_tw per image, by
// multiplicative divisions. channels_last: i = ((n * nth + sh) * ntw + sw) * C + c (c fastest: a
// warp reads 32 channels of a pixel); NCHW: i = ((n * C + c) * nth + sh) * ntw + sw (sw fastest).
template <bool kCL>
FASTDW_HD void decode_channel_strip(const Args& a, int64_t i, int32_t& c, int32_t& sh, int32_t& sw, int64_t& n) {
  const uint32_t i0 = static_cast<uint32_t>(i);
  if constexpr (kCL) {
    const uint32_t i1 = a.div_vec.div(i0), i2 = a.div_tw.div(i1), i3 = a.div_th.div(i2);
    c = static_cast<int32_t>(i0 - i1 * a.div_vec.d);
    sw = static_cast<int32_t>(i1 - i2 * a.div_tw.d);
    sh = static_cast<int32_t>(i2 - i3 * a.div_th.d);
    n = i3;
  } else {
    const uint32_t i1 = a.div_tw.div(i0), i2 = a.div_th.div(i1), i3 = a.div_vec.div(i2);
    sw = static_cast<int32_t>(i0 - i1 * a.div_tw.d);
    sh = static_cast<int32_t>(i1 - i2 * a.div_th.d);
    c = static_cast<int32_t>(i2 - i3 * a.div_vec.d);
    n = i3;
  }
}

// Whether a problem's offsets fit the window kernels' int32 arithmetic: an image (channels_last)
// or plane (NCHW) with its padding and the rows / columns a thread may address past either edge
// (row_reach / col_reach, dilation included), its output likewise, and the thread count, all
// under 2^31.
inline bool fits_int32(const DwConvParams& p, int64_t row_reach, int64_t col_reach, int64_t threads) {
  const int64_t lim = (int64_t(1) << 31) - 1;
  const int64_t cw = p.channels_last ? p.C : 1;
  const int64_t img = (p.H + p.pad_h + p.pad_b + row_reach) * (p.W + p.pad_w + p.pad_r + col_reach) * cw;
  const int64_t out_img = (p.OH + row_reach) * (p.OW + col_reach) * cw;
  return img < lim && out_img < lim && threads < lim;
}

template <typename scalar_t, int K, int S, int kTH, int kTW, bool kCL, bool kSmooth, bool kDil>
FASTDW_HD void fwd_scalar_win(const Args& a, int64_t i) {
  constexpr int kActMode = kDil ? 2 : (kSmooth ? 1 : 0);
  constexpr int kCols = (kTW - 1) * S + K;
  constexpr int kRows = (kTH - 1) * S + K;
  const DwConvParams& p = a.p;
  const int32_t C = static_cast<int32_t>(p.C), H = static_cast<int32_t>(p.H), W = static_cast<int32_t>(p.W);
  const int32_t OH = static_cast<int32_t>(p.OH), OW = static_cast<int32_t>(p.OW);
  int32_t c, sw, sh;
  int64_t n;
  decode_channel_strip<kCL>(a, i, c, sh, sw, n);
  // element strides of a row and a column, input and output
  const int32_t rs = kCL ? W * C : W, cs = kCL ? C : 1, ors = kCL ? OW * C : OW, ocs = kCL ? C : 1;
  const int64_t x_img = kCL ? n * p.H * p.W * p.C + c : (n * p.C + c) * p.H * p.W;
  const int64_t y_img = kCL ? n * p.OH * p.OW * p.C + c : (n * p.C + c) * p.OH * p.OW;
  const scalar_t* xs;
  scalar_t* ys;
  int32_t ih0, iw0, oh0, ow0;
  PhaseGrid g{H, W, OH, OW};
  int32_t dh = 1, dw = 1, Ph = 1, Pw = 1;
  if constexpr (kDil) {
    // The strip's phase (fastest, so neighbouring threads of an NCHW row read neighbouring
    // columns) and its place in the phase's output grid.
    Ph = static_cast<int32_t>(a.div_ph.d);
    Pw = static_cast<int32_t>(a.div_pw.d);
    const int32_t jh = static_cast<int32_t>(a.div_ph.div(static_cast<uint32_t>(sh)));
    const int32_t jw = static_cast<int32_t>(a.div_pw.div(static_cast<uint32_t>(sw)));
    const int32_t ph = sh - jh * Ph, pw = sw - jw * Pw;
    dh = static_cast<int32_t>(a.div_dh.d);
    dw = static_cast<int32_t>(a.div_dw.d);
    // real input row of the phase's virtual row r: bh + dh * r; the first one inside the image: lh
    const int32_t bh = ph * static_cast<int32_t>(p.stride_h) - static_cast<int32_t>(p.pad_h);
    const int32_t bw = pw * static_cast<int32_t>(p.stride_w) - static_cast<int32_t>(p.pad_w);
    const int32_t lh = ceil_div_any(-bh, a.div_dh), lw = ceil_div_any(-bw, a.div_dw);
    g = PhaseGrid{ceil_div_any(H - bh, a.div_dh) - lh, ceil_div_any(W - bw, a.div_dw) - lw,
                  static_cast<int32_t>(a.div_ph.div(static_cast<uint32_t>(OH - ph + Ph - 1))),
                  static_cast<int32_t>(a.div_pw.div(static_cast<uint32_t>(OW - pw + Pw - 1)))};
    oh0 = jh * kTH;  // in the phase's output grid
    ow0 = jw * kTW;
    ih0 = oh0 * S - lh;  // shifted virtual input coordinates
    iw0 = ow0 * S - lw;
    xs = static_cast<const scalar_t*>(p.x_ptr) + x_img + ((bh + dh * (ih0 + lh)) * rs + (bw + dw * (iw0 + lw)) * cs);
    ys = static_cast<scalar_t*>(p.out_ptr) + y_img + ((ph + Ph * oh0) * ors + (pw + Pw * ow0) * ocs);
  } else {
    oh0 = sh * kTH;
    ow0 = sw * kTW;
    ih0 = oh0 * S - static_cast<int32_t>(p.pad_h);
    iw0 = ow0 * S - static_cast<int32_t>(p.pad_w);
    xs = static_cast<const scalar_t*>(p.x_ptr) + x_img + (ih0 * rs + iw0 * cs);
    ys = static_cast<scalar_t*>(p.out_ptr) + y_img + (oh0 * ors + ow0 * ocs);
  }
  float w[K * K];
  FASTDW_UNROLL
  for (int tap = 0; tap < K * K; ++tap) w[tap] = a.wt[tap * p.C + c];
  const float sc = a.scale[c], shv = a.shift[c], ce = a.center != nullptr ? a.center[c] : 0.f;
  const float inf = std::numeric_limits<float>::infinity();
  const float lo = p.act == Act::None ? -inf : 0.f, hi = p.act == Act::Relu6 ? 6.f : inf;
  // A window inside the image means every output of the strip exists (also per phase; tested
  // anyway for the phases, whose output counts differ by one).
  const bool interior = ih0 >= 0 && ih0 + kRows <= g.H && iw0 >= 0 && iw0 + kCols <= g.W &&
                        (!kDil || (oh0 + kTH <= g.OH && ow0 + kTW <= g.OW));
  constexpr bool kLowp = !std::is_same_v<scalar_t, float>;
  const Act act = p.act;
  const auto epi = [&](float acc) -> scalar_t {
    return static_cast<scalar_t>(act_fwd_rt<kActMode, kLowp>(act, (acc - ce) * sc + shv, lo, hi));
  };
  if (interior) {
    window_strip<scalar_t, K, S, kTH, kTW, true>(xs, ys, ih0, iw0, oh0, ow0, g, dh * rs, dw * cs, Ph * ors, Pw * ocs,
                                                 w, epi);
  } else {
    window_strip<scalar_t, K, S, kTH, kTW, false>(xs, ys, ih0, iw0, oh0, ow0, g, dh * rs, dw * cs, Ph * ors,
                                                  Pw * ocs, w, epi);
  }
}

// The scalar window's strip: 8 rows x 8 columns at stride 1, 4 at stride 2.
constexpr int kScalarTH = 8;
constexpr int scalar_tw(int S) { return S == 1 ? 8 : 4; }

// The tile of fwd_nhwc_win for a problem: a strip of kTH x kTW outputs per thread when that
// still gives every SM several blocks (large layers), one output vector per thread otherwise
// (a 7x7 plane at N=1 would leave most SMs idle).
enum class WinTile { Strip, Single };
// Strips of 16 rows (the K-1 halo rows and the per-thread set-up spread over many outputs) by 2
// columns at stride 1 and 1 column at stride 2 (whose window of 2*(W-1)+K columns would not fit
// the register file with the training op's center; its budget is looser). NCHW: 16 or 8 rows
// by kNchwTW columns.
constexpr int strip_w(int S) { return S == 1 ? 2 : 1; }
constexpr int strip_h(int S) { return S == 1 ? 16 : 8; }
constexpr int nhwc_strip_h(int) { return 16; }

// Packs the per-channel parameters once per call into one fp32 buffer read with 16-byte loads:
// rows 0 .. KK-1 = weight taps (KK, C) (transposed so channels are contiguous), row KK = scale,
// row KK+1 = shift (absent: 1 and 0). Inputs: weight (C, 1, KH, KW) and scale / shift (C,) with
// any strides, fp32 or the activation dtype. One thread per packed element.
FASTDW_HD float load_as_f32(const void* base, int64_t idx, int dtype) {
  if (dtype == 1) return to_f(static_cast<const c10::Half*>(base)[idx]);
  if (dtype == 2) return to_f(static_cast<const c10::BFloat16*>(base)[idx]);
  return static_cast<const float*>(base)[idx];
}

// A (C,) per-channel tensor as the kernels read it: any stride (0: expanded), fp32, fp16 or
// bf16 (dtype codes of load_as_f32); p == nullptr: absent.
struct ChanParam {
  const void* p = nullptr;
  int64_t stride = 0;
  int dtype = 0;
};
FASTDW_HD float chan_at(const ChanParam& t, int64_t c, float absent) {
  return t.p != nullptr ? load_as_f32(t.p, c * t.stride, t.dtype) : absent;
}

struct PackArgs {
  const void* w;
  int64_t w_sc, w_sh, w_sw;  // element strides of weight along C, KH, KW
  int w_dtype;               // 0 fp32, 1 fp16, 2 bf16
  ChanParam scale, shift;    // absent: 1, 0
  int64_t C, KH, KW;
  float* out;  // (KH*KW + 2, C)
};

FASTDW_HD void pack_params(const PackArgs& a, int64_t i) {
  const int64_t T = a.KH * a.KW, c = i % a.C, row = i / a.C;
  float v;
  if (row < T) {
    v = load_as_f32(a.w, c * a.w_sc + (row / a.KW) * a.w_sh + (row % a.KW) * a.w_sw, a.w_dtype);
  } else if (row == T) {
    v = chan_at(a.scale, c, 1.f);
  } else {
    v = chan_at(a.shift, c, 0.f);
  }
  a.out[i] = v;
}

// The forward path the launcher takes (one rule for the GPU and its emulation).
enum class FwdPath { General, NhwcVec3, NhwcVec5, NhwcVec7, Win3S1, Win3S2, Nchw3S1, Nchw3S2, ScalarWin };

// NCHW strips: kNchwTW consecutive outputs along W x strip_h(S) rows.
constexpr int kNchwTW = 4;

struct FwdChoice {
  FwdPath path = FwdPath::General;
  WinTile tile = WinTile::Strip;
  bool idx64 = false;  // offsets need int64 (an image or the thread count reaches 2^31)
};

// A strip tile needs at least this many threads (256 blocks of 128: two per SM on a 132-SM GPU),
// else one output vector per thread. A pure function of the problem, so the emulation takes the
// same path as the GPU.
constexpr int64_t kStripMinThreads = 32768;

inline int64_t fwd_win_threads(const DwConvParams& p, int vec, int th, int tw) {
  return p.N * ((p.OH + th - 1) / th) * ((p.OW + tw - 1) / tw) * (p.C / vec);
}

// Dilation as phases (fwd_scalar_win): d / gcd(s, d) output phases per axis, each an undilated
// convolution of stride s / gcd(s, d).
FASTDW_HD int64_t gcd64(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}
inline int64_t dil_phases(int64_t s, int64_t d) { return d / gcd64(s, d); }
inline int64_t phase_stride(int64_t s, int64_t d) { return s / gcd64(s, d); }

// fwd_scalar_win's grid: Ph x Pw output phases, each cut into strips of th x tw of its
// ceil(OH / Ph) x ceil(OW / Pw) outputs (the largest phase); rows / cols: strips over all phases.
struct ScalarWinGrid {
  int64_t ph, pw, rows, cols;
};
inline ScalarWinGrid scalar_win_grid(const DwConvParams& p, int th, int tw) {
  const int64_t ph = dil_phases(p.stride_h, p.dil_h), pw = dil_phases(p.stride_w, p.dil_w);
  const int64_t oh = (p.OH + ph - 1) / ph, ow = (p.OW + pw - 1) / pw;
  return {ph, pw, ph * ((oh + th - 1) / th), pw * ((ow + tw - 1) / tw)};
}

// fwd_scalar_win's thread count: N * C * row strips * column strips, over all phases.
inline int64_t fwd_scalar_win_threads(const DwConvParams& p, int th, int tw) {
  const ScalarWinGrid g = scalar_win_grid(p, th, tw);
  return p.N * p.C * g.rows * g.cols;
}

inline FwdChoice select_fwd_path(const DwConvParams& p, int elem_size, bool aligned16) {
  const int vec = 16 / elem_size;
  FwdChoice ch;
  const int64_t svh = phase_stride(p.stride_h, p.dil_h), svw = phase_stride(p.stride_w, p.dil_w);
  const bool dilated = p.dil_h != 1 || p.dil_w != 1;
  // KxK, K = 3 / 5 / 7, whose (phase) strides are equal and 1 or 2: the window kernels
  const bool k357 = p.KH == p.KW && (p.KH == 3 || p.KH == 5 || p.KH == 7) && svh == svw && (svh == 1 || svh == 2);
  const int S = p.stride_h == 1 ? 1 : 2;
  const bool vec_ok = p.channels_last && aligned16 && p.C % vec == 0;
  int64_t threads = 0;
  if (k357) {
    if (dilated) {
      ch.path = FwdPath::ScalarWin;
      threads = fwd_scalar_win_threads(p, kScalarTH, scalar_tw(static_cast<int>(svh)));
    } else if (!p.channels_last && p.KH == 3) {
      ch.path = S == 1 ? FwdPath::Nchw3S1 : FwdPath::Nchw3S2;
      threads = fwd_nchw_win_threads(p, strip_h(S), kNchwTW);
    } else if (vec_ok && p.KH == 3) {
      ch.path = S == 1 ? FwdPath::Win3S1 : FwdPath::Win3S2;
      threads = fwd_win_threads(p, vec, nhwc_strip_h(S), strip_w(S));
      ch.tile = threads >= kStripMinThreads ? WinTile::Strip : WinTile::Single;
      if (ch.tile == WinTile::Single) threads = fwd_win_threads(p, vec, 1, 1);
    } else {  // 5x5 / 7x7, or channels_last with C % vec != 0 or an unaligned view
      ch.path = FwdPath::ScalarWin;
      threads = fwd_scalar_win_threads(p, kScalarTH, scalar_tw(S));
    }
  }
  // The window kernels use int32 offsets inside an image (channels_last) or a plane (NCHW; the
  // image / plane base is int64) and a 32-bit thread decode: an image with its padding and the
  // rows and columns a strip may address past either edge (at most (16 - 1) * 2 + 7 rows and 15
  // columns, times the dilation) and the thread count must stay under 2^31; larger problems take
  // the int64 kernels below. A large batch of ordinary images stays on the window kernels.
  ch.idx64 = !fits_int32(p, 80 * p.dil_h, 16 * p.dil_w, threads);
  if (k357 && !ch.idx64) return ch;
  ch.path = FwdPath::General;
  ch.tile = WinTile::Strip;
  if (vec_ok && p.KH == p.KW) {
    if (p.KH == 3) ch.path = FwdPath::NhwcVec3;
    else if (p.KH == 5) ch.path = FwdPath::NhwcVec5;
    else if (p.KH == 7) ch.path = FwdPath::NhwcVec7;
  }
  return ch;
}

constexpr int kTileW = 4;

// ---------------------------------------------------------------------------------------------
// Kernel tags: Tag::body(args, i) is what thread i runs. One __global__ template launches any tag
// on the GPU (cuda_exec.cuh); the CPU emulation loops over i.

template <typename scalar_t, Act A, int K>
struct FwdVec {
  static FASTDW_HD void body(const Args& a, int64_t i) { fwd_nhwc_vec<scalar_t, A, K, kTileW>(a, i); }
};
template <typename scalar_t, Act A, int K, int S, int kTH, int kTW, bool kCenter>
struct FwdWin {
  static constexpr int kThreads = kTH * kTW > 1 ? 128 : 64;  // small problems: more, smaller blocks
  static FASTDW_HD void body(const Args& a, int64_t i) { fwd_nhwc_win<scalar_t, A, K, S, kTH, kTW, kCenter>(a, i); }
};
template <typename scalar_t, Act A, int K, int S, int kTH, int kTW, bool kCenter>
struct FwdNchw {
  static constexpr int kThreads = 128;
  static FASTDW_HD void body(const Args& a, int64_t i) { fwd_nchw_win<scalar_t, A, K, S, kTH, kTW, kCenter>(a, i); }
};
template <typename scalar_t, int K, int S, int kTH, int kTW, bool kCL, bool kSmooth, bool kDil>
struct FwdScalarWin {
  static constexpr int kThreads = 128;
  static FASTDW_HD void body(const Args& a, int64_t i) {
    fwd_scalar_win<scalar_t, K, S, kTH, kTW, kCL, kSmooth, kDil>(a, i);
  }
};
struct PackParams {
  static FASTDW_HD void body(const PackArgs& a, int64_t i) { pack_params(a, i); }
};
template <typename scalar_t, Act A>
struct FwdGeneral {
  static FASTDW_HD void body(const Args& a, int64_t i) { fwd_general<scalar_t, A>(a, i); }
};

}  // namespace kern
}  // namespace fastdw
