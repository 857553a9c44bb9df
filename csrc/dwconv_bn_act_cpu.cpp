// CPU implementation of fastdw::dwconv_bn_act and fastdw::_dwconv_bn_act_backward.
//
// Math (per channel c, acc in fp32, fp64 for fp64 inputs):
//   z[n,c,oh,ow] = sum_{kh,kw} x[n,c,oh*sh-ph+kh*dh, ow*sw-pw+kw*dw] * w[c,kh,kw]
//   u = z * scale[c] + shift[c];  y = act(u)
// Backward (pre-activation recomputed, never saved):
//   gu = dy * act'(u);  dshift[c] = sum gu;  dscale[c] = sum gu * z;  gz = gu * scale[c]
//   dw[c,kh,kw] = sum gz[n,c,oh,ow] * x[n,c,oh*sh-ph+kh*dh, ow*sw-pw+kw*dw];  dx = conv^T(gz, w)
//
// Layouts, each read in place (no layout conversion of x):
//  * NCHW: one task per (n, c) plane. The plane is copied once into a zero-padded fp32 buffer so
//    the inner loops run over W with no bounds checks and vectorize along W.
//  * NHWC (channels_last): one task per output row (n, oh). Each input row (W x C) is copied
//    into a zero-padded fp32 row buffer; the inner loop runs over C (contiguous) and vectorizes.
//
// The hot row loops are compiled for several x86 ISAs (target_clones: AVX-512, AVX2+FMA,
// baseline) and picked at load time, so one binary is portable and still uses wide vectors.
//
// Reductions (dweight, dscale, dshift) are always deterministic on the CPU: they are split into
// chunks fixed by the problem shape (never by the thread count), each chunk accumulates its own
// partial sums, and the partials are added in chunk order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "activations.h"
#include "dwconv_bn_act_host.h"
#include "params.h"

#if defined(__linux__) && defined(__x86_64__) && defined(__GNUC__) && !defined(FASTDW_NO_CLONES)
#define FASTDW_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define FASTDW_CLONES
#endif

namespace fastdw {
namespace {

// ---------------------------------------------------------------------------------------------
// Row primitives (the only hot loops). `acc_t` is float or double.

template <typename scalar_t, typename acc_t>
FASTDW_CLONES void load_row(acc_t* __restrict dst, const scalar_t* __restrict src, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  }
}

template <typename scalar_t, typename acc_t>
FASTDW_CLONES void store_row(scalar_t* __restrict dst, const acc_t* __restrict src, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// NCHW: out[ow] = sum_{kh,kw} w[kh*K+kw] * in[kh*ld + ow*S + kw], dilation 1, K and S fixed.
// Vectorizes along ow with the K*K taps unrolled, so each output is written once.
template <typename acc_t, int K, int S>
FASTDW_CLONES void conv_row_nchw_fixed(acc_t* __restrict out, const acc_t* __restrict in, int64_t ld,
                                       const acc_t* __restrict w, int64_t OW) {
  acc_t wr[K * K];
  for (int t = 0; t < K * K; ++t) wr[t] = w[t];
  for (int64_t ow = 0; ow < OW; ++ow) {
    acc_t s = 0;
    for (int kh = 0; kh < K; ++kh)
      for (int kw = 0; kw < K; ++kw) s += wr[kh * K + kw] * in[kh * ld + ow * S + kw];
    out[ow] = s;
  }
}

// NCHW, stride 1, dilation 1, K fixed, over a whole zero-padded plane: the output is computed on
// the padded width (flat index i = oh*ld + ow for ow < ld), one long loop that vectorizes even
// for 7-wide rows; the columns ow >= OW are garbage and dropped by the caller. Needs K-1 zeros of
// slack after the plane.
template <typename acc_t, int K>
FASTDW_CLONES void conv_plane_nchw_s1(acc_t* __restrict flat, const acc_t* __restrict in, int64_t ld,
                                      const acc_t* __restrict w, int64_t n) {
  acc_t wr[K * K];
  for (int t = 0; t < K * K; ++t) wr[t] = w[t];
  for (int64_t i = 0; i < n; ++i) {
    acc_t s = 0;
    for (int kh = 0; kh < K; ++kh)
      for (int kw = 0; kw < K; ++kw) s += wr[kh * K + kw] * in[i + kh * ld + kw];
    flat[i] = s;
  }
}

// Whether the flat whole-plane loop applies (stride 1, dilation 1, square 3/5/7 kernel), and
// the call with K fixed; the forward and the backward use the same rule.
inline bool nchw_flat_s1(const DwConvParams& p) {
  return p.stride_h == 1 && p.stride_w == 1 && p.dil_h == 1 && p.dil_w == 1 && p.KH == p.KW &&
         (p.KH == 3 || p.KH == 5 || p.KH == 7);
}

template <typename acc_t>
inline void conv_plane_nchw_s1_dispatch(acc_t* flat, const acc_t* in, int64_t ld, const acc_t* w, int64_t n,
                                        int64_t k) {
  if (k == 3) conv_plane_nchw_s1<acc_t, 3>(flat, in, ld, w, n);
  else if (k == 5) conv_plane_nchw_s1<acc_t, 5>(flat, in, ld, w, n);
  else conv_plane_nchw_s1<acc_t, 7>(flat, in, ld, w, n);
}

// NCHW, any kernel / stride / dilation: tap-major accumulation into out.
template <typename acc_t>
FASTDW_CLONES void conv_row_nchw_generic(acc_t* __restrict out, const acc_t* __restrict in, int64_t ld,
                                         const acc_t* __restrict w, int64_t OW, int64_t KH, int64_t KW,
                                         int64_t sw, int64_t dh, int64_t dw) {
  for (int64_t ow = 0; ow < OW; ++ow) out[ow] = 0;
  for (int64_t kh = 0; kh < KH; ++kh)
    for (int64_t kw = 0; kw < KW; ++kw) {
      const acc_t wv = w[kh * KW + kw];
      const acc_t* src = in + kh * dh * ld + kw * dw;
      if (sw == 1) {
        for (int64_t ow = 0; ow < OW; ++ow) out[ow] += wv * src[ow];
      } else {
        for (int64_t ow = 0; ow < OW; ++ow) out[ow] += wv * src[ow * sw];
      }
    }
}

// NCHW row of the pre-activation, picking a fixed-size instance when one exists.
// `in` points at padded row oh*sh; `ld` is the padded row length.
template <typename acc_t>
inline void conv_row_nchw(acc_t* out, const acc_t* in, int64_t ld, const acc_t* w, int64_t OW,
                          const DwConvParams& p) {
  if (p.KH == p.KW && p.dil_h == 1 && p.dil_w == 1 && p.stride_h == p.stride_w) {
    const int64_t k = p.KH, s = p.stride_w;
#define FASTDW_NCHW_CASE(K_, S_) \
  if (k == K_ && s == S_) return conv_row_nchw_fixed<acc_t, K_, S_>(out, in, ld, w, OW);
    FASTDW_NCHW_CASE(3, 1) FASTDW_NCHW_CASE(3, 2) FASTDW_NCHW_CASE(5, 1)
    FASTDW_NCHW_CASE(5, 2) FASTDW_NCHW_CASE(7, 1) FASTDW_NCHW_CASE(7, 2)
#undef FASTDW_NCHW_CASE
  }
  conv_row_nchw_generic<acc_t>(out, in, ld, w, OW, p.KH, p.KW, p.stride_w, p.dil_h, p.dil_w);
}

// NHWC pre-activation of one output row: z[ow*C + c] = sum_{kh,kw} wt[(kh*KW+kw)*C + c] *
// rows[kh][(ow*sw - pw + kw*dw)*C + c]. rows[kh] are unpadded input rows (W*C, a zero row where
// the kernel row falls into the vertical padding). Outputs in [ow_lo, ow_hi) see no horizontal
// padding and take the fixed-K loop: all K*K taps accumulate in registers and z is written once;
// the c loop is innermost and contiguous in every operand, so it vectorizes for any C. The few
// border outputs (and every output when K == 0, the any-size kernel) take a bounds-checked loop.
template <typename acc_t>
FASTDW_CLONES void conv_cols_nhwc_checked(acc_t* __restrict z, const acc_t* const* rows,
                                          const acc_t* __restrict wt, int64_t ow_begin, int64_t ow_end,
                                          int64_t C, int64_t W, int64_t KH, int64_t KW, int64_t sw, int64_t pw,
                                          int64_t dw) {
  for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
    acc_t* __restrict zr = z + ow * C;
    for (int64_t c = 0; c < C; ++c) zr[c] = 0;
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t iw = ow * sw - pw + kw * dw;
        if (iw < 0 || iw >= W) continue;
        const acc_t* __restrict xr = rows[kh] + iw * C;
        const acc_t* __restrict wv = wt + (kh * KW + kw) * C;
        for (int64_t c = 0; c < C; ++c) zr[c] += wv[c] * xr[c];
      }
  }
}

// 32-byte vectors (GCC vector extensions). Spelled per type: a vector_size attribute on a
// dependent type is not reliably applied inside templates.
typedef float vec8f_t __attribute__((vector_size(32)));
typedef double vec4d_t __attribute__((vector_size(32)));
template <typename T>
struct Vec32;
template <>
struct Vec32<float> {
  using type = vec8f_t;
};
template <>
struct Vec32<double> {
  using type = vec4d_t;
};

// B consecutive interior output columns starting at ow, all channels. Channels go in blocks of
// one 32-byte vector (8 fp32 / 4 fp64; GCC vector extensions, lowered to whatever the clone's ISA
// has): each weight vector is loaded once per tap and used for the B columns, whose B
// independent accumulation chains hide the add latency. Columns are the outer loop so the input
// rows stream through the cache once (a channel-block-outer order re-reads them per block).
template <typename acc_t, int K, int B>
inline __attribute__((always_inline)) void conv_block_nhwc(acc_t* __restrict z, const acc_t* const* r,
                                                           const acc_t* __restrict wt, int64_t ow, int64_t C,
                                                           int64_t sw, int64_t pw, int64_t dw) {
  using vec_t = typename Vec32<acc_t>::type;
  constexpr int64_t V = 32 / sizeof(acc_t);
  const int64_t x0 = (ow * sw - pw) * C, step = sw * C, tap = dw * C;
  acc_t* zb = z + ow * C;
  int64_t c0 = 0;
  for (; c0 + V <= C; c0 += V) {
    vec_t s[B] = {};
    for (int kh = 0; kh < K; ++kh) {
      const acc_t* xr = r[kh] + x0 + c0;
      for (int kw = 0; kw < K; ++kw) {
        vec_t wv;
        std::memcpy(&wv, wt + (kh * K + kw) * C + c0, sizeof(vec_t));
        for (int b = 0; b < B; ++b) {
          vec_t xv;
          std::memcpy(&xv, xr + kw * tap + b * step, sizeof(vec_t));
          s[b] += wv * xv;
        }
      }
    }
    for (int b = 0; b < B; ++b) std::memcpy(zb + b * C + c0, &s[b], sizeof(vec_t));
  }
  for (; c0 < C; ++c0)  // channels past the last full vector
    for (int b = 0; b < B; ++b) {
      acc_t sc = 0;
      for (int kh = 0; kh < K; ++kh)
        for (int kw = 0; kw < K; ++kw) sc += wt[(kh * K + kw) * C + c0] * r[kh][x0 + b * step + kw * tap + c0];
      zb[b * C + c0] = sc;
    }
}

// Interior columns [ow_begin, ow_end), K fixed: no tap falls into the horizontal padding.
template <typename acc_t, int K>
FASTDW_CLONES void conv_cols_nhwc_interior(acc_t* __restrict z, const acc_t* const* rows,
                                           const acc_t* __restrict wt, int64_t ow_begin, int64_t ow_end,
                                           int64_t C, int64_t sw, int64_t pw, int64_t dw) {
  const acc_t* r[K];
  for (int kh = 0; kh < K; ++kh) r[kh] = rows[kh];
  constexpr int B = 4;
  int64_t ow = ow_begin;
  for (; ow + B <= ow_end; ow += B) conv_block_nhwc<acc_t, K, B>(z, r, wt, ow, C, sw, pw, dw);
  for (; ow < ow_end; ++ow) conv_block_nhwc<acc_t, K, 1>(z, r, wt, ow, C, sw, pw, dw);
}

// Border columns, K fixed: like the interior loop, but the taps that fall into the horizontal
// padding are skipped (decided once per output column, not per channel).
template <typename acc_t, int K>
FASTDW_CLONES void conv_cols_nhwc_edge(acc_t* __restrict z, const acc_t* const* rows, const acc_t* __restrict wt,
                                       int64_t ow_begin, int64_t ow_end, int64_t C, int64_t W, int64_t sw,
                                       int64_t pw, int64_t dw) {
  using vec_t = typename Vec32<acc_t>::type;
  constexpr int64_t V = 32 / sizeof(acc_t);
  for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
    int64_t iws[K];
    int nk = 0, kws[K];
    for (int kw = 0; kw < K; ++kw) {
      const int64_t iw = ow * sw - pw + kw * dw;
      if (iw >= 0 && iw < W) {
        kws[nk] = kw;
        iws[nk++] = iw * C;
      }
    }
    acc_t* zr = z + ow * C;
    int64_t c0 = 0;
    for (; c0 + V <= C; c0 += V) {
      vec_t s = {};
      for (int kh = 0; kh < K; ++kh)
        for (int j = 0; j < nk; ++j) {
          vec_t xv, wv;
          std::memcpy(&xv, rows[kh] + iws[j] + c0, sizeof(vec_t));
          std::memcpy(&wv, wt + (kh * K + kws[j]) * C + c0, sizeof(vec_t));
          s += wv * xv;
        }
      std::memcpy(zr + c0, &s, sizeof(vec_t));
    }
    for (; c0 < C; ++c0) {
      acc_t s = 0;
      for (int kh = 0; kh < K; ++kh)
        for (int j = 0; j < nk; ++j) s += wt[(kh * K + kws[j]) * C + c0] * rows[kh][iws[j] + c0];
      zr[c0] = s;
    }
  }
}

template <typename acc_t, int K>
inline void conv_row_nhwc(acc_t* z, const acc_t* const* rows, const acc_t* wt, int64_t OW, int64_t C, int64_t W,
                          int64_t KH, int64_t KW, int64_t sw, int64_t pw, int64_t dw, int64_t ow_lo, int64_t ow_hi) {
  if constexpr (K == 0) {
    conv_cols_nhwc_checked<acc_t>(z, rows, wt, 0, OW, C, W, KH, KW, sw, pw, dw);
  } else {
    conv_cols_nhwc_edge<acc_t, K>(z, rows, wt, 0, ow_lo, C, W, sw, pw, dw);
    conv_cols_nhwc_interior<acc_t, K>(z, rows, wt, ow_lo, ow_hi, C, sw, pw, dw);
    conv_cols_nhwc_edge<acc_t, K>(z, rows, wt, std::max(ow_lo, ow_hi), OW, C, W, sw, pw, dw);
  }
}

// Output columns whose window lies inside [0, W): [ow_lo, ow_hi) (empty when none does).
inline std::pair<int64_t, int64_t> interior_cols(int64_t OW, int64_t W, int64_t KW, int64_t sw, int64_t pw,
                                                 int64_t dw) {
  const int64_t lo = std::min(OW, (pw + sw - 1) / sw);
  const int64_t last = W - 1 + pw - (KW - 1) * dw;  // ow*sw <= last
  const int64_t hi = last < 0 ? lo : std::min(OW, last / sw + 1);
  return {lo, std::max(lo, hi)};
}

template <typename acc_t>
inline void conv_row_nhwc_dispatch(acc_t* z, const acc_t* const* rows, const acc_t* wt, const DwConvParams& p,
                                   int64_t ow_lo, int64_t ow_hi) {
  const int64_t k = p.KH == p.KW ? p.KH : 0;
#define FASTDW_NHWC_CASE(K_)                                                                          \
  if (k == K_)                                                                                        \
    return conv_row_nhwc<acc_t, K_>(z, rows, wt, p.OW, p.C, p.W, p.KH, p.KW, p.stride_w, p.pad_w, \
                                    p.dil_w, ow_lo, ow_hi);
  FASTDW_NHWC_CASE(3) FASTDW_NHWC_CASE(5) FASTDW_NHWC_CASE(7)
#undef FASTDW_NHWC_CASE
  conv_row_nhwc<acc_t, 0>(z, rows, wt, p.OW, p.C, p.W, p.KH, p.KW, p.stride_w, p.pad_w, p.dil_w, ow_lo, ow_hi);
}

// Forward epilogues: y = act((z - center) * scale + shift), rounded once to the output dtype.
// center is 0 for the inference op (exactly z * scale + shift) and the batch mean in training,
// where folding it into the shift (beta - mean * scale) would cancel digits when |mean| >> std.
template <Act A, typename scalar_t, typename acc_t>
FASTDW_CLONES void epilogue_nchw(scalar_t* __restrict out, acc_t* __restrict z, int64_t n, acc_t scale,
                                 acc_t shift, acc_t center) {
  for (int64_t i = 0; i < n; ++i) z[i] = act_fwd<A>((z[i] - center) * scale + shift);
  store_row<scalar_t, acc_t>(out, z, n);
}

template <Act A, typename scalar_t, typename acc_t>
FASTDW_CLONES void epilogue_nhwc(scalar_t* out, acc_t* z, int64_t OW, int64_t C,
                                 const acc_t* __restrict scale, const acc_t* __restrict shift,
                                 const acc_t* __restrict center) {
  // fp32/fp64 outputs are written straight from the epilogue; narrower ones go through z and
  // one conversion pass.
  acc_t* dst = nullptr;
  if constexpr (std::is_same_v<scalar_t, acc_t>) dst = out; else dst = z;
  for (int64_t ow = 0; ow < OW; ++ow) {
    const acc_t* zr = z + ow * C;
    acc_t* dr = dst + ow * C;
    for (int64_t c = 0; c < C; ++c) dr[c] = act_fwd<A>((zr[c] - center[c]) * scale[c] + shift[c]);
  }
  if constexpr (!std::is_same_v<scalar_t, acc_t>) store_row<scalar_t, acc_t>(out, z, OW * C);
}

// Per-channel data of the backward epilogue; NCHW passes pointers at channel c (cstride 0), NHWC
// the per-channel arrays (cstride 1). center is 0 for the inference op, the batch mean in training.
template <typename acc_t>
struct EpiView {
  const acc_t *scale, *shift, *center, *lin, *cst;
};

// Backward epilogue on one output row, in place on g, with the per-position partial sums of
// dshift (gu) and dscale (gu * (z - center)) accumulated into sb / ss:
//   inference (kTrain false):  g <- gz = act'(u) * g * scale
//   training  (kTrain true):   g <- dz = scale * gu + lin * (z - center) + cst
// (training BatchNorm: the batch-mean and batch-variance terms are affine in z per channel).
template <Act A, bool kTrain, typename acc_t>
FASTDW_CLONES void bwd_epilogue(acc_t* __restrict g, const acc_t* __restrict z, int64_t OW, int64_t C,
                                EpiView<acc_t> e, int64_t cstride, acc_t* __restrict ss, acc_t* __restrict sb) {
  for (int64_t ow = 0; ow < OW; ++ow) {
    const int64_t o = ow * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t zc = z[o + c];
      const int64_t k = c * cstride;
      const acc_t sc = e.scale[k], sh = e.shift[k];
      const acc_t zm = zc - e.center[k];
      const acc_t gu = act_bwd<A>(zm * sc + sh, g[o + c]);
      sb[o + c] += gu;
      ss[o + c] += gu * zm;
      if constexpr (kTrain) {
        g[o + c] = gu * sc + (e.lin[k] * zm + e.cst[k]);
      } else {
        g[o + c] = gu * sc;
      }
    }
  }
}

// acc[i] += a[i] * b[i * s]
template <typename acc_t>
FASTDW_CLONES void fma_strided(acc_t* __restrict acc, const acc_t* __restrict a, const acc_t* __restrict b,
                               int64_t n, int64_t s) {
  if (s == 1) {
    for (int64_t i = 0; i < n; ++i) acc[i] += a[i] * b[i];
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += a[i] * b[i * s];
  }
}

// dst[i * s] += w * g[i]
template <typename acc_t>
FASTDW_CLONES void scatter_axpy(acc_t* __restrict dst, const acc_t* __restrict g, acc_t w, int64_t n,
                                int64_t s) {
  if (s == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] += w * g[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * s] += w * g[i];
  }
}

// NHWC dweight partial: pw[kw*C + c] += sum_ow gz[ow*C + c] * row[(ow*sw + kw*dw)*C + c]
template <typename acc_t>
FASTDW_CLONES void dweight_row_nhwc(acc_t* __restrict pw, const acc_t* __restrict gz,
                                    const acc_t* __restrict row, int64_t OW, int64_t C, int64_t KW,
                                    int64_t sw, int64_t dw) {
  for (int64_t ow = 0; ow < OW; ++ow) {
    const acc_t* gr = gz + ow * C;
    for (int64_t kw = 0; kw < KW; ++kw) {
      const acc_t* xr = row + (ow * sw + kw * dw) * C;
      acc_t* pr = pw + kw * C;
      for (int64_t c = 0; c < C; ++c) pr[c] += gr[c] * xr[c];
    }
  }
}

// NHWC dx for one kernel row: dxrow[(ow*sw + kw*dw)*C + c] += w[kw*C + c] * gz[ow*C + c]
template <typename acc_t>
FASTDW_CLONES void dx_row_nhwc(acc_t* __restrict dxrow, const acc_t* __restrict gz,
                               const acc_t* __restrict wk, int64_t OW, int64_t C, int64_t KW, int64_t sw,
                               int64_t dw) {
  for (int64_t ow = 0; ow < OW; ++ow) {
    const acc_t* gr = gz + ow * C;
    for (int64_t kw = 0; kw < KW; ++kw) {
      acc_t* dr = dxrow + (ow * sw + kw * dw) * C;
      const acc_t* wv = wk + kw * C;
      for (int64_t c = 0; c < C; ++c) dr[c] += wv[c] * gr[c];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Per-channel parameters as acc_t vectors: weights (C, KH*KW) for NCHW or transposed
// (KH*KW, C) for NHWC so the channel loop is contiguous; scale defaults to 1, shift to 0.
template <typename acc_t>
struct ChannelParams {
  std::vector<acc_t> w, scale, shift;
  std::vector<acc_t> center, lin, cst;  // backward epilogue (EpiView): 0 for inference
  EpiView<acc_t> view(int64_t c) const {
    return {&scale[c], &shift[c], &center[c], lin.empty() ? nullptr : &lin[c], cst.empty() ? nullptr : &cst[c]};
  }
};

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

// Rows of work per parallel task are sized for at least ~32K multiply-adds per task.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

// ---------------------------------------------------------------------------------------------
// Forward

// Calls fn(nc, z) for every (n, c) plane (in parallel), z = its compact OH x OW pre-activation.
template <typename scalar_t, typename acc_t, typename Fn>
void for_each_plane_nchw(const DwConvParams& p, const ChannelParams<acc_t>& cp, Fn&& fn) {
  const int64_t Hp = p.H + 2 * p.pad_h, Wp = p.W + 2 * p.pad_w, T = p.KH * p.KW, OHW = p.OH * p.OW;
  const auto* x = static_cast<const scalar_t*>(p.x_ptr);
  const bool flat_s1 = nchw_flat_s1(p);
  at::parallel_for(0, p.N * p.C, grain_for(OHW * T), [&](int64_t begin, int64_t end) {
    // Padded plane (+ slack for the flat stride-1 loop); only the interior is ever written,
    // so the borders stay zero across planes.
    std::vector<acc_t> plane(Hp * Wp + p.KW, acc_t(0)), z(p.OH * std::max(Wp, p.OW));
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t c = nc % p.C;
      const acc_t* wc = cp.w.data() + c * T;
      const scalar_t* xp = x + nc * p.H * p.W;
      for (int64_t h = 0; h < p.H; ++h)
        load_row<scalar_t, acc_t>(plane.data() + (h + p.pad_h) * Wp + p.pad_w, xp + h * p.W, p.W);
      if (flat_s1) {
        const int64_t n = p.OH * Wp;
        conv_plane_nchw_s1_dispatch<acc_t>(z.data(), plane.data(), Wp, wc, n, p.KH);
        for (int64_t oh = 1; oh < p.OH; ++oh)  // compact rows: drop the padded-width garbage
          std::memmove(z.data() + oh * p.OW, z.data() + oh * Wp, p.OW * sizeof(acc_t));
      } else {
        for (int64_t oh = 0; oh < p.OH; ++oh)
          conv_row_nchw<acc_t>(z.data() + oh * p.OW, plane.data() + oh * p.stride_h * Wp, Wp, wc, p.OW, p);
      }
      fn(nc, z.data());
    }
  });
}

template <typename scalar_t, typename acc_t>
void fwd_nchw(const DwConvParams& p, const ChannelParams<acc_t>& cp) {
  const int64_t OHW = p.OH * p.OW;
  auto* y = static_cast<scalar_t*>(p.out_ptr);
  act_switch(p.act, [&](auto act_c) {
    constexpr Act A = decltype(act_c)::value;
    for_each_plane_nchw<scalar_t, acc_t>(p, cp, [&](int64_t nc, acc_t* z) {
      const int64_t c = nc % p.C;
      epilogue_nchw<A, scalar_t, acc_t>(y + nc * OHW, z, OHW, cp.scale[c], cp.shift[c], cp.center[c]);
    });
  });
}

// Gives the pre-activation row (n, oh) in NHWC from padded fp32/fp64 row buffers (used by the
// backward, which needs the rows again for dweight): rows[kh] is loaded, or left as the zero row
// `zrow` when the kernel row falls into the vertical padding (valid[kh] = false).
template <typename scalar_t, typename acc_t>
inline void conv_out_row_nhwc_padded(acc_t* z, std::vector<std::vector<acc_t>>& rows, std::vector<char>& valid,
                                     std::vector<const acc_t*>& ptrs, const acc_t* zrow, const scalar_t* x,
                                     const DwConvParams& p, const ChannelParams<acc_t>& cp, int64_t n, int64_t oh) {
  for (int64_t kh = 0; kh < p.KH; ++kh) {
    const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dil_h;
    valid[kh] = ih >= 0 && ih < p.H;
    if (valid[kh])
      load_row<scalar_t, acc_t>(rows[kh].data() + p.pad_w * p.C, x + (n * p.H + ih) * p.W * p.C, p.W * p.C);
    // Pointers at column 0 of the unpadded row: the padding is materialized, so every column is
    // an interior column.
    ptrs[kh] = (valid[kh] ? rows[kh].data() : zrow) + p.pad_w * p.C;
  }
  conv_row_nhwc_dispatch<acc_t>(z, ptrs.data(), cp.w.data(), p, 0, p.OW);
}

// Calls fn(r, z) for every output row r = n * OH + oh (in parallel), z = its OW x C pre-activation.
template <typename scalar_t, typename acc_t, typename Fn>
void for_each_row_nhwc(const DwConvParams& p, const ChannelParams<acc_t>& cp, Fn&& fn) {
  const int64_t C = p.C, rowlen = p.W * C;
  const auto* x = static_cast<const scalar_t*>(p.x_ptr);
  const auto [ow_lo, ow_hi] = interior_cols(p.OW, p.W, p.KW, p.stride_w, p.pad_w, p.dil_w);
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  // Low-precision inputs are converted to fp32 one input row at a time into a ring of
  // (KH-1)*dh+1 rows, so consecutive output rows of a task reuse the rows they share.
  const int64_t ring = (p.KH - 1) * p.dil_h + 1;
  at::parallel_for(0, p.N * p.OH, grain_for(p.OW * C * p.KH * p.KW), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> zero(rowlen, acc_t(0)), z(p.OW * C);
    std::vector<acc_t> cache(kDirect ? 0 : ring * rowlen);
    std::vector<int64_t> tag(ring, -1);
    std::vector<const acc_t*> ptrs(p.KH);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / p.OH, oh = r % p.OH;
      for (int64_t kh = 0; kh < p.KH; ++kh) {
        const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dil_h;
        if (ih < 0 || ih >= p.H) {
          ptrs[kh] = zero.data();
          continue;
        }
        const int64_t row_id = n * p.H + ih;
        if constexpr (kDirect) {
          ptrs[kh] = x + row_id * rowlen;
        } else {
          const int64_t slot = ih % ring;
          acc_t* dst = cache.data() + slot * rowlen;
          if (tag[slot] != row_id) {
            load_row<scalar_t, acc_t>(dst, x + row_id * rowlen, rowlen);
            tag[slot] = row_id;
          }
          ptrs[kh] = dst;
        }
      }
      conv_row_nhwc_dispatch<acc_t>(z.data(), ptrs.data(), cp.w.data(), p, ow_lo, ow_hi);
      fn(r, z.data());
    }
  });
}

template <typename scalar_t, typename acc_t>
void fwd_nhwc(const DwConvParams& p, const ChannelParams<acc_t>& cp) {
  auto* y = static_cast<scalar_t*>(p.out_ptr);
  act_switch(p.act, [&](auto act_c) {
    constexpr Act A = decltype(act_c)::value;
    for_each_row_nhwc<scalar_t, acc_t>(p, cp, [&](int64_t r, acc_t* z) {
      epilogue_nhwc<A, scalar_t, acc_t>(y + r * p.OW * p.C, z, p.OW, p.C, cp.scale.data(), cp.shift.data(),
                                        cp.center.data());
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

template <typename scalar_t, typename acc_t, bool kTrain>
void bwd_nchw(const DwConvBwdParams& p, const ChannelParams<acc_t>& cp, acc_t* dw_acc, acc_t* ds_acc,
              acc_t* db_acc) {
  const int64_t Hp = p.H + 2 * p.pad_h, Wp = p.W + 2 * p.pad_w, T = p.KH * p.KW, OW = p.OW;
  const auto* x = static_cast<const scalar_t*>(p.x_ptr);
  const auto* dy = static_cast<const scalar_t*>(p.grad_out_ptr);
  auto* dx = static_cast<scalar_t*>(p.grad_x_ptr);
  const bool need_dx = dx != nullptr, need_dw = dw_acc != nullptr;
  // Work goes in segments: one output row, or (stride 1, dilation 1, square 3/5/7 kernel) the
  // whole plane on the padded width, as in the forward: a few long vector loops per plane
  // instead of K*K short ones per row. The padded-width garbage columns get g = 0, so they add
  // nothing to dx, dweight, dscale or dshift.
  const bool flat = nchw_flat_s1(p);
  const int64_t L = flat ? p.OH * Wp : OW, nseg = flat ? 1 : p.OH, sw = flat ? 1 : p.stride_w;
  act_switch(p.act, [&](auto act_c) {
    constexpr Act A = decltype(act_c)::value;
    // One task per channel: every reduction over (n, oh, ow) of a channel stays in one task and
    // runs in a fixed order, so the result does not depend on the thread count.
    at::parallel_for(0, p.C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> plane(Hp * Wp + p.KW, acc_t(0)), dplane(need_dx ? Hp * Wp + p.KW : 0);
      std::vector<acc_t> z(L), g(L, acc_t(0)), ss(L), sb(L), pw(need_dw ? T * L : 0);
      for (int64_t c = begin; c < end; ++c) {
        std::fill(ss.begin(), ss.end(), acc_t(0));
        std::fill(sb.begin(), sb.end(), acc_t(0));
        std::fill(pw.begin(), pw.end(), acc_t(0));
        const acc_t* wc = cp.w.data() + c * T;
        for (int64_t n = 0; n < p.N; ++n) {
          const int64_t nc = n * p.C + c;
          for (int64_t h = 0; h < p.H; ++h)
            load_row<scalar_t, acc_t>(plane.data() + (h + p.pad_h) * Wp + p.pad_w, x + nc * p.H * p.W + h * p.W,
                                      p.W);
          if (need_dx) std::fill(dplane.begin(), dplane.end(), acc_t(0));
          for (int64_t seg = 0; seg < nseg; ++seg) {
            const int64_t row0 = flat ? 0 : seg * p.stride_h * Wp;  // padded-plane offset of the segment
            const acc_t* in = plane.data() + row0;
            const scalar_t* dyp = dy + nc * p.OH * OW;
            if (flat) {
              conv_plane_nchw_s1_dispatch<acc_t>(z.data(), plane.data(), Wp, wc, L, p.KH);
              for (int64_t oh = 0; oh < p.OH; ++oh) {
                load_row<scalar_t, acc_t>(g.data() + oh * Wp, dyp + oh * OW, OW);
                std::fill(g.data() + oh * Wp + OW, g.data() + (oh + 1) * Wp, acc_t(0));
              }
            } else {
              conv_row_nchw<acc_t>(z.data(), in, Wp, wc, OW, p);
              load_row<scalar_t, acc_t>(g.data(), dyp + seg * OW, OW);
            }
            bwd_epilogue<A, kTrain, acc_t>(g.data(), z.data(), L, 1, cp.view(c), 0, ss.data(), sb.data());
            if (kTrain && flat)  // dz is not 0 on the padded-width garbage columns: clear them
              for (int64_t oh = 0; oh < p.OH; ++oh) std::fill(g.data() + oh * Wp + OW, g.data() + (oh + 1) * Wp, acc_t(0));
            for (int64_t kh = 0; kh < p.KH; ++kh)
              for (int64_t kw = 0; kw < p.KW; ++kw) {
                const int64_t off = kh * p.dil_h * Wp + kw * p.dil_w;
                if (need_dw) fma_strided<acc_t>(pw.data() + (kh * p.KW + kw) * L, g.data(), in + off, L, sw);
                if (need_dx) scatter_axpy<acc_t>(dplane.data() + row0 + off, g.data(), wc[kh * p.KW + kw], L, sw);
              }
          }
          if (need_dx)
            for (int64_t h = 0; h < p.H; ++h)
              store_row<scalar_t, acc_t>(dx + nc * p.H * p.W + h * p.W, dplane.data() + (h + p.pad_h) * Wp + p.pad_w,
                                         p.W);
        }
        acc_t s_sum = 0, b_sum = 0;
        for (int64_t i = 0; i < L; ++i) {
          s_sum += ss[i];
          b_sum += sb[i];
        }
        ds_acc[c] = s_sum;
        db_acc[c] = b_sum;
        if (need_dw)
          for (int64_t t = 0; t < T; ++t) {
            acc_t sum = 0;
            for (int64_t i = 0; i < L; ++i) sum += pw[t * L + i];
            dw_acc[c * T + t] = sum;
          }
      }
    });
  });
}

template <typename scalar_t, typename acc_t, bool kTrain>
void bwd_nhwc(const DwConvBwdParams& p, const ChannelParams<acc_t>& cp, acc_t* dw_acc, acc_t* ds_acc,
              acc_t* db_acc) {
  const int64_t Wp = p.W + 2 * p.pad_w, T = p.KH * p.KW, C = p.C, OW = p.OW;
  const int64_t rows_total = p.N * p.OH;
  const auto* x = static_cast<const scalar_t*>(p.x_ptr);
  const auto* dy = static_cast<const scalar_t*>(p.grad_out_ptr);
  auto* dx = static_cast<scalar_t*>(p.grad_x_ptr);
  const bool need_dx = dx != nullptr, need_dw = dw_acc != nullptr;
  // Chunks are fixed by the shape (at most 64), never by the thread count: deterministic sums.
  const int64_t nchunks = std::min<int64_t>(rows_total, 64);
  const int64_t rows_per_chunk = (rows_total + nchunks - 1) / nchunks;
  const int64_t part = (T + 2) * C;  // per chunk: dw (T, C), dscale (C), dshift (C)
  std::vector<acc_t> partials(nchunks * part, acc_t(0));
  // gz (the gradient w.r.t. the conv output) is kept for the dx pass.
  std::vector<acc_t> gz(need_dx ? rows_total * OW * C : 0);
  act_switch(p.act, [&](auto act_c) {
    constexpr Act A = decltype(act_c)::value;
    at::parallel_for(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
      std::vector<std::vector<acc_t>> rows(p.KH, std::vector<acc_t>(Wp * C, acc_t(0)));
      const std::vector<acc_t> zrow(Wp * C, acc_t(0));
      std::vector<char> valid(p.KH);
      std::vector<const acc_t*> ptrs(p.KH);
      std::vector<acc_t> z(OW * C), g(OW * C), ss(OW * C), sb(OW * C);
      for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
        acc_t* pdw = partials.data() + chunk * part;
        acc_t* pds = pdw + T * C;
        acc_t* pdb = pds + C;
        std::fill(ss.begin(), ss.end(), acc_t(0));
        std::fill(sb.begin(), sb.end(), acc_t(0));
        const int64_t r_end = std::min(rows_total, (chunk + 1) * rows_per_chunk);
        for (int64_t r = chunk * rows_per_chunk; r < r_end; ++r) {
          const int64_t n = r / p.OH, oh = r % p.OH;
          conv_out_row_nhwc_padded<scalar_t, acc_t>(z.data(), rows, valid, ptrs, zrow.data(), x, p, cp, n, oh);
          acc_t* gr = need_dx ? gz.data() + r * OW * C : g.data();
          load_row<scalar_t, acc_t>(gr, dy + r * OW * C, OW * C);
          bwd_epilogue<A, kTrain, acc_t>(gr, z.data(), OW, C, cp.view(0), 1, ss.data(), sb.data());
          if (need_dw)
            for (int64_t kh = 0; kh < p.KH; ++kh)
              if (valid[kh])
                dweight_row_nhwc<acc_t>(pdw + kh * p.KW * C, gr, rows[kh].data(), OW, C, p.KW, p.stride_w, p.dil_w);
        }
        for (int64_t ow = 0; ow < OW; ++ow)
          for (int64_t c = 0; c < C; ++c) {
            pds[c] += ss[ow * C + c];
            pdb[c] += sb[ow * C + c];
          }
      }
    });
    if (need_dx) {
      // Gather form: each input row (n, ih) sums the output rows whose window covers it, so
      // tasks write disjoint rows of dx.
      at::parallel_for(0, p.N * p.H, grain_for(p.W * C * T), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> drow(Wp * C);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t n = r / p.H, ih = r % p.H;
          std::fill(drow.begin(), drow.end(), acc_t(0));
          for (int64_t kh = 0; kh < p.KH; ++kh) {
            const int64_t num = ih + p.pad_h - kh * p.dil_h;
            if (num < 0 || num % p.stride_h != 0) continue;
            const int64_t oh = num / p.stride_h;
            if (oh >= p.OH) continue;
            dx_row_nhwc<acc_t>(drow.data(), gz.data() + (n * p.OH + oh) * OW * C, cp.w.data() + kh * p.KW * C, OW,
                               C, p.KW, p.stride_w, p.dil_w);
          }
          store_row<scalar_t, acc_t>(dx + r * p.W * C, drow.data() + p.pad_w * C, p.W * C);
        }
      });
    }
  });
  // Ordered sum of the chunk partials; transpose dw from (T, C) to (C, T).
  std::fill(ds_acc, ds_acc + C, acc_t(0));
  std::fill(db_acc, db_acc + C, acc_t(0));
  if (need_dw) std::fill(dw_acc, dw_acc + C * T, acc_t(0));
  for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
    const acc_t* pdw = partials.data() + chunk * part;
    const acc_t* pds = pdw + T * C;
    const acc_t* pdb = pds + C;
    for (int64_t c = 0; c < C; ++c) {
      ds_acc[c] += pds[c];
      db_acc[c] += pdb[c];
    }
    if (need_dw)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < C; ++c) dw_acc[c * T + t] += pdw[t * C + c];
  }
}

// ---------------------------------------------------------------------------------------------
// Host entries registered with the dispatcher.

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
    using acc_t = at::opmath_type<scalar_t>;
    const auto cp = channel_params<acc_t>(weight, scale, shift, p.channels_last);
    if (p.channels_last) {
      fwd_nhwc<scalar_t, acc_t>(p, cp);
    } else {
      fwd_nchw<scalar_t, acc_t>(p, cp);
    }
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
  const bool is_double = x.scalar_type() == at::kDouble;
  const auto acc_opts = x.options().dtype(is_double ? at::kDouble : at::kFloat);
  at::Tensor dw_acc = at::zeros({p.C, p.KH * p.KW}, acc_opts);
  at::Tensor ds_acc = at::zeros({p.C}, acc_opts), db_acc = at::zeros({p.C}, acc_opts);
  (void)deterministic;  // the CPU reductions are always deterministic (fixed chunking)
  if (p.N > 0 && p.C > 0 && p.OH > 0 && p.OW > 0) {
    p.x_ptr = x.const_data_ptr();
    p.grad_out_ptr = dy.const_data_ptr();
    p.grad_x_ptr = need_dx ? dx.data_ptr() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_act_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto cp = channel_params<acc_t>(weight, scale, shift, p.channels_last);
      acc_t* dwp = need_dw ? dw_acc.data_ptr<acc_t>() : nullptr;
      if (p.channels_last) {
        bwd_nhwc<scalar_t, acc_t, false>(p, cp, dwp, ds_acc.data_ptr<acc_t>(), db_acc.data_ptr<acc_t>());
      } else {
        bwd_nchw<scalar_t, acc_t, false>(p, cp, dwp, ds_acc.data_ptr<acc_t>(), db_acc.data_ptr<acc_t>());
      }
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
//   1. stats: z per output row (NHWC) or plane (NCHW) in fp32, its per-channel mean and M2 =
//      sum (z - mean)^2 (two passes over the row in cache), one partial per row / plane; the
//      partials are merged in a fixed order (Chan et al.'s pairwise formula, in double), so the
//      result is deterministic and free of the sum / sum-of-squares cancellation.
//   2. the inference forward's epilogue with center = mean, scale = gamma * invstd, shift = beta:
//      u = (z - mean) * scale + beta, as BatchNorm computes it (no cancellation when |mean| >> std).
// Backward, two passes over (x, dy) (pre-activation recomputed):
//   A. S = sum gu * (z - mean), B = sum gu;  dgamma = invstd * S, dbeta = B
//   B. dz = scale * gu + lin * (z - mean) + cst, then dx and dweight from dz as in inference, with
//      lin = (2 * grad_var - gamma * invstd^3 * S) / M,  cst = (grad_mean - gamma * invstd * B) / M.

// Per-channel mean and M2 of one NHWC row z (OW x C) into mean[0..C), m2[0..C).
template <typename acc_t>
FASTDW_CLONES void row_stats_nhwc(acc_t* __restrict mean, acc_t* __restrict m2, const acc_t* __restrict z,
                                  int64_t OW, int64_t C) {
  for (int64_t c = 0; c < C; ++c) mean[c] = m2[c] = acc_t(0);
  for (int64_t ow = 0; ow < OW; ++ow)
    for (int64_t c = 0; c < C; ++c) mean[c] += z[ow * C + c];
  const acc_t inv = acc_t(1) / static_cast<acc_t>(OW);
  for (int64_t c = 0; c < C; ++c) mean[c] *= inv;
  for (int64_t ow = 0; ow < OW; ++ow)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = z[ow * C + c] - mean[c];
      m2[c] += d * d;
    }
}

// Mean and M2 of one NCHW plane (n values), accumulated in double: planes reach 10^4+ values.
template <typename acc_t>
void plane_stats(const acc_t* z, int64_t n, acc_t& mean, acc_t& m2) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += z[i];
  const double m = s / static_cast<double>(n);
  double q = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(z[i]) - m;
    q += d * d;
  }
  mean = static_cast<acc_t>(m);
  m2 = static_cast<acc_t>(q);
}

// Merges G partials (G, C) of `cnt` values each, in order: mean = avg of the partial means,
// M2 = sum M2_g + cnt * sum (mean_g - mean)^2; var = M2 / (G * cnt) (biased).
template <typename acc_t>
void merge_stats(const acc_t* pm, const acc_t* pq, int64_t G, int64_t C, int64_t cnt, acc_t* mean, acc_t* var) {
  std::vector<double> m(C, 0.0), q(C, 0.0);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) m[c] += pm[g * C + c];
  for (int64_t c = 0; c < C; ++c) m[c] /= static_cast<double>(G);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) {
      const double d = pm[g * C + c] - m[c];
      q[c] += pq[g * C + c] + static_cast<double>(cnt) * d * d;
    }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = static_cast<acc_t>(m[c]);
    var[c] = static_cast<acc_t>(q[c] / (static_cast<double>(G) * static_cast<double>(cnt)));
  }
}

// Batch mean and biased variance of z = conv(x, w) per channel (M = N*OH*OW > 0).
template <typename scalar_t, typename acc_t>
void batch_stats(const DwConvParams& p, const ChannelParams<acc_t>& cp, acc_t* mean, acc_t* var) {
  if (p.channels_last) {
    const int64_t R = p.N * p.OH;
    std::vector<acc_t> pm(R * p.C), pq(R * p.C);
    for_each_row_nhwc<scalar_t, acc_t>(p, cp, [&](int64_t r, acc_t* z) {
      row_stats_nhwc<acc_t>(pm.data() + r * p.C, pq.data() + r * p.C, z, p.OW, p.C);
    });
    merge_stats<acc_t>(pm.data(), pq.data(), R, p.C, p.OW, mean, var);
  } else {
    std::vector<acc_t> pm(p.N * p.C), pq(p.N * p.C);  // (N, C): plane nc = n * C + c
    for_each_plane_nchw<scalar_t, acc_t>(p, cp, [&](int64_t nc, acc_t* z) {
      plane_stats<acc_t>(z, p.OH * p.OW, pm[nc], pq[nc]);
    });
    merge_stats<acc_t>(pm.data(), pq.data(), p.N, p.C, p.OH * p.OW, mean, var);
  }
}

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
    using acc_t = at::opmath_type<scalar_t>;
    auto cp = channel_params<acc_t>(weight, c10::nullopt, c10::nullopt, p.channels_last);
    acc_t* m = mean.data_ptr<acc_t>();
    acc_t* v = var.data_ptr<acc_t>();
    batch_stats<scalar_t, acc_t>(p, cp, m, v);
    const auto g = channel_vector<acc_t>(gamma, p.C, acc_t(1));
    const auto b = channel_vector<acc_t>(beta, p.C, acc_t(0));
    const auto cb = channel_vector<acc_t>(bias, p.C, acc_t(0));
    for (int64_t c = 0; c < p.C; ++c) {
      const acc_t invstd = acc_t(1) / std::sqrt(v[c] + static_cast<acc_t>(eps));
      cp.scale[c] = g[c] * invstd;
      cp.shift[c] = b[c];
      cp.center[c] = m[c];
    }
    if (p.channels_last) {
      fwd_nhwc<scalar_t, acc_t>(p, cp);
    } else {
      fwd_nchw<scalar_t, acc_t>(p, cp);
    }
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
  const bool is_double = x.scalar_type() == at::kDouble;
  const auto acc_opts = x.options().dtype(is_double ? at::kDouble : at::kFloat);
  at::Tensor dw_acc = at::zeros({p.C, p.KH * p.KW}, acc_opts);
  at::Tensor dg_acc = at::zeros({p.C}, acc_opts), db_acc = at::zeros({p.C}, acc_opts);
  const int64_t M = p.N * p.OH * p.OW;
  if (M > 0 && p.C > 0) {
    p.x_ptr = x.const_data_ptr();
    p.grad_out_ptr = dy.const_data_ptr();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_act_train_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto cp = channel_params<acc_t>(weight, c10::nullopt, c10::nullopt, p.channels_last);
      const auto g = channel_vector<acc_t>(gamma, p.C, acc_t(1));
      const auto b = channel_vector<acc_t>(beta, p.C, acc_t(0));
      const auto mu = channel_vector<acc_t>(mean, p.C, acc_t(0));
      const auto var_v = channel_vector<acc_t>(var, p.C, acc_t(0));
      const auto gm = channel_vector<acc_t>(grad_mean, p.C, acc_t(0));
      const auto gv = channel_vector<acc_t>(grad_var, p.C, acc_t(0));
      std::vector<acc_t> invstd(p.C);
      for (int64_t c = 0; c < p.C; ++c) {
        invstd[c] = acc_t(1) / std::sqrt(var_v[c] + static_cast<acc_t>(eps));
        cp.scale[c] = g[c] * invstd[c];
        cp.shift[c] = b[c];
        cp.center[c] = mu[c];
      }
      // Pass A: S = sum gu * (z - mean), B = sum gu
      std::vector<acc_t> S(p.C), B(p.C);
      p.grad_x_ptr = nullptr;
      if (p.channels_last) {
        bwd_nhwc<scalar_t, acc_t, false>(p, cp, nullptr, S.data(), B.data());
      } else {
        bwd_nchw<scalar_t, acc_t, false>(p, cp, nullptr, S.data(), B.data());
      }
      acc_t* dgp = dg_acc.data_ptr<acc_t>();
      acc_t* dbp = db_acc.data_ptr<acc_t>();
      for (int64_t c = 0; c < p.C; ++c) {
        dgp[c] = invstd[c] * S[c];
        dbp[c] = B[c];
      }
      // Pass B: dz -> dx, dweight
      if (need_dx || need_dw) {
        const acc_t invM = acc_t(1) / static_cast<acc_t>(M);
        cp.lin.resize(p.C);
        cp.cst.resize(p.C);
        for (int64_t c = 0; c < p.C; ++c) {
          const acc_t is = invstd[c];
          cp.lin[c] = (acc_t(2) * gv[c] - g[c] * is * is * is * S[c]) * invM;
          cp.cst[c] = (gm[c] - cp.scale[c] * B[c]) * invM;
        }
        p.grad_x_ptr = need_dx ? dx.data_ptr() : nullptr;
        acc_t* dwp = need_dw ? dw_acc.data_ptr<acc_t>() : nullptr;
        if (p.channels_last) {
          bwd_nhwc<scalar_t, acc_t, true>(p, cp, dwp, S.data(), B.data());
        } else {
          bwd_nchw<scalar_t, acc_t, true>(p, cp, dwp, S.data(), B.data());
        }
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

}  // namespace fastdw
