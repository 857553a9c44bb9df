// Per-thread bodies of the GPU backward kernels of fastdw::dwconv_bn_act (inference BatchNorm) and
// fastdw::dwconv_bn_act_train (batch statistics); wrapped in __global__ kernels by
// dwconv_bn_act_bwd.cu / dwconv_bn_act_train_bwd.cu and emulated on the CPU by
// dwconv_bn_act_emulate.cpp, under the rules of dwconv_bn_act_kernels.h (one body per thread, no
// shared memory, barriers or atomics). Kept apart from the forward bodies so a change here
// rebuilds only the backward's objects.
//
// Math (inference): u = z * scale + shift, gu = dy * act'(u) (z recomputed, never saved);
//   dx = scale * sum_taps gu * w (the flipped kernel), G[c, t] = sum gu * x_tap, G[c, T] = sum gu;
//   dweight = scale * G[:, :T], dshift = G[:, T], dscale = sum gu * z (= sum_t w[c, t] * G[c, t],
//   the general path's form).
// Training: q = scale * gu + lin * (z - mean) + cst replaces gu (the batch-statistics terms,
//   dwconv_bn_act_train_kernels.h), with scale 1 in dx and dweight.
//
// Two schemes:
// - Fused (bwd_fused; KxK = 3x3, stride 1 / 2, no dilation, int32 offsets): one thread = one
//   channel of one image x a tile of outputs, walked down its rows with rolling register windows:
//   x rows -> z -> q for the tile and a halo of (K-2)/S+1 rows and columns past it (recomputed
//   by the neighbour too: that is the price of having no workspace), dx rows by the flipped
//   kernel as soon as their last q row is in (the stride-2 taps split by parity at compile time:
//   no tap is computed and masked away), and the tile's sums of q * x_tap, q and q * z kept in
//   registers and written once (one fp32 partial per tile). Then a deterministic two-stage
//   finish, parallel over (group of tiles, row, channel) and (row, channel), in double, in a
//   fixed order: no atomics, the same bits on every run and GPU.
// - General (any K / stride / dilation, 64-bit offsets): kernels 1-4 below (an fp32 gu
//   workspace, dx by gather, chunked partial sums, a per-channel finish).
#pragma once
#include "dwconv_bn_act_train_kernels.h"

namespace fastdw {
namespace kern {

struct BwdArgs {
  Args a;
  const void* dy;     // (N, C, OH, OW) in the op's layout
  float* gu;          // (N, C, OH, OW) fp32 workspace, same layout
  void* dx;           // (N, C, H, W) or nullptr
  double* partial;    // (nchunks, T+1, C) workspace
  int64_t nchunks, rows_per_chunk;  // chunks of the N*OH output rows
  // The fused path (bwd_fused): per-tile fp32 sums, kBwdRows rows per tile (see bwd_part_index),
  // the tiles split into ngroups runs of `group` for the finish, and its double stage-1 sums
  // (ngroups, kBwdRows, C).
  float* tpart = nullptr;
  double* gpart = nullptr;
  int64_t tiles = 0, ngroups = 0, group = 0;
};

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

// Backward pass A: part[chunk, 0, c] = sum gu * (z - center), part[chunk, 1, c] = sum gu.
template <typename scalar_t, Act A, bool kVec>
FASTDW_HD void train_bwd_reduce(const StatArgs& s, int64_t i) {
  constexpr int V = ChanVec<scalar_t, kVec>::V;
  const DwConvParams& p = s.a.p;
  const auto [c0, chunk, r0, r1] = chunk_thread(s, i, V);
  const auto* x = static_cast<const scalar_t*>(p.x_ptr);
  const auto* dy = static_cast<const scalar_t*>(s.dy);
  float sc[V], sh[V], ce[V];
  BlockSum<V> ss, sb;
  for (int v = 0; v < V; ++v) {
    sc[v] = s.a.scale[c0 + v];
    sh[v] = s.a.shift[c0 + v];
    ce[v] = s.a.center[c0 + v];
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / p.OH, oh = r % p.OH;
    for (int64_t ow = 0; ow < p.OW; ++ow) {
      float z[V], g[V];
      conv_vec_at<scalar_t, kVec>(s.a, x, n, c0, oh, ow, z);
      load_vec<scalar_t, kVec>(dy, offset(p.channels_last, n, c0, oh, ow, p.C, p.OH, p.OW), g);
      for (int v = 0; v < V; ++v) {
        const float zc = z[v] - ce[v];
        const float gu = act_bwd<A>(zc * sc[v] + sh[v], g[v]);
        sb.add(v, gu);
        ss.add(v, gu * zc);
      }
      sb.step();
      ss.step();
    }
  }
  for (int v = 0; v < V; ++v) {
    s.part[(chunk * 2 + 0) * p.C + c0 + v] = ss.value(v);
    s.part[(chunk * 2 + 1) * p.C + c0 + v] = sb.value(v);
  }
}

// Backward pass B: one thread per output element (memory order), dz into the fp32 workspace.
template <typename scalar_t, Act A>
FASTDW_HD void train_bwd_dz(const BwdArgs& b, int64_t i) {
  const DwConvParams& p = b.a.p;
  int64_t n, c, oh, ow;
  decode(p.channels_last, i, p.C, p.OH, p.OW, n, c, oh, ow);
  const auto* x = static_cast<const scalar_t*>(p.x_ptr);
  const float z = conv_at<scalar_t>(b.a, x, n, c, oh, ow);
  const float sc = b.a.scale[c], zc = z - b.a.center[c];
  const float gu = act_bwd<A>(zc * sc + b.a.shift[c], to_f(static_cast<const scalar_t*>(b.dy)[i]));
  b.gu[i] = gu * sc + (b.a.lin[c] * zc + b.a.cst[c]);
}

// ---------------------------------------------------------------------------------------------
// Fused backward.

// Tile of one thread: bwd_to(S) output rows x bwd_tw(S) output columns of one channel; the halo
// (rows and columns of q past the tile that its dx rows / columns also need) is (K - 2) / S + 1.
// Stride 2 takes 4 columns: its window of 2 * 4 + 3 x columns and 8 + 2 dx columns keeps the
// channels_last kernels (a 64-bit address per column) inside the register file.
constexpr int bwd_to(int S) { return S == 1 ? 16 : 8; }
constexpr int bwd_tw(int S) { return S == 1 ? 8 : 4; }
constexpr int bwd_halo(int K, int S) { return (K - 2) / S + 1; }
// Rows of per-tile sums: the K*K taps, sum q (dshift), sum q * (z - center) (dscale)
constexpr int bwd_rows(int K) { return K * K + 2; }

// act_bwd for 16-bit activations (as act_fwd_lowp for the forward): hardswish's u / 3 as a
// product, silu's sigmoid by the GPU's approximate exp and reciprocal (a few fp32 ulps, far below
// the 16-bit rounding of dy and x). No IEEE fp32 division, whose slow-path subroutine would hold
// registers across the whole tile. Same limits and NaN propagation.
template <Act A>
FASTDW_HD float act_bwd_lowp(float u, float g) {
  if constexpr (A == Act::Hardswish) {
    return u <= -3.f ? 0.f : (u < 3.f ? g * (u * (1.f / 3.f) + 0.5f) : g);
  } else if constexpr (A == Act::Silu) {
#ifdef __CUDA_ARCH__
    const float s = __fdividef(1.f, 1.f + __expf(-u));
#else
    const float s = 1.f / (1.f + std::exp(-u));
#endif
    return g * s * (1.f + u * (1.f - s));
  } else {
    return act_bwd<A>(u, g);
  }
}

// act'(u) * g with the activation a run-time value: the ReLU family as one test (g where
// lo < u < hi, else 0; NaN bounds make a side open and let NaN u through, as act_bwd does);
// kSmooth: hardswish or silu.
template <bool kSmooth, bool kLowp>
FASTDW_HD float act_bwd_rt(Act a, float u, float g, float lo, float hi) {
  if constexpr (kSmooth && kLowp) {
    return a == Act::Hardswish ? act_bwd_lowp<Act::Hardswish>(u, g) : act_bwd_lowp<Act::Silu>(u, g);
  } else if constexpr (kSmooth) {
    return a == Act::Hardswish ? act_bwd<Act::Hardswish>(u, g) : act_bwd<Act::Silu>(u, g);
  } else {
    return (u <= lo || u >= hi) ? 0.f : g;
  }
}

// What one tile needs: pointers at its origins (x: the window's first row / column; dy: the first
// q row / column, which are the tile's own first output; dx: the first dx row / column of the
// tile, K - 1 - pad past the window's), the coordinates of those origins for the bounds tests,
// the image sizes and element strides, and the channel's coefficients.
template <typename scalar_t>
struct BwdTile {
  const scalar_t* xs;
  const scalar_t* dys;
  scalar_t* dxs;  // nullptr: dx not wanted
  int32_t xr0, xc0, e0, f0, i0, j0;
  int32_t H, W, OH, OW, rs, cs, ors, ocs;
  bool first_row, first_col;  // the tile at row / column 0 also writes the dx rows / columns
                              // before its own (those whose q rows start at output 0)
  float sc, sh, ce, lin, cst, dxm, lo, hi;
  Act act;
};

// One tile. q row j (output e0 + j) needs x rows j*S .. j*S + K-1 of the window, kept in a
// rolling window of K rows (x row r in slot r % K); dx row ri (input i0 + ri) needs q rows
// (ri + K-1 - kh) / S for the kh of matching parity, the last of them floor((ri + K-1) / S): it is
// written right after that q row, from a rolling window of K q rows (q row j in slot j % K).
// Columns alike, all in registers. Owned outputs (rows < TO, columns < TW) add to the tap sums
// G[t] and to G[T]; the halo's q only feeds dx. q outside the output is 0 (x outside the input
// reads 0: the padding).
// The rows run as a loop of K owned rows per iteration, then the last K rows (the halo among
// them) expanded after it: the step of a row is written out 2K times, not kGR (18) times, so the
// kernel's loop (about 1.3 K instructions) stays in the SM's instruction cache where a tile
// unrolled whole (7-20 K instructions on its path) did not, and it compiles 3.5x faster. Inside an
// iteration the row's phase j % K is a constant, so every window index is, and the windows stay
// in registers.
// hi + lo += x by TwoSum (Knuth): hi the rounded sum, lo the accumulated rounding errors.
FASTDW_HD void two_sum_into(float& hi, float& lo, float x) {
  const float s = hi + x, bp = s - hi;
  lo += (hi - (s - bp)) + (x - bp);
  hi = s;
}

// G[T] and G[T+1] (dshift and dscale: sums of gu and gu * z that cancel to much less than their
// terms) add each row's fp32 sum by TwoSum into (G[T], lo[0]) and (G[T+1], lo[1]): the tile's
// sums then carry the error of their row sums only (dscale: inference only; training takes
// dgamma / dbeta from its reduce pass).
template <typename scalar_t, int K, int S, bool kSmooth, bool kTrain, bool kInterior>
FASTDW_HD void bwd_tile(const BwdTile<scalar_t>& t, const float (&w)[K * K], float (&G)[bwd_rows(K)],
                        float (&lo)[2]) {
  constexpr int TO = bwd_to(S), TW = bwd_tw(S), kH = bwd_halo(K, S);
  constexpr int kGR = TO + kH, kGC = TW + kH;  // q rows / columns computed
  constexpr int kXC = (kGC - 1) * S + K;       // x columns of the window
  constexpr int kDC = TW * S;                  // dx columns of the tile (after the first tile's K-1)
  static_assert(kGR % K == 0 && kGR - K <= TO, "the row loop takes K owned q rows per iteration");
  static_assert((kGR - 1) * S - (K - 1) + S - 1 < TO * S, "the last q row's dx rows are the tile's");
  static_assert(S <= K, "a step loads S new x rows into a window of K");
  bool xcol_ok[kXC], qcol_ok[kGC];
  FASTDW_UNROLL
  for (int q = 0; q < kXC; ++q) xcol_ok[q] = kInterior || (t.xc0 + q >= 0 && t.xc0 + q < t.W);
  FASTDW_UNROLL
  for (int g = 0; g < kGC; ++g) qcol_ok[g] = kInterior || t.f0 + g < t.OW;
  float xw[K][kXC];
  float qw[K][kGC];
  // x row r into its slot (r: the window's row; xr: its first element)
  const auto load_row = [&](int r, int slot, const scalar_t* xr) {
    const bool row_ok = kInterior || (t.xr0 + r >= 0 && t.xr0 + r < t.H);
    FASTDW_UNROLL
    for (int q = 0; q < kXC; ++q) xw[slot][q] = (row_ok && xcol_ok[q]) ? to_f(xr[q * t.cs]) : 0.f;
  };
  // before the loop, the rows q row 0 needs but does not load itself: 0 .. K-S-1
  FASTDW_UNROLL
  for (int r = 0; r < K - S; ++r) load_row(r, r, t.xs + r * t.rs);
  const scalar_t* xr = t.xs + (K - S) * t.rs;  // the next x row to load
  const scalar_t* dyr = t.dys;                 // q row j's dy row
  int32_t dxo = -(K - 1) * t.rs;               // q row j's first dx row (ri = j*S - (K-1)) from t.dxs
  // q row j, phase p = j % K; owned: j < TO (a constant wherever step is expanded)
  const auto step = [&](int p, int j, bool owned) {
    // the S x rows q row j adds to the window: rows j*S + K-S .. j*S + K-1
    FASTDW_UNROLL
    for (int s = 0; s < S; ++s) load_row(j * S + K - S + s, (p * S + K - S + s) % K, xr + s * t.rs);
    xr += S * t.rs;
    const bool qrow_ok = kInterior || t.e0 + j < t.OH;
    float zc[kGC];
    FASTDW_UNROLL
    for (int g = 0; g < kGC; ++g) {
      float z = 0.f;
      FASTDW_UNROLL
      for (int kh = 0; kh < K; ++kh)
        FASTDW_UNROLL
        for (int kw = 0; kw < K; ++kw) z += w[kh * K + kw] * xw[(p * S + kh) % K][g * S + kw];
      const bool ok = qrow_ok && qcol_ok[g];
      const float dy = ok ? to_f(dyr[g * t.ocs]) : 0.f;
      zc[g] = z - t.ce;
      float q = act_bwd_rt<kSmooth, !std::is_same_v<scalar_t, float>>(t.act, zc[g] * t.sc + t.sh, dy, t.lo, t.hi);
      if constexpr (kTrain) q = q * t.sc + (t.lin * zc[g] + t.cst);
      if (!kInterior && !ok) q = 0.f;
      qw[p][g] = q;
    }
    dyr += t.ors;
    if (owned) {  // its owned outputs into the sums
      float rsum = 0.f, rzsum = 0.f;
      FASTDW_UNROLL
      for (int g = 0; g < TW; ++g) {
        const float q = qw[p][g];
        FASTDW_UNROLL
        for (int kh = 0; kh < K; ++kh)
          FASTDW_UNROLL
          for (int kw = 0; kw < K; ++kw) G[kh * K + kw] += q * xw[(p * S + kh) % K][g * S + kw];
        rsum += q;
        if constexpr (!kTrain) rzsum += q * zc[g];
      }
      two_sum_into(G[K * K], lo[0], rsum);
      if constexpr (!kTrain) two_sum_into(G[K * K + 1], lo[1], rzsum);
    }
    if (t.dxs != nullptr) {
      // the dx rows whose last q row is j: ri = j*S - (K-1) + s
      FASTDW_UNROLL
      for (int s = 0; s < S; ++s) {
        const int ri = j * S - (K - 1) + s;
        // a dx row before the tile's first belongs to the tile above, but in the first row tile
        // (whose q rows before 0 are outside the output: skipped, not read as 0 * w)
        const bool row_ok = ri >= 0 ? (kInterior || (t.i0 + ri >= 0 && t.i0 + ri < t.H))
                                    : (!kInterior && t.first_row && t.i0 + ri >= 0 && t.i0 + ri < t.H);
        if (!row_ok) continue;
        scalar_t* dxrow = t.dxs + (dxo + s * t.rs);
        FASTDW_UNROLL
        for (int cc = -(K - 1); cc < kDC; ++cc) {
          if (cc < 0 && (kInterior || !t.first_col)) continue;
          if (!kInterior && !(t.j0 + cc >= 0 && t.j0 + cc < t.W)) continue;
          float acc = 0.f;
          FASTDW_UNROLL
          for (int kh = 0; kh < K; ++kh) {
            if (((s - kh) % S + S) % S != 0) continue;  // jr = ri + K-1 - kh = j*S + s - kh: a q row?
            const int dq = (s - kh) / S;                 // jr / S - j (exact)
            if (!kInterior && j + dq < 0) continue;      // before the first q row
            FASTDW_UNROLL
            for (int kw = 0; kw < K; ++kw) {
              const int jc = cc + K - 1 - kw;
              if (jc < 0 || jc % S != 0) continue;
              acc += qw[((p + dq) % K + K) % K][jc / S] * w[kh * K + kw];
            }
          }
          dxrow[cc * t.cs] = static_cast<scalar_t>(acc * t.dxm);
        }
      }
    }
    dxo += S * t.rs;
  };
  // rows 0 .. kGR-K-1 (all owned) in a loop, the last K (the halo among them) after it
#ifdef __CUDA_ARCH__
#pragma unroll 1
#endif
  for (int jb = 0; jb < kGR - K; jb += K) {
    FASTDW_UNROLL
    for (int p = 0; p < K; ++p) step(p, jb + p, true);
  }
  FASTDW_UNROLL
  for (int p = 0; p < K; ++p) step(p, kGR - K + p, kGR - K + p < TO);
}

// Tiles per image: row tiles x column tiles (the last tiles also cover the dx rows / columns
// past the output's reach: see bwd_tile).
FASTDW_HD int64_t bwd_row_tiles(const DwConvParams& p) {
  const int64_t to = p.stride_h == 1 ? bwd_to(1) : bwd_to(2);
  return (p.OH + to - 1) / to;
}
FASTDW_HD int64_t bwd_col_tiles(const DwConvParams& p) {
  const int64_t tw = p.stride_w == 1 ? bwd_tw(1) : bwd_tw(2);
  return (p.OW + tw - 1) / tw;
}
inline int64_t bwd_fused_threads(const DwConvParams& p) { return p.N * p.C * bwd_row_tiles(p) * bwd_col_tiles(p); }

// Element of the per-tile sums: tile tl (of `tiles` per channel), row j, channel c. Laid out so the
// writes of a warp are consecutive: (tiles, rows, C) in channels_last (threads run over c),
// (rows, C, tiles) in NCHW (threads run over the column tiles).
FASTDW_HD int64_t bwd_part_index(bool cl, int64_t tl, int64_t j, int64_t c, int64_t tiles, int64_t rows, int64_t C) {
  return cl ? (tl * rows + j) * C + c : (j * C + c) * tiles + tl;
}

// The fused backward: thread = one channel c of image n x tile (tr, tc), decoded as
// fwd_scalar_win's threads are (decode_channel_strip: channels_last c fastest, NCHW the column
// tile fastest).
template <typename scalar_t, int K, int S, bool kCL, bool kSmooth, bool kTrain>
FASTDW_HD void bwd_fused(const BwdArgs& b, int64_t i) {
  constexpr int TO = bwd_to(S), TW = bwd_tw(S), kH = bwd_halo(K, S), R = bwd_rows(K);
  const Args& a = b.a;
  const DwConvParams& p = a.p;
  const int32_t C = static_cast<int32_t>(p.C), H = static_cast<int32_t>(p.H), W = static_cast<int32_t>(p.W);
  const int32_t OH = static_cast<int32_t>(p.OH), OW = static_cast<int32_t>(p.OW);
  int32_t c, tc, tr;
  int64_t n;
  decode_channel_strip<kCL>(a, i, c, tr, tc, n);
  BwdTile<scalar_t> t;
  t.H = H;
  t.W = W;
  t.OH = OH;
  t.OW = OW;
  t.rs = kCL ? W * C : W;
  t.cs = kCL ? C : 1;
  t.ors = kCL ? OW * C : OW;
  t.ocs = kCL ? C : 1;
  t.e0 = tr * TO;
  t.f0 = tc * TW;
  t.xr0 = t.e0 * S - static_cast<int32_t>(p.pad_h);
  t.xc0 = t.f0 * S - static_cast<int32_t>(p.pad_w);
  t.i0 = t.xr0 + K - 1;
  t.j0 = t.xc0 + K - 1;
  t.first_row = tr == 0;
  t.first_col = tc == 0;
  const int64_t x_img = kCL ? n * p.H * p.W * p.C + c : (n * p.C + c) * p.H * p.W;
  const int64_t y_img = kCL ? n * p.OH * p.OW * p.C + c : (n * p.C + c) * p.OH * p.OW;
  t.xs = static_cast<const scalar_t*>(p.x_ptr) + x_img + (t.xr0 * t.rs + t.xc0 * t.cs);
  t.dys = static_cast<const scalar_t*>(b.dy) + y_img + (t.e0 * t.ors + t.f0 * t.ocs);
  t.dxs = b.dx != nullptr ? static_cast<scalar_t*>(b.dx) + x_img + (t.i0 * t.rs + t.j0 * t.cs) : nullptr;
  float w[K * K];
  FASTDW_UNROLL
  for (int tap = 0; tap < K * K; ++tap) w[tap] = a.wt[tap * p.C + c];
  t.sc = a.scale[c];
  t.sh = a.shift[c];
  t.ce = a.center != nullptr ? a.center[c] : 0.f;
  t.lin = kTrain ? a.lin[c] : 0.f;
  t.cst = kTrain ? a.cst[c] : 0.f;
  t.dxm = kTrain ? 1.f : t.sc;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  t.act = p.act;
  t.lo = p.act == Act::None ? nan : 0.f;
  t.hi = p.act == Act::Relu6 ? 6.f : nan;
  float G[R], lo[2] = {0.f, 0.f};
  FASTDW_UNROLL
  for (int r = 0; r < R; ++r) G[r] = 0.f;
  constexpr int kXR = (TO + kH - 1) * S + K, kXC = (TW + kH - 1) * S + K;
  const bool interior = !t.first_row && !t.first_col && t.xr0 >= 0 && t.xr0 + kXR <= H && t.xc0 >= 0 &&
                        t.xc0 + kXC <= W && t.e0 + TO + kH <= OH && t.f0 + TW + kH <= OW &&
                        t.i0 + TO * S <= H && t.j0 + TW * S <= W;
  if (interior) {
    bwd_tile<scalar_t, K, S, kSmooth, kTrain, true>(t, w, G, lo);
  } else {
    bwd_tile<scalar_t, K, S, kSmooth, kTrain, false>(t, w, G, lo);
  }
  if (b.tpart == nullptr) return;
  G[K * K] += lo[0];
  G[K * K + 1] += lo[1];
  const int64_t tl = (n * static_cast<int64_t>(a.div_th.d) + tr) * static_cast<int64_t>(a.div_tw.d) + tc;
  FASTDW_UNROLL
  for (int r = 0; r < R; ++r) b.tpart[bwd_part_index(kCL, tl, r, c, b.tiles, R, p.C)] = G[r];
}

// Finish, stage 1: thread (group gi, row j, channel c), c fastest: the double sum of the per-tile
// sums of tiles gi*group .. in tile order -> gpart[(gi, j, c)].
FASTDW_HD void bwd_reduce_tiles(const BwdArgs& b, int64_t i) {
  const DwConvParams& p = b.a.p;
  const int64_t R = p.KH * p.KW + 2;
  const int64_t c = i % p.C, j = (i / p.C) % R, gi = i / (p.C * R);
  const int64_t t0 = gi * b.group, t1 = t0 + b.group < b.tiles ? t0 + b.group : b.tiles;
  double s = 0.0;
  for (int64_t tl = t0; tl < t1; ++tl) s += b.tpart[bwd_part_index(p.channels_last, tl, j, c, b.tiles, R, p.C)];
  b.gpart[i] = s;
}

// Finish, stage 2: thread (row j, channel c): the groups summed in order; row j < T -> dweight
// (times scale: 1 in training), T -> dshift, T + 1 -> dscale.
template <typename weight_t>
FASTDW_HD void bwd_reduce_groups(const FinishArgs& f, int64_t i) {
  const BwdArgs& b = f.b;
  const DwConvParams& p = b.a.p;
  const int64_t T = p.KH * p.KW, R = T + 2;
  const int64_t c = i % p.C, j = i / p.C;
  double s = 0.0;
  for (int64_t gi = 0; gi < b.ngroups; ++gi) s += b.gpart[(gi * R + j) * p.C + c];
  if (j < T) {
    if (f.dw != nullptr) static_cast<weight_t*>(f.dw)[c * T + j] = static_cast<weight_t>(static_cast<float>(s * b.a.scale[c]));
  } else if (j == T) {
    if (f.dshift != nullptr) f.dshift[c] = static_cast<float>(s);
  } else {
    if (f.dscale != nullptr) f.dscale[c] = static_cast<float>(s);
  }
}

// Whether the fused backward serves a problem: 3x3, equal strides 1 or 2, no dilation, int32
// offsets (fits_int32 with a tile's reach past the edges).
inline bool bwd_fused_ok(const DwConvParams& p) {
  if (p.KH != 3 || p.KW != 3 || p.dil_h != 1 || p.dil_w != 1 || p.stride_h != p.stride_w) return false;
  if (p.stride_h != 1 && p.stride_h != 2) return false;
  return fits_int32(p, 80, 40, bwd_fused_threads(p));
}

// Kernel tags (see dwconv_bn_act_kernels.h).
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
template <typename scalar_t, Act A, bool kVec>
struct TrainBwdReduce {
  static FASTDW_HD void body(const StatArgs& s, int64_t i) { train_bwd_reduce<scalar_t, A, kVec>(s, i); }
};
template <typename scalar_t, Act A>
struct TrainBwdDz {
  static FASTDW_HD void body(const BwdArgs& b, int64_t i) { train_bwd_dz<scalar_t, A>(b, i); }
};
template <typename scalar_t, int K, int S, bool kCL, bool kSmooth, bool kTrain>
struct BwdFused {
  static constexpr int kThreads = 128;
  static FASTDW_HD void body(const BwdArgs& b, int64_t i) { bwd_fused<scalar_t, K, S, kCL, kSmooth, kTrain>(b, i); }
};
struct BwdReduceTiles {
  static FASTDW_HD void body(const BwdArgs& b, int64_t i) { bwd_reduce_tiles(b, i); }
};
template <typename weight_t>
struct BwdReduceGroups {
  static FASTDW_HD void body(const FinishArgs& f, int64_t i) { bwd_reduce_groups<weight_t>(f, i); }
};

}  // namespace kern
}  // namespace fastdw
