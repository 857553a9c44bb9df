"""Triton kernels for fastdw::dwconv_bn_act: the portable GPU backend, visible to torch.compile.

Same contract as the C++/CUDA op (csrc/fastdw.cpp):
    y = act(conv2d(x, weight, stride, padding, dilation, groups=C) * scale[c] + shift[c])
with fp32 accumulation, any kernel size / stride / padding / dilation, x in fp32/fp16/bf16, weight
in x's dtype or fp32, scale/shift optional (C,) fp32 or x's dtype, and the output layout rule of
fastdw._utils.output_memory_format.

Ops (torch.library):
    fastdw::dwconv_bn_act_triton            forward
    fastdw::_dwconv_bn_act_backward_triton  backward -> (dx, dweight, dscale, dshift)
On a GPU they are `torch.library.triton_op`s whose kernels launch through `wrap_triton`, so
Inductor sees and schedules the kernels inside a compiled graph. Under the Triton interpreter
(TRITON_INTERPRET=1, how CI runs these kernels on a CPU) kernels cannot be traced, so the same
functions are registered as opaque `custom_op`s with shape-only fake kernels instead.

Tiling. Every kernel works on a tile of [BLOCK_H * BLOCK_W spatial positions, BLOCK_C channels]
addressed through the tensor's strides, so one kernel serves both layouts; what differs is the
config list:
  * channels_last (stride(1) == 1): BLOCK_C = 32..64 channels on the fast axis, so a warp reads
    one contiguous run of C per pixel (64-128 B for fp16) and the tap loads of a tile overlap in
    L1; a 2-D spatial tile of 2x8 .. 4x8 pixels.
  * NCHW: BLOCK_C = 1 and a spatial tile of 8x32 .. 16x64 with W on the fast axis.
The input is read from DRAM once per tile (the K*K tap loads of a tile hit the same cache lines),
accumulated in fp32, and BN + activation are applied in registers before the single store.

Backward (recomputes the pre-activation, like the CUDA op):
  1. _dwconv_bwd_gu_kernel: per output tile, u = conv(x)*scale + shift, g = act'(u) * dy;
     stores gc = g * scale (fp32 workspace) and sums g*conv (dscale) and g (dshift).
  2. _dwconv_bwd_dx_kernel: per input tile, dx = sum_t w[t] * gc[shifted by t] (the gather form
     of the transposed conv) and, from the same gc loads and one read of x,
     dweight[t] += sum x * gc[shifted by t].
Both run as S "splits" x channel blocks; each program loops over every S-th tile and writes one
row of per-channel partial sums, which the host sums over S in a fixed order. The reductions use
no atomics, so the backward is deterministic whatever `deterministic` says.
"""
import contextlib
import functools
import inspect
import os
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._utils import (
    ACTIVATIONS,
    EAGER_TENSOR_TYPES as _PLAIN,
    check_args,
    check_channel_vectors,
    check_train_args,
    deterministic_requested,
    output_memory_format,
)
from .. import _autograd as AG  # the fake kernels and autograd shared with the C++ ops

__all__ = ["dwconv_bn_act_triton", "dwconv_bn_act_fwd", "dwconv_bn_act_bwd", "dwconv_bn_act_train_fwd",
           "dwconv_bn_act_train_bwd", "INTERPRET", "OP_KIND"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
OP_KIND = "custom_op (interpreter)" if INTERPRET else "triton_op"
# FASTDW_TRITON_AUTOTUNE=0 pins the first config (fast, deterministic tests); the interpreter
# always gets one config (autotuning several fails there).
AUTOTUNE = not INTERPRET and os.environ.get("FASTDW_TRITON_AUTOTUNE", "1") != "0"

_ACT_ID = {a: i for i, a in enumerate(ACTIVATIONS)}  # none, relu, relu6, hardswish, silu


# ------------------------------------------------------------------------------------------
# Activations (same formulas and kink conventions as csrc/activations.h and PyTorch)


@triton.jit
def _clamp_nan(u, lo, hi):
    # min(max(u, lo), hi) that lets NaN through
    return tl.where(u < lo, lo, tl.where(u > hi, hi, u))


@triton.jit
def _act_fwd(u, ACT):
    if ACT == 1:  # relu
        u = tl.where((u > 0.0) | (u != u), u, 0.0)
    elif ACT == 2:  # relu6
        u = _clamp_nan(u, 0.0, 6.0)
    elif ACT == 3:  # hardswish
        u = u * _clamp_nan(u + 3.0, 0.0, 6.0) / 6.0
    elif ACT == 4:  # silu
        u = u / (1.0 + tl.exp(-u))
    return u


@triton.jit
def _act_bwd(u, g, ACT):
    if ACT == 1:
        g = tl.where(u <= 0.0, 0.0, g)
    elif ACT == 2:
        g = tl.where((u <= 0.0) | (u >= 6.0), 0.0, g)
    elif ACT == 3:
        g = tl.where(u <= -3.0, 0.0, tl.where(u < 3.0, g * (u / 3.0 + 0.5), g))
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-u))
        g = g * s * (1.0 + u * (1.0 - s))
    return g


# ------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _fold(hi, lo, blk):
    """(hi, lo) += blk by TwoSum (Knuth). The per-channel sums of a program are built in two
    levels: fp32 blocks of _FOLD_EVERY tile sums (each a tree sum over the tile), folded into an
    unevaluated (hi, lo) pair that keeps about twice fp32's precision; fp64 arithmetic would be
    slow on most GPUs. The pair leaves the program as float64 and the host adds the programs'
    rows in float64, in a fixed order."""
    t = hi + blk
    bp = t - hi
    return t, lo + ((hi - (t - bp)) + (blk - bp))


_FOLD_EVERY = tl.constexpr(16)  # tile sums per fp32 block


@triton.jit
def _tile_coords(t, OH, OW, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Tile index t over (n, tile row, tile column) -> (n, rows, cols) of its BLOCK_H*BLOCK_W
    positions (row-major inside the tile)."""
    tiles_w = tl.cdiv(OW, BLOCK_W)
    tiles_h = tl.cdiv(OH, BLOCK_H)
    tw = t % tiles_w
    th = (t // tiles_w) % tiles_h
    n = t // (tiles_w * tiles_h)
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    rows = th * BLOCK_H + p // BLOCK_W
    cols = tw * BLOCK_W + p % BLOCK_W
    return n, rows, cols


@triton.jit
def _program_coords(C, BLOCK_C: tl.constexpr):
    """1-D grid with the channel block fastest: (pid // channel blocks, this program's channels,
    their in-range mask)."""
    pid = tl.program_id(0)
    cblocks = tl.cdiv(C, BLOCK_C)
    c = (pid % cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid // cblocks, c, c < C


@triton.jit
def _conv_tile(X, Wt, n, oh, ow, c, cm, pm, H, W, sxn, sxc, sxh, sxw,
               SH: tl.constexpr, SW: tl.constexpr, PH, PW, DH, DW,
               KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 [BLOCK_P, BLOCK_C] depthwise conv at output positions (oh, ow), channels c."""
    xb = X + n.to(tl.int64) * sxn
    xc = (c * sxc)[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in range(KH):  # runtime loop: only one row of taps in flight (no spills at 7x7)
        ih = oh * SH - PH + kh * DH
        hm = pm & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = ow * SW - PW + kw * DW
            m = hm & (iw >= 0) & (iw < W)
            xv = tl.load(xb + (ih * sxh + iw * sxw)[:, None] + xc, mask=m[:, None] & cm[None, :], other=0.0)
            wv = tl.load(Wt + c * (KH * KW) + (kh * KW + kw), mask=cm, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return acc


@triton.jit(do_not_specialize=["ACT", "N_BUCKET", "C_BUCKET", "HW_BUCKET"])  # one binary for all activations
def _dwconv_fwd_kernel(
    X, Wt, S, B, CEN, Y,
    C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    PH, PW, DH, DW,
    ACT, N_BUCKET, C_BUCKET, HW_BUCKET,  # the buckets: autotune key only
    SH: tl.constexpr, SW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_CENTER: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: one tile of BLOCK_H x BLOCK_W output pixels x BLOCK_C channels of one image.
    1-D grid, channel block fastest: (tiles, channel blocks) = (pid // CB, pid % CB).
    HAS_CENTER (training mode): u = (conv - CEN) * scale + shift, BatchNorm's order of operations."""
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    tile, c, cm = _program_coords(C, BLOCK_C)
    n, oh, ow = _tile_coords(tile, OH, OW, BLOCK_H, BLOCK_W)
    pm = (oh < OH) & (ow < OW)
    acc = _conv_tile(X, Wt, n, oh, ow, c, cm, pm, H, W, sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW,
                     KH, KW, BLOCK_P, BLOCK_C)
    if HAS_CENTER:
        acc = acc - tl.load(CEN + c, mask=cm, other=0.0)[None, :]
    if HAS_SCALE:
        acc = acc * tl.load(S + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(B + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    out = _act_fwd(acc, ACT)
    yp = Y + n.to(tl.int64) * syn + (oh * syh + ow * syw)[:, None] + (c * syc)[None, :]
    tl.store(yp, out.to(Y.dtype.element_ty), mask=pm[:, None] & cm[None, :])


@triton.jit(do_not_specialize=["ACT", "N_BUCKET", "C_BUCKET", "HW_BUCKET"])  # one binary for all activations
def _dwconv_bwd_gu_kernel(
    X, Wt, S, B, DY, GC, PART,
    N, C, H, W, OH, OW, NSPLIT,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, sgn, sgc, sgh, sgw,
    PH, PW, DH, DW,
    CEN, LIN, CST,
    ACT, N_BUCKET, C_BUCKET, HW_BUCKET,
    SH: tl.constexpr, SW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, STORE_GC: tl.constexpr, NEED_RED: tl.constexpr,
    TRAIN: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (split s, channel block): every NSPLIT-th output tile from s on. Recomputes
    u = conv(x)*scale + shift, g = act'(u)*dy; stores gc = g*scale (fp32); writes
    PART[s, 0, c] = sum g*conv (dscale) and PART[s, 1, c] = sum g (dshift), float64.
    TRAIN (batch-statistics BatchNorm): conv is centred on the batch mean CEN (u = (conv - CEN) *
    scale + shift, and the dscale sum is of g*(conv - CEN)), and gc = g*scale + LIN*(conv - CEN) +
    CST, the gradient of z through the batch statistics."""
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    s, c, cm = _program_coords(C, BLOCK_C)
    if HAS_SCALE:
        sc = tl.load(S + c, mask=cm, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        sh = tl.load(B + c, mask=cm, other=0.0).to(tl.float32)
    if TRAIN:
        cen = tl.load(CEN + c, mask=cm, other=0.0)
        lin = tl.load(LIN + c, mask=cm, other=0.0)
        cst = tl.load(CST + c, mask=cm, other=0.0)
    ds = tl.zeros([BLOCK_C], dtype=tl.float32)  # fp32 blocks, folded into (hi, lo) pairs
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    ds_hi = tl.zeros([BLOCK_C], dtype=tl.float32)
    ds_lo = tl.zeros([BLOCK_C], dtype=tl.float32)
    db_hi = tl.zeros([BLOCK_C], dtype=tl.float32)
    db_lo = tl.zeros([BLOCK_C], dtype=tl.float32)
    it = 0
    ntiles = N * tl.cdiv(OH, BLOCK_H) * tl.cdiv(OW, BLOCK_W)
    for t in range(s, ntiles, NSPLIT):
        n, oh, ow = _tile_coords(t, OH, OW, BLOCK_H, BLOCK_W)
        pm = (oh < OH) & (ow < OW)
        m = pm[:, None] & cm[None, :]
        acc = _conv_tile(X, Wt, n, oh, ow, c, cm, pm, H, W, sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW,
                         KH, KW, BLOCK_P, BLOCK_C)
        if TRAIN:
            zc = acc - cen[None, :]
        else:
            zc = acc
        u = zc
        if HAS_SCALE:
            u = u * sc[None, :]
        if HAS_SHIFT:
            u = u + sh[None, :]
        dy = tl.load(DY + n.to(tl.int64) * sdn + (oh * sdh + ow * sdw)[:, None] + (c * sdc)[None, :],
                     mask=m, other=0.0).to(tl.float32)
        g = tl.where(m, _act_bwd(u, dy, ACT), 0.0)
        if NEED_RED:
            ds += tl.sum(g * zc, axis=0)
            db += tl.sum(g, axis=0)
            it += 1
            if it % _FOLD_EVERY == 0:
                ds_hi, ds_lo = _fold(ds_hi, ds_lo, ds)
                db_hi, db_lo = _fold(db_hi, db_lo, db)
                ds = tl.zeros([BLOCK_C], dtype=tl.float32)
                db = tl.zeros([BLOCK_C], dtype=tl.float32)
        if STORE_GC:
            gc = g
            if HAS_SCALE:
                gc = g * sc[None, :]
            if TRAIN:
                gc = gc + (lin[None, :] * zc + cst[None, :])
            tl.store(GC + n.to(tl.int64) * sgn + (oh * sgh + ow * sgw)[:, None] + (c * sgc)[None, :], gc, mask=m)
    if NEED_RED:
        ds_hi, ds_lo = _fold(ds_hi, ds_lo, ds)
        db_hi, db_lo = _fold(db_hi, db_lo, db)
        tl.store(PART + (s * 2) * C + c, ds_hi.to(tl.float64) + ds_lo.to(tl.float64), mask=cm)
        tl.store(PART + (s * 2 + 1) * C + c, db_hi.to(tl.float64) + db_lo.to(tl.float64), mask=cm)


@triton.jit(do_not_specialize=["N_BUCKET", "C_BUCKET", "HW_BUCKET"])
def _dwconv_bwd_dx_kernel(
    X, Wt, GC, DX, PART,
    N, C, H, W, OH, OW, NSPLIT,
    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
    PH, PW, DH, DW,
    N_BUCKET, C_BUCKET, HW_BUCKET,
    SH: tl.constexpr, SW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, KKP: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (split s, channel block): every NSPLIT-th input tile from s on.
    dx[i] = sum_t w[t] * gc[o], dweight[t] += x[i] * gc[o], where o*stride = i + pad - t*dil.
    Writes PART[s, t, c] (t < KH*KW) = this program's dweight sums, float64."""
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    s, c, cm = _program_coords(C, BLOCK_C)
    taps = tl.arange(0, KKP)
    dw = tl.zeros([KKP, BLOCK_C], dtype=tl.float32)  # fp32 block, folded into (dw_hi, dw_lo)
    dw_hi = tl.zeros([KKP, BLOCK_C], dtype=tl.float32)
    dw_lo = tl.zeros([KKP, BLOCK_C], dtype=tl.float32)
    it = 0
    ntiles = N * tl.cdiv(H, BLOCK_H) * tl.cdiv(W, BLOCK_W)
    for t in range(s, ntiles, NSPLIT):
        n, ih, iw = _tile_coords(t, H, W, BLOCK_H, BLOCK_W)
        pm = (ih < H) & (iw < W)
        m = pm[:, None] & cm[None, :]
        if NEED_DW:
            xv = tl.load(X + n.to(tl.int64) * sxn + (ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :],
                         mask=m, other=0.0).to(tl.float32)
        gb = GC + n.to(tl.int64) * sgn
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for kh in range(KH):  # runtime loop (unrolled, 7x7 spills kilobytes on sm_90)
            hn = ih + PH - kh * DH
            oh = hn // SH
            hm = pm & (hn >= 0) & (oh < OH)
            if SH > 1:
                hm = hm & (hn % SH == 0)
            for kw in tl.static_range(KW):
                wn = iw + PW - kw * DW
                ow = wn // SW
                mm = hm & (wn >= 0) & (ow < OW)
                if SW > 1:
                    mm = mm & (wn % SW == 0)
                g = tl.load(gb + (oh * sgh + ow * sgw)[:, None] + (c * sgc)[None, :], mask=mm[:, None] & cm[None, :],
                            other=0.0)
                if NEED_DX:
                    wv = tl.load(Wt + c * (KH * KW) + (kh * KW + kw), mask=cm, other=0.0).to(tl.float32)
                    acc += g * wv[None, :]
                if NEED_DW:
                    part = tl.sum(g * xv, axis=0)
                    dw += tl.where(taps[:, None] == kh * KW + kw, part[None, :], 0.0)
        if NEED_DX:
            tl.store(DX + n.to(tl.int64) * sdn + (ih * sdh + iw * sdw)[:, None] + (c * sdc)[None, :],
                     acc.to(DX.dtype.element_ty), mask=m)
        if NEED_DW:
            it += 1
            if it % _FOLD_EVERY == 0:
                dw_hi, dw_lo = _fold(dw_hi, dw_lo, dw)
                dw = tl.zeros([KKP, BLOCK_C], dtype=tl.float32)
    if NEED_DW:
        dw_hi, dw_lo = _fold(dw_hi, dw_lo, dw)
        tl.store(PART + (s * KKP + taps[:, None]) * C + c[None, :], dw_hi.to(tl.float64) + dw_lo.to(tl.float64),
                 mask=(taps[:, None] < KH * KW) & cm[None, :])


@triton.jit(do_not_specialize=["N_BUCKET", "C_BUCKET", "HW_BUCKET"])
def _dwconv_train_stats_kernel(
    X, Wt, PART,
    N, C, H, W, OH, OW, NSPLIT,
    sxn, sxc, sxh, sxw,
    PH, PW, DH, DW,
    N_BUCKET, C_BUCKET, HW_BUCKET,
    SH: tl.constexpr, SW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (split s, channel block): every NSPLIT-th output tile from s on. The count, mean
    and M2 = sum (z - mean)^2 of z = conv(x); writes PART[s, 0..2, c] = (n, mean, M2) in float64.
      mean = s1 / n, s1 = sum z: its terms cancel to much less than themselves (a mean next to a
        large spread), so it is kept per tile position as (hi, lo) pairs updated by TwoSum at
        every tile, reduced over the positions in float64 at the end;
      M2 = s2 - n (mean - k)^2, s2 = sum (z - k)^2 with k the first tile's mean (no sum /
        sum-of-squares cancellation while k is near the mean); positive terms: fp32 blocks of
        tile sums folded into (hi, lo) (_fold). (s1 is not taken of z - k: rounding z - k to
        fp32 drops k's low bits the same way for every term, a bias that grows with n.)"""
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    s, c, cm = _program_coords(C, BLOCK_C)
    cnt = 0
    k = tl.zeros([BLOCK_C], dtype=tl.float32)
    s1_hi = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    s1_lo = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2_hi = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2_lo = tl.zeros([BLOCK_C], dtype=tl.float32)
    it = 0
    ntiles = N * tl.cdiv(OH, BLOCK_H) * tl.cdiv(OW, BLOCK_W)
    for t in range(s, ntiles, NSPLIT):
        n, oh, ow = _tile_coords(t, OH, OW, BLOCK_H, BLOCK_W)
        pm = (oh < OH) & (ow < OW)
        acc = _conv_tile(X, Wt, n, oh, ow, c, cm, pm, H, W, sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW,
                         KH, KW, BLOCK_P, BLOCK_C)
        nb = tl.sum(pm.to(tl.int32), axis=0)  # >= 1: every tile holds an output position
        if it == 0:
            k = tl.sum(tl.where(pm[:, None], acc, 0.0), axis=0) / nb.to(tl.float32)
        s1_hi, s1_lo = _fold(s1_hi, s1_lo, tl.where(pm[:, None], acc, 0.0))
        d = tl.where(pm[:, None], acc - k[None, :], 0.0)
        s2 += tl.sum(d * d, axis=0)
        cnt += nb
        it += 1
        if it % _FOLD_EVERY == 0:
            s2_hi, s2_lo = _fold(s2_hi, s2_lo, s2)
            s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2_hi, s2_lo = _fold(s2_hi, s2_lo, s2)
    n64 = tl.maximum(cnt, 1).to(tl.float64)
    t1 = tl.sum(s1_hi.to(tl.float64), axis=0) + tl.sum(s1_lo.to(tl.float64), axis=0)
    t2 = s2_hi.to(tl.float64) + s2_lo.to(tl.float64)
    mean = t1 / n64
    e = mean - k.to(tl.float64)
    m2 = tl.maximum(t2 - n64 * e * e, 0.0)
    tl.store(PART + (s * 3) * C + c, tl.zeros([BLOCK_C], dtype=tl.float64) + cnt.to(tl.float64), mask=cm)
    tl.store(PART + (s * 3 + 1) * C + c, mean, mask=cm)
    tl.store(PART + (s * 3 + 2) * C + c, m2, mask=cm)


# ------------------------------------------------------------------------------------------
# Configs and autotuning. Keys: batch, channel and spatial size buckets, stride, kernel size (and,
# added by Triton, the tensors' dtypes) -- what changes the best tile, nothing that varies per call.
# Three rules keep autotuning from changing results or failing (see _run):
#   * deterministic mode (torch.use_deterministic_algorithms(True), FASTDW_DETERMINISTIC=1, or the
#     backward ops' `deterministic` argument) launches the pinned kernels, the first config of each
#     list: the backward's partial sums are grouped by tile, so their bits would otherwise depend on
#     which config won the benchmark in this process;
#   * inside a CUDA-graph capture, a key this process has not tuned yet takes the pinned config
#     (benchmarking synchronizes, which a capture forbids); keys tuned before the capture (by a
#     warm-up call) keep their tuned config;
#   * the benchmark results persist across processes (Triton's cache_results, where it has it).

_KEY = ["N_BUCKET", "C_BUCKET", "HW_BUCKET", "SH", "KH", "KW"]


def _cfg(bh, bw, bc, warps, stages=1):
    return triton.Config({"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_C": bc}, num_warps=warps, num_stages=stages)


# channels_last: channels on the fast axis
# (4 warps: 8-warp variants of these tiles, and a 1x8x128 tile, spill on sm_90; see
# scripts/triton_compile_check.py)
_CL_CONFIGS = [_cfg(2, 8, 64, 4), _cfg(4, 8, 32, 4), _cfg(2, 16, 32, 4), _cfg(1, 16, 64, 4)]
# NCHW: one channel per program, W on the fast axis
_NCHW_CONFIGS = [_cfg(8, 32, 1, 4), _cfg(16, 32, 1, 4), _cfg(4, 64, 1, 4), _cfg(16, 64, 1, 8)]
# the interpreter: one config, big tiles (it costs ~50 ms per program instance, not per element)
_INTERP_CL = [_cfg(8, 8, 16, 4)]
_INTERP_NCHW = [_cfg(16, 16, 1, 4)]


def _configs(channels_last: bool):
    if INTERPRET:
        return _INTERP_CL if channels_last else _INTERP_NCHW
    cfgs = _CL_CONFIGS if channels_last else _NCHW_CONFIGS
    return cfgs if AUTOTUNE else cfgs[:1]


_CACHE_RESULTS = "cache_results" in inspect.signature(triton.autotune).parameters


def _autotune(kernel, configs):
    extra = {"cache_results": True} if _CACHE_RESULTS and len(configs) > 1 else {}
    return triton.autotune(configs=configs, key=_KEY, **extra)(kernel)


def _tuned(kernel, channels_last: bool):
    return _autotune(kernel, _configs(channels_last))


def _pinned_table(kernel, tuned):
    """The pinned kernels (first config) beside the tuned ones: the same table when one config is
    all there is (interpreter, FASTDW_TRITON_AUTOTUNE=0)."""
    if all(len(k.configs) == 1 for k in tuned.values()):
        return tuned
    return {cl: _autotune(kernel, _configs(cl)[:1]) for cl in (True, False)}


_FWD = {cl: _tuned(_dwconv_fwd_kernel, cl) for cl in (True, False)}
_BWD_GU = {cl: _tuned(_dwconv_bwd_gu_kernel, cl) for cl in (True, False)}
_BWD_DX = {cl: _tuned(_dwconv_bwd_dx_kernel, cl) for cl in (True, False)}
_TRAIN_STATS = {cl: _tuned(_dwconv_train_stats_kernel, cl) for cl in (True, False)}
_PINNED = {id(t): _pinned_table(k, t) for k, t in ((_dwconv_fwd_kernel, _FWD), (_dwconv_bwd_gu_kernel, _BWD_GU),
                                                  (_dwconv_bwd_dx_kernel, _BWD_DX),
                                                  (_dwconv_train_stats_kernel, _TRAIN_STATS))}
# (kernel, key) pairs this process launched through the autotuner outside a CUDA-graph capture
_TUNED_KEYS: set = set()


def _capturing(x) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _run(table, grid, args, consts, x, k, deterministic=None):
    """Launch a kernel of `table` (_FWD, ...) for the launch's plan `k` (_common) with positional
    `args` and constexpr keyword arguments `consts`: the autotuned one, or the pinned one in
    deterministic mode (None: deterministic_requested()) and for a key not yet tuned while the
    stream is being captured. Traced calls (torch.compile) take the autotuned one: Inductor tunes
    user kernels itself."""
    cl = k["cl"]
    kernel, pinned = table[cl], _PINNED[id(table)]
    key = None
    if pinned is not table:
        if deterministic is None:
            deterministic = deterministic_requested()
        if deterministic:
            kernel = pinned[cl]
        elif type(x) in _PLAIN:
            # what Triton's autotuner keys on: the buckets, the constexprs (SH, KH, KW, and the flags
            # that choose which tensors are dummies) and the dtypes of x and the parameters, which
            # fix every tensor argument's dtype
            key = (k["buckets"], tuple(consts.values()), x.dtype, k["wt"].dtype, k["s"].dtype, k["b"].dtype)
            if (kernel, key) not in _TUNED_KEYS and _capturing(x):
                kernel, key = pinned[cl], None
    _launch(kernel)[grid](*args, **consts)
    if key is not None:
        _TUNED_KEYS.add((kernel, key))  # after the launch: a failed first launch tuned nothing


# ------------------------------------------------------------------------------------------
# Launchers


def _launch(kernel):
    if INTERPRET:
        return kernel
    return torch.library.wrap_triton(kernel)


def _channels_fast(x: Tensor) -> bool:
    """Pick the channels-on-the-fast-axis configs when x is stored channels_last."""
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(x: Tensor, positions: int, channel_programs: int) -> int:
    """How many programs share one channel block's reduction in the backward: enough programs
    (about 8 per SM) to fill the GPU, at most one per 256 positions. Independent of the tile
    config, so the host knows how many partial rows to sum."""
    if INTERPRET or x.device.type != "cuda":
        return max(1, min(2, positions // 64))
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(positions, 256), (8 * sms) // max(1, channel_programs)))


def _check_triton_limits(x):
    """What the Triton kernels add to the op's argument checks: no fp64, int32 offsets per image."""
    torch._check_type(x.dtype in (torch.float32, torch.float16, torch.bfloat16),
                      lambda: f"fastdw: the Triton backend takes float32, float16 or bfloat16 x; got {x.dtype}")
    torch._check_value(x.shape[1] * x.shape[2] * x.shape[3] < 2 ** 31,
                       lambda: "fastdw: the Triton backend needs C*H*W < 2**31 elements per image; got "
                               f"{list(x.shape)}")


def _check_bwd(grad_out, x, OH, OW, output_mask):
    """The backward ops' own arguments: grad_out of the output's shape and x's dtype, 4 mask bits."""
    N, C = x.shape[0], x.shape[1]
    torch._check_value(len(output_mask) == 4, lambda: f"fastdw: output_mask must have 4 entries; got {output_mask}")
    torch._check_value(tuple(grad_out.shape) == (N, C, OH, OW),
                       lambda: f"fastdw: grad_out must have the output's shape {[N, C, OH, OW]}; got "
                               f"{list(grad_out.shape)}")
    torch._check_type(grad_out.dtype == x.dtype,
                      lambda: f"fastdw: grad_out must have x's dtype {x.dtype}; got {grad_out.dtype}")
    torch._check_value(grad_out.device == x.device,
                       lambda: f"fastdw: grad_out must be on x's device ({x.device}); got {grad_out.device}")


# ------------------------------------------------------------------------------------------
# Host side: the argument checks once per signature, the device guard


def _bucket(v) -> int:
    """Autotune bucket of a size: the next power of two; 0 for a symbolic size (a traced call must
    not specialize on it)."""
    return _next_pow2(v) if isinstance(v, int) else 0


class _Plan(NamedTuple):
    """What a launch derives from its arguments' metadata alone (memoized by _memo)."""
    OH: int
    OW: int
    fmt: torch.memory_format  # the layout of y and dx (output_memory_format)
    cl: bool                  # the channels-on-the-fast-axis configs
    buckets: Tuple[int, int, int]  # autotune buckets of N, C, OH*OW
    dense_w: bool             # the weight already is (C, kH*kW) with unit strides


def _plan(x, weight, OH, OW) -> _Plan:
    return _Plan(OH, OW, output_memory_format(x), _channels_fast(x),
                 (_bucket(x.shape[0]), _bucket(x.shape[1]), _bucket(OH * OW)), weight.is_contiguous())


def _fwd_plan(x, weight, scale, shift, stride, padding, dilation, act) -> _Plan:
    OH, OW = check_args(x, weight, scale, shift, stride, padding, dilation, act)
    _check_triton_limits(x)
    return _plan(x, weight, OH, OW)


def _bwd_plan(grad_out, x, weight, scale, shift, stride, padding, dilation, act, output_mask) -> _Plan:
    pl = _fwd_plan(x, weight, scale, shift, stride, padding, dilation, act)
    _check_bwd(grad_out, x, pl.OH, pl.OW, output_mask)
    return pl


def _train_fwd_plan(x, weight, bias, gamma, beta, stride, padding, dilation, eps, act) -> _Plan:
    OH, OW = check_train_args(x, weight, bias, gamma, beta, stride, padding, dilation, eps, act)
    _check_triton_limits(x)
    return _plan(x, weight, OH, OW)


def _train_bwd_plan(grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var, stride, padding, dilation, eps,
                    act, output_mask) -> _Plan:
    pl = _train_fwd_plan(x, weight, None, gamma, beta, stride, padding, dilation, eps, act)
    check_channel_vectors(x, mean=mean, var=var, grad_mean=grad_mean, grad_var=grad_var)
    _check_bwd(grad_y, x, pl.OH, pl.OW, output_mask)
    return pl


_MEMO: dict = {}
_MEMO_MAX = 4096


def _meta(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _memo(fn, tensors, rest, *args) -> _Plan:
    """fn(*args): the argument checks and the plan, which read only the metadata (shape, strides,
    dtype, device) of `tensors` and the values `rest`; memoized on those when every tensor is an
    eager one, so a repeated call costs a dictionary lookup instead of ~40 checks. Calls that fail
    are never memoized (they raise each time); traced calls (fake tensors, symbolic sizes) always
    run fn."""
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.layout != torch.strided):
            return fn(*args)
    key = (fn, rest, *map(_meta, tensors))
    pl = _MEMO.get(key)
    if pl is None:
        pl = fn(*args)
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[key] = pl
    return pl


def _on_device(x):
    """x's GPU made current for the launches (Triton launches on the current device, whatever
    device the tensors are on); a no-op when it already is, and for CPU, meta or traced tensors."""
    if type(x) in _PLAIN and x.is_cuda:
        index = x.get_device()
        if index != torch.cuda.current_device():
            return torch.cuda.device(index)
    return contextlib.nullcontext()


def _common(x, weight, scale, shift, act, pl: _Plan):
    """What every launch reads, made dense: the kernels index the weight as (C, kH*kW) and the
    per-channel vectors as (C,) with unit stride, so a strided view, an expanded (stride-0)
    tensor or a prepacked weight (fastdw.prepack_params) is copied first (C + C*kH*kW elements)."""
    N, C, H, W = x.shape
    KH, KW = weight.shape[2], weight.shape[3]
    wt = weight if pl.dense_w else weight.reshape(C, KH * KW).contiguous()
    return dict(N=N, C=C, H=H, W=W, KH=KH, KW=KW, wt=wt,
                s=scale.contiguous() if scale is not None else wt, b=shift.contiguous() if shift is not None else wt,
                cl=pl.cl, act=_ACT_ID[act], buckets=pl.buckets)


def _rest(stride, padding, dilation, *more):
    return (tuple(stride), tuple(padding), tuple(dilation), *more)


def dwconv_bn_act_fwd(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                      stride: List[int], padding: List[int], dilation: List[int], act: str) -> Tensor:
    """Forward launcher (the body of fastdw::dwconv_bn_act_triton; its annotations are the
    op's schema)."""
    pl = _memo(_fwd_plan, (x, weight, scale, shift), _rest(stride, padding, dilation, act),
               x, weight, scale, shift, stride, padding, dilation, act)
    with _on_device(x):
        return _fwd_launch(x, weight, scale, shift, stride, padding, dilation, act, pl)


def _fwd_launch(x, weight, scale, shift, stride, padding, dilation, act, pl: _Plan, center=None):
    """The forward kernel; `center` (fp32 (C,), training mode): u = (conv - center) * scale + shift."""
    N, C = x.shape[0], x.shape[1]
    OH, OW = pl.OH, pl.OW
    y = torch.empty((N, C, OH, OW), dtype=x.dtype, device=x.device, memory_format=pl.fmt)
    if y.numel() == 0:
        return y
    k = _common(x, weight, scale, shift, act, pl)

    def grid(meta):
        return (N * triton.cdiv(OH, meta["BLOCK_H"]) * triton.cdiv(OW, meta["BLOCK_W"])
                * triton.cdiv(C, meta["BLOCK_C"]),)

    _run(_FWD, grid, (
        x, k["wt"], k["s"], k["b"], center if center is not None else k["wt"], y,
        C, k["H"], k["W"], OH, OW,
        *x.stride(), *y.stride(),
        padding[0], padding[1], dilation[0], dilation[1],
        k["act"], *k["buckets"],
    ), dict(SH=stride[0], SW=stride[1], KH=k["KH"], KW=k["KW"],
            HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_CENTER=center is not None),
        x, k)
    return y


def _cprog(k) -> int:
    """Channel programs per split: an estimate (BLOCK_C = 64 for channels_last, 1 for NCHW)."""
    return triton.cdiv(k["C"], 64) if k["cl"] else k["C"]


def _launch_gu(x, k, grad_out, gc, stride, padding, dilation, OH, OW, has_scale, has_shift, store_gc, need_red,
               deterministic, train=None):
    """The gu kernel over all outputs: gc (when store_gc) and the (NSPLIT, 2, C) partial sums of
    dscale / dshift (returned when need_red). train = (center, lin, cst) switches on the
    batch-statistics terms (k["s"], k["b"] are then the folded batch scale and shift)."""
    N, C, H, W = k["N"], k["C"], k["H"], k["W"]
    ns = _num_splits(x, N * OH * OW, _cprog(k))
    part = torch.empty((ns, 2, C), dtype=torch.float64, device=x.device) if need_red else gc
    cen, lin, cst = train if train is not None else (k["wt"],) * 3

    def grid(meta):
        return (ns * triton.cdiv(C, meta["BLOCK_C"]),)

    _run(_BWD_GU, grid, (
        x, k["wt"], k["s"], k["b"], grad_out, gc, part,
        N, C, H, W, OH, OW, ns,
        *x.stride(), *grad_out.stride(), *(gc.stride() if store_gc else (0, 0, 0, 0)),
        padding[0], padding[1], dilation[0], dilation[1],
        cen, lin, cst,
        k["act"], *k["buckets"],
    ), dict(SH=stride[0], SW=stride[1], KH=k["KH"], KW=k["KW"],
            HAS_SCALE=has_scale, HAS_SHIFT=has_shift, STORE_GC=store_gc, NEED_RED=need_red,
            TRAIN=train is not None), x, k, deterministic)
    return part if need_red else None


def _launch_dx(x, k, gc, dx, stride, padding, dilation, OH, OW, need_dx, need_dw, deterministic):
    """The dx kernel from gc (the gradient of the conv output): fills dx (when need_dx) and
    returns dweight as (C, KH*KW) float64 (when need_dw, else None)."""
    N, C, H, W = k["N"], k["C"], k["H"], k["W"]
    KK = k["KH"] * k["KW"]
    KKP = _next_pow2(KK)
    ns = _num_splits(x, N * H * W, _cprog(k))
    part = torch.empty((ns, KKP, C), dtype=torch.float64, device=x.device) if need_dw else gc

    def grid(meta):
        return (ns * triton.cdiv(C, meta["BLOCK_C"]),)

    _run(_BWD_DX, grid, (
        x, k["wt"], gc, dx, part,
        N, C, H, W, OH, OW, ns,
        *x.stride(), *gc.stride(), *(dx.stride() if need_dx else (0, 0, 0, 0)),
        padding[0], padding[1], dilation[0], dilation[1],
        *k["buckets"],
    ), dict(SH=stride[0], SW=stride[1], KH=k["KH"], KW=k["KW"], KKP=KKP, NEED_DX=need_dx, NEED_DW=need_dw),
        x, k, deterministic)
    return part.sum(dim=0)[:KK].t() if need_dw else None


def dwconv_bn_act_bwd(grad_out: Tensor, x: Tensor, weight: Tensor, scale: Optional[Tensor],
                      shift: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                      act: str, output_mask: List[bool], deterministic: bool
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward launcher (the body of fastdw::_dwconv_bn_act_backward_triton). Returns
    (dx, dweight, dscale, dshift); entries not asked for by output_mask (or whose input is None)
    are empty (0,) tensors. Run to run deterministic (fixed-order partial sums, no atomics);
    `deterministic` also pins the tile config, so the bits do not depend on autotuning either."""
    pl = _memo(_bwd_plan, (grad_out, x, weight, scale, shift), _rest(stride, padding, dilation, act, tuple(output_mask)),
               grad_out, x, weight, scale, shift, stride, padding, dilation, act, output_mask)
    with _on_device(x):
        return _bwd(grad_out, x, weight, scale, shift, stride, padding, dilation, act, output_mask, deterministic, pl)


def _bwd(grad_out, x, weight, scale, shift, stride, padding, dilation, act, output_mask, deterministic, pl):
    OH, OW = pl.OH, pl.OW
    N, C, H, W = x.shape
    need_dx, need_dw = bool(output_mask[0]), bool(output_mask[1])
    need_ds, need_db = bool(output_mask[2]) and scale is not None, bool(output_mask[3]) and shift is not None
    fmt = pl.fmt
    f32 = dict(dtype=torch.float32, device=x.device)
    KH, KW = weight.shape[2], weight.shape[3]
    KK = KH * KW
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if need_dx \
        else torch.empty((0,), dtype=x.dtype, device=x.device)
    dw = torch.zeros((C, KK), **f32) if need_dw else None
    ds = torch.zeros((C,), **f32) if need_ds else None
    db = torch.zeros((C,), **f32) if need_db else None

    if x.numel() > 0 and (need_dx or need_dw or need_ds or need_db):
        k = _common(x, weight, scale, shift, act, pl)
        need_red = need_ds or need_db
        store_gc = need_dx or need_dw
        gc = torch.empty((N, C, OH, OW), memory_format=fmt, **f32) if store_gc else dx
        part1 = _launch_gu(x, k, grad_out, gc, stride, padding, dilation, OH, OW, has_scale=scale is not None,
                           has_shift=shift is not None, store_gc=store_gc, need_red=need_red,
                           deterministic=deterministic)
        if need_red:
            # separate sums: the returned gradients must not alias each other
            if need_ds:
                ds = part1[:, 0].sum(dim=0)
            if need_db:
                db = part1[:, 1].sum(dim=0)
        if store_gc:
            dw = _launch_dx(x, k, gc, dx, stride, padding, dilation, OH, OW, need_dx, need_dw, deterministic)

    def out(t, like):  # in the input's dtype; an empty (0,) tensor where not asked for
        dtype = like.dtype if like is not None else torch.float32
        return t.to(dtype) if t is not None else torch.empty((0,), dtype=dtype, device=x.device)

    return (dx, out(dw.reshape(C, 1, KH, KW) if need_dw else None, weight).contiguous(), out(ds, scale),
            out(db, shift))


# ------------------------------------------------------------------------------------------
# Training mode (batch-statistics BatchNorm)


def _f32_or(t: Optional[Tensor], like: Tensor, value: float) -> Tensor:
    return t.float() if t is not None else torch.full((like.shape[1],), value, dtype=torch.float32, device=like.device)


def dwconv_bn_act_train_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: Optional[Tensor],
                            beta: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                            eps: float, act: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Training forward launcher (the body of fastdw::dwconv_bn_act_train_triton): the statistics
    kernel, the merge of its per-split (n, mean, M2) rows in float64 (fixed order), then the
    inference forward with center = mean, scale = gamma * invstd, shift = beta. Returns
    (y, mean + bias, biased var), mean and var fp32 (C,)."""
    pl = _memo(_train_fwd_plan, (x, weight, bias, gamma, beta), _rest(stride, padding, dilation, eps, act),
               x, weight, bias, gamma, beta, stride, padding, dilation, eps, act)
    with _on_device(x):
        return _train_fwd(x, weight, bias, gamma, beta, stride, padding, dilation, eps, act, pl)


def _train_fwd(x, weight, bias, gamma, beta, stride, padding, dilation, eps, act, pl):
    OH, OW = pl.OH, pl.OW
    N, C, H, W = x.shape
    if N * C * OH * OW == 0:
        y = torch.empty((N, C, OH, OW), dtype=x.dtype, device=x.device, memory_format=pl.fmt)
        nan = torch.full((C,), float("nan"), dtype=torch.float32, device=x.device)
        return y, nan, nan.clone()
    k = _common(x, weight, None, None, "none", pl)
    ns = _num_splits(x, N * OH * OW, _cprog(k))
    part = torch.empty((ns, 3, C), dtype=torch.float64, device=x.device)

    def grid(meta):
        return (ns * triton.cdiv(C, meta["BLOCK_C"]),)

    _run(_TRAIN_STATS, grid, (
        x, k["wt"], part,
        N, C, H, W, OH, OW, ns,
        *x.stride(),
        padding[0], padding[1], dilation[0], dilation[1],
        *k["buckets"],
    ), dict(SH=stride[0], SW=stride[1], KH=k["KH"], KW=k["KW"]), x, k)
    cnt, pm, pq = part[:, 0], part[:, 1], part[:, 2]
    total = cnt.sum(dim=0)
    mean_d = (cnt * pm).sum(dim=0) / total
    var_d = (pq.sum(dim=0) + (cnt * (pm - mean_d).square()).sum(dim=0)) / total
    mean, var = mean_d.float(), var_d.float()
    # invstd in double from the returned (rounded) variance, as the backward computes it
    invstd = torch.rsqrt(var.double() + eps)
    scale = ((gamma.double() * invstd) if gamma is not None else invstd).float()
    y = _fwd_launch(x, weight, scale, beta, stride, padding, dilation, act, pl, center=mean)
    return y, (mean + bias.float() if bias is not None else mean), var


def dwconv_bn_act_train_bwd(grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor], x: Tensor,
                            weight: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], mean: Tensor, var: Tensor,
                            stride: List[int], padding: List[int], dilation: List[int], eps: float, act: str,
                            output_mask: List[bool], deterministic: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training backward launcher (the body of fastdw::_dwconv_bn_act_train_backward_triton):
    the gu kernel twice (A: sums of gu and gu*(z - mean); B: dz), then the dx kernel on dz.
    mean is the batch mean of conv(x) without the bias. Returns (dx, dweight, dgamma, dbeta)."""
    pl = _memo(_train_bwd_plan, (grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var),
               _rest(stride, padding, dilation, eps, act, tuple(output_mask)),
               grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var, stride, padding, dilation, eps, act,
               output_mask)
    with _on_device(x):
        return _train_bwd(grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var, stride, padding, dilation,
                          eps, act, output_mask, deterministic, pl)


def _train_bwd(grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var, stride, padding, dilation, eps, act,
               output_mask, deterministic, pl):
    OH, OW = pl.OH, pl.OW
    N, C, H, W = x.shape
    need_dx, need_dw = bool(output_mask[0]), bool(output_mask[1])
    need_dg, need_db = bool(output_mask[2]) and gamma is not None, bool(output_mask[3]) and beta is not None
    fmt = pl.fmt
    KH, KW = weight.shape[2], weight.shape[3]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if need_dx \
        else torch.empty((0,), dtype=x.dtype, device=x.device)
    dw = torch.zeros((C, KH * KW), dtype=torch.float32, device=x.device) if need_dw else None
    dg = torch.zeros((C,), dtype=torch.float32, device=x.device)
    db = torch.zeros((C,), dtype=torch.float32, device=x.device)
    M = N * OH * OW
    if M > 0 and C > 0:
        # the per-channel algebra in float64 (invstd, the sums, the dz coefficients); fp32 to the kernels
        invstd = torch.rsqrt(var.float().double() + eps)
        g = _f32_or(gamma, x, 1.0).double()
        center = mean.float().contiguous()
        scale = g * invstd
        k = _common(x, weight, scale.float(), _f32_or(beta, x, 0.0), act, pl)
        part = _launch_gu(x, k, grad_y, dx, stride, padding, dilation, OH, OW, has_scale=True, has_shift=True,
                          store_gc=False, need_red=True, deterministic=deterministic, train=(center, center, center))
        S, B = part[:, 0].sum(dim=0), part[:, 1].sum(dim=0)
        dg, db = invstd * S, B
        if need_dx or need_dw:
            lin = -(g * invstd.pow(3) * S)
            if grad_var is not None:
                lin = lin + 2.0 * grad_var.double()
            cst = -(scale * B)
            if grad_mean is not None:
                cst = cst + grad_mean.double()
            lin, cst = (lin / M).float().contiguous(), (cst / M).float().contiguous()
            gz = torch.empty((N, C, OH, OW), memory_format=fmt, dtype=torch.float32, device=x.device)
            _launch_gu(x, k, grad_y, gz, stride, padding, dilation, OH, OW, has_scale=True, has_shift=True,
                       store_gc=True, need_red=False, deterministic=deterministic, train=(center, lin, cst))
            dw = _launch_dx(x, k, gz, dx, stride, padding, dilation, OH, OW, need_dx, need_dw, deterministic)
    elif need_dx:
        dx.zero_()

    def out(t, like, need):  # in the input's dtype; an empty (0,) tensor where not asked for
        dtype = like.dtype if like is not None else torch.float32
        return t.to(dtype) if need else torch.empty((0,), dtype=dtype, device=x.device)

    return (dx, out(dw.reshape(C, 1, KH, KW) if need_dw else None, weight, need_dw).contiguous(),
            out(dg, gamma, need_dg), out(db, beta, need_db))


# ------------------------------------------------------------------------------------------
# Op registration


def _fwd_fake(x, weight, scale, shift, stride, padding, dilation, act):
    out = AG.fake_forward(x, weight, scale, shift, stride, padding, dilation, act)
    _check_triton_limits(x)
    return out


def _bwd_fake(grad_out, x, weight, scale, shift, stride, padding, dilation, act, output_mask, deterministic):
    out = AG.fake_backward(grad_out, x, weight, scale, shift, stride, padding, dilation, act, output_mask,
                           deterministic)
    _check_triton_limits(x)
    return out


# The launchers' annotations are the ops' schemas.
if INTERPRET:
    _fwd_op = torch.library.custom_op("fastdw::dwconv_bn_act_triton", dwconv_bn_act_fwd, mutates_args=())
    _fwd_op.register_fake(_fwd_fake)
    _bwd_op = torch.library.custom_op("fastdw::_dwconv_bn_act_backward_triton", dwconv_bn_act_bwd,
                                      mutates_args=())
    _bwd_op.register_fake(_bwd_fake)
else:
    _fwd_op = torch.library.triton_op("fastdw::dwconv_bn_act_triton", dwconv_bn_act_fwd, mutates_args=())
    _bwd_op = torch.library.triton_op("fastdw::_dwconv_bn_act_backward_triton", dwconv_bn_act_bwd,
                                      mutates_args=())

_fwd_op.register_autograd(AG.make_backward(_bwd_op), setup_context=AG.setup_context)
_bwd_op.register_autograd(AG.double_backward, setup_context=AG.no_setup_context)


def _train_fwd_fake(x, weight, bias, gamma, beta, stride, padding, dilation, eps, act):
    out = AG.fake_train_forward(x, weight, bias, gamma, beta, stride, padding, dilation, eps, act)
    _check_triton_limits(x)
    return out


def _train_bwd_fake(grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var, stride, padding, dilation, eps,
                    act, output_mask, deterministic):
    out = AG.fake_train_backward(grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var, stride, padding,
                                 dilation, eps, act, output_mask, deterministic)
    _check_triton_limits(x)
    return out


_OP_FACTORY = torch.library.custom_op if INTERPRET else torch.library.triton_op
_train_op = _OP_FACTORY("fastdw::dwconv_bn_act_train_triton", dwconv_bn_act_train_fwd, mutates_args=())
_train_bwd_op = _OP_FACTORY("fastdw::_dwconv_bn_act_train_backward_triton", dwconv_bn_act_train_bwd,
                            mutates_args=())
if INTERPRET:
    _train_op.register_fake(_train_fwd_fake)
    _train_bwd_op.register_fake(_train_bwd_fake)
_train_op.register_autograd(AG.make_train_backward(_train_bwd_op), setup_context=AG.setup_train_context)
_train_bwd_op.register_autograd(AG.double_backward, setup_context=AG.no_setup_context)

OP = torch.ops.fastdw.dwconv_bn_act_triton.default
BWD_OP = torch.ops.fastdw._dwconv_bn_act_backward_triton.default
TRAIN_OP = torch.ops.fastdw.dwconv_bn_act_train_triton.default
TRAIN_BWD_OP = torch.ops.fastdw._dwconv_bn_act_train_backward_triton.default


def dwconv_bn_act_triton(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                         stride, padding, dilation, act: str) -> Tensor:
    """What fastdw.dwconv_bn_act(..., backend='triton') calls: the Triton op (autograd-aware).
    stride/padding/dilation are (h, w) pairs."""
    return _fwd_op(x, weight, scale, shift, list(stride), list(padding), list(dilation), act)
