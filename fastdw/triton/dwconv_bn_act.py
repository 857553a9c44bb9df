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

Forward (_dwconv_fwd_kernel). A program owns a band of BLOCK_H output rows x BLOCK_W columns x
BLOCK_C channels of one image, addressed through the tensors' strides (one kernel serves both
layouts; the config lists differ: channels on the fast axis with 8 channels per thread for
channels_last, columns on the fast axis for NCHW). The weights, scale and shift are read once into
registers; the band is produced one output row per loop trip. At stride 1 without row dilation
the input is streamed: a trip reads one input row (its KW column taps, L1 hits), adds it to the
KH output rows it feeds (KH - 1 partial rows live in registers) and finishes one, so an input
element is read and converted KW times instead of KH*KW times; otherwise a trip reads its row's
KH*KW taps. The trips whose taps all lie inside the image run a loop without masks; the border
trips run a masked copy of it. BN and the activation are applied in registers before the single
store.

Backward (recomputes the pre-activation, like the CUDA op):
  1. _dwconv_bwd_gu_kernel, one program per band of output rows (the forward's streaming):
     u = conv(x)*scale + shift, g = act'(u) * dy; stores gc = g * scale in x's dtype (fp32 beside
     an fp32 weight) and sums g*conv (dscale) and g (dshift) in registers over the band, written
     once per program.
  2. _dwconv_bwd_dx_rows_kernel (stride 1, no dilation), one program per band of input rows: dx
     is the forward conv of gc with the flipped kernel, streamed the same way; the gc taps it
     reads also give dweight[t] += x * gc[shifted by t], with the band's x rows streamed beside
     them and the sums kept in registers over the band. Other strides and dilations use
     _dwconv_bwd_dx_kernel, which gathers every tap per input tile over S "splits".
Every program writes one row of per-channel partial sums; the host sums the rows in float64 in a
fixed order. No atomics: the backward is deterministic whatever `deterministic` says (which also
pins the configs, so the bits do not depend on autotuning either).
"""
import contextlib
import functools
import inspect
import os
import struct
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
# inline PTX in the kernels where it saves instructions (the interpreter runs the plain form, with
# the same results: NaN passes both ways, -0 and the kinks get 0)
_PTX = tl.constexpr(not INTERPRET)


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
        if _PTX:  # one select on a predicate set by two compares (LLVM splits the | into two selects)
            g = tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.le.f32 p, $1, 0f00000000; setp.ge.or.f32 p, $1, 0f40C00000, p; "
                "selp.f32 $0, 0f00000000, $2, p; }", "=r,r,r", [u, g], dtype=tl.float32, is_pure=True, pack=1)
        else:
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


@triton.jit
def _load_taps(xp, step, xmask, rv, KW: tl.constexpr, MASKED: tl.constexpr):
    """The KW column taps xp + kw * step (kw < KW) of one input row, as fp32. MASKED: with the tap
    masks xmask[kw] and the row's validity rv (zeros outside: the padding); else unmasked, for
    the rows and column tiles whose taps all lie inside the image (no predicates in the steady
    state)."""
    xs = ()
    for kw in tl.static_range(KW):
        if MASKED:
            v = tl.load(xp + kw * step, mask=xmask[kw] & rv, other=0.0)
        else:
            v = tl.load(xp + kw * step)
        xs = xs + (v.to(tl.float32),)
    return xs


@triton.jit
def _load_row(p, mask, MASKED: tl.constexpr):
    """One row of a tile as fp32: masked (zeros outside) or not."""
    if MASKED:
        v = tl.load(p, mask=mask, other=0.0)
    else:
        v = tl.load(p)
    return v.to(tl.float32)


@triton.jit
def _store_row(p, v, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(p, v.to(p.dtype.element_ty), mask=mask)
    else:
        tl.store(p, v.to(p.dtype.element_ty))


@triton.jit
def _roll_rows(xs, ws, accs, KH: tl.constexpr, KW: tl.constexpr):
    """One step of a stride-1 row-streamed conv: xs holds the KW column taps of the next input row,
    accs[j] the partial sums of the KH - 1 output rows still open (j = 0 the oldest), ws the KH*KW
    weights. The new row is tap row KH - 1 - j of open row j and tap row 0 of a new row. Returns the
    finished oldest row and the open rows. (Tap indices are written out: a name assigned in the
    caller's row loop would not stay constexpr.)"""
    nxt = ()
    for j in tl.static_range(KH):
        if j < KH - 1:
            a = accs[j] + xs[0] * ws[(KH - 1 - j) * KW]
        else:
            a = xs[0] * ws[(KH - 1 - j) * KW]
        for kw in tl.static_range(1, KW):
            a += xs[kw] * ws[(KH - 1 - j) * KW + kw]
        if j == 0:
            done = a
        else:
            nxt = nxt + (a,)
    return done, nxt


@triton.jit
def _direct_row(xb, o, sxh, xoff, step, xmask, H, PH, ws, SH: tl.constexpr, DH: tl.constexpr,
                KH: tl.constexpr, KW: tl.constexpr, MASKED: tl.constexpr, BLOCK_W: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """Output row o from its KH*KW taps (stride > 1 or row dilation: no row reuse to stream), and
    the taps (flat, kh * KW + kw), for a caller that pairs them with the row's gradient."""
    a = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    taps = ()
    for kh in tl.static_range(KH):
        ih = o * SH - PH + kh * DH
        xs = _load_taps(xb + ih * sxh + xoff, step, xmask, (ih >= 0) & (ih < H), KW, MASKED)
        for kw in tl.static_range(KW):
            a += xs[kw] * ws[kh * KW + kw]
        taps = taps + xs
    return a, taps


@triton.jit
def _tap_columns(ow0, c0, OW, C, W, PW, sxw, sxc, SW: tl.constexpr, DW: tl.constexpr, KW: tl.constexpr,
                 BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """The column side of a row tile (columns ow0.., channels c0..), the same for every row: the
    offsets of its first tap, the KW tap masks, and whether every tap of every column lies inside
    the image with every column and channel real (then the rows inside the image run unmasked)."""
    ow = ow0 + tl.arange(0, BLOCK_W)
    c = c0 + tl.arange(0, BLOCK_C)
    om = ow < OW
    cm = c < C
    iw0 = ow * SW - PW
    xoff = (iw0 * sxw)[:, None] + (c * sxc)[None, :]
    xmask = ()
    for kw in tl.static_range(KW):
        iw = iw0 + kw * DW
        xmask = xmask + ((om & (iw >= 0) & (iw < W))[:, None] & cm[None, :],)
    inside = (ow0 * SW - PW >= 0) & ((ow0 + BLOCK_W - 1) * SW - PW + (KW - 1) * DW < W)
    inside = inside & (ow0 + BLOCK_W <= OW) & (c0 + BLOCK_C <= C)
    return xoff, xmask, inside


@triton.jit
def _stream_split(nr, lead, valid_lo, valid_hi):
    """Trip bounds (a, b) of a streamed band of nr trips: the first `lead` trips finish no row,
    trips valid_lo..valid_hi read rows inside the image; [a, b) are the trips that do both (the
    unmasked steady state), [0, a) and [b, nr) run masked."""
    a = tl.minimum(tl.maximum(valid_lo, lead), nr)
    b = tl.maximum(a, tl.minimum(valid_hi, nr))
    return a, b


@triton.jit
def _direct_split(rows, oh0, H, PH, SH: tl.constexpr, DH: tl.constexpr, KH: tl.constexpr):
    """Row bounds (a, b) of a direct band of rows oh0..: [a, b) are the rows whose KH taps rows all
    lie inside the image. (o_hi: every numerator here is >= -SH or its quotient is <= 0 under
    truncating and flooring division alike, so the clamp gives the same bounds in both.)"""
    a = tl.minimum(tl.maximum((PH + SH - 1) // SH - oh0, 0), rows)
    o_hi = (H - 1 + PH - (KH - 1) * DH + SH) // SH
    b = tl.maximum(a, tl.minimum(o_hi - oh0, rows))
    return a, b


@triton.jit
def _channel_params(c, cm, S, B, CEN, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_CENTER: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """(center, scale, shift) of channels c as [1, BLOCK_C] fp32 rows (zeros where absent)."""
    cen = tl.zeros([1, BLOCK_C], dtype=tl.float32)
    sc = tl.zeros([1, BLOCK_C], dtype=tl.float32)
    sh = tl.zeros([1, BLOCK_C], dtype=tl.float32)
    if HAS_CENTER:
        cen = tl.load(CEN + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        sc = tl.load(S + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        sh = tl.load(B + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    return cen, sc, sh


@triton.jit
def _weights(Wt, c, cm, KK: tl.constexpr):
    """The KK taps of channels c, from the (C, KK) weight, as [1, BLOCK_C] fp32 rows: read once
    per program, registers for the whole band."""
    ws = ()
    for k in tl.static_range(KK):
        ws = ws + (tl.load(Wt + c * KK + k, mask=cm, other=0.0).to(tl.float32)[None, :],)
    return ws


@triton.jit
def _band_coords(C, OH, OW, BAND, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """1-D grid over (image, band of BAND rows, column tile, channel block), the channel block
    fastest: (band tile index t, n, first row, first column, first channel)."""
    pid = tl.program_id(0)
    cblocks = tl.cdiv(C, BLOCK_C)
    t = pid // cblocks
    c0 = (pid % cblocks) * BLOCK_C
    tiles_w = tl.cdiv(OW, BLOCK_W)
    bands = tl.cdiv(OH, BAND)
    ow0 = (t % tiles_w) * BLOCK_W
    oh0 = ((t // tiles_w) % bands) * BAND
    n = (t // tiles_w) // bands
    return t, n, oh0, ow0, c0


@triton.jit
def _fwd_epilogue(acc, yp, ymask, cen, sc, sh, ACT: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_SHIFT: tl.constexpr, HAS_CENTER: tl.constexpr, MASKED: tl.constexpr):
    """BatchNorm and the activation on one finished output row, stored at yp."""
    if HAS_CENTER:
        acc = acc - cen
    if HAS_SCALE:
        acc = acc * sc
    if HAS_SHIFT:
        acc = acc + sh
    _store_row(yp, _act_fwd(acc, ACT), ymask, MASKED)


@triton.jit
def _fwd_stream(lo, hi, accs, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, yb, syh, yoff, ymask, cen, sc, sh,
                ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_CENTER: tl.constexpr,
                KH: tl.constexpr, KW: tl.constexpr, MASKED: tl.constexpr):
    """Trips lo..hi of the streamed forward: trip r reads input row oh0 - PH + r and finishes
    output row oh0 + r - (KH - 1) (from trip KH - 1 on)."""
    for r in range(lo, hi):
        ih = oh0 - PH + r
        xs = _load_taps(xb + ih * sxh + xoff, step, xmask, (ih >= 0) & (ih < H), KW, MASKED)
        done, accs = _roll_rows(xs, ws, accs, KH, KW)
        if MASKED:
            if r >= KH - 1:
                _fwd_epilogue(done, yb + (oh0 + r - (KH - 1)) * syh + yoff, ymask, cen, sc, sh, ACT,
                              HAS_SCALE, HAS_SHIFT, HAS_CENTER, True)
        else:
            _fwd_epilogue(done, yb + (oh0 + r - (KH - 1)) * syh + yoff, ymask, cen, sc, sh, ACT,
                          HAS_SCALE, HAS_SHIFT, HAS_CENTER, False)
    return accs


@triton.jit
def _fwd_direct(lo, hi, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, yb, syh, yoff, ymask, cen, sc, sh,
                ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_CENTER: tl.constexpr,
                SH: tl.constexpr, DH: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, MASKED: tl.constexpr,
                BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows oh0 + lo .. oh0 + hi of the direct forward."""
    for r in range(lo, hi):
        a, _ = _direct_row(xb, oh0 + r, sxh, xoff, step, xmask, H, PH, ws, SH, DH, KH, KW, MASKED, BLOCK_W, BLOCK_C)
        _fwd_epilogue(a, yb + (oh0 + r) * syh + yoff, ymask, cen, sc, sh, ACT, HAS_SCALE, HAS_SHIFT, HAS_CENTER,
                      MASKED)


@triton.jit(do_not_specialize=["N_BUCKET", "C_BUCKET", "HW_BUCKET"])
def _dwconv_fwd_kernel(
    X, Wt, S, B, CEN, Y,
    C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    PH, PW,
    N_BUCKET, C_BUCKET, HW_BUCKET,  # the buckets: autotune key only
    ACT: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_CENTER: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: a band of BLOCK_H output rows x BLOCK_W output columns x BLOCK_C channels of
    one image, produced one row per loop trip. 1-D grid, channel block fastest.
    The weights, scale and shift are read once, before the row loop, and stay in registers.
    Stride 1 without row dilation streams the input: each trip reads one input row (its KW column
    taps), adds its taps to the KH output rows it feeds (KH - 1 partial rows carried in
    registers) and finishes one; an input element is read and converted KW times, not KH*KW.
    Otherwise each trip reads the KH*KW taps of its output row (from L1/L2).
    The trips whose rows and columns all lie inside the image (the steady state) run a loop of
    their own without masks; the border trips run masked.
    HAS_CENTER (training mode): u = (conv - CEN) * scale + shift, BatchNorm's order of operations."""
    t, n, oh0, ow0, c0 = _band_coords(C, OH, OW, BLOCK_H, BLOCK_W, BLOCK_C)
    ow = ow0 + tl.arange(0, BLOCK_W)
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < C
    cen, sc, sh = _channel_params(c, cm, S, B, CEN, HAS_SCALE, HAS_SHIFT, HAS_CENTER, BLOCK_C)
    ws = _weights(Wt, c, cm, KH * KW)
    xoff, xmask, cols_in = _tap_columns(ow0, c0, OW, C, W, PW, sxw, sxc, SW, DW, KW, BLOCK_W, BLOCK_C)
    step = DW * sxw
    ymask = (ow < OW)[:, None] & cm[None, :]
    yoff = (ow * syw)[:, None] + (c * syc)[None, :]
    xb = X + n.to(tl.int64) * sxn
    yb = Y + n.to(tl.int64) * syn
    rows = tl.minimum(OH - oh0, BLOCK_H)
    if SH == 1 and DH == 1:
        accs = ()  # the open output rows (their first tap rows summed)
        for j in tl.static_range(KH - 1):
            accs = accs + (tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32),)
        nr = rows + KH - 1
        a, b = _stream_split(nr, KH - 1, PH - oh0, H + PH - oh0)
        accs = _fwd_stream(0, a, accs, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, yb, syh, yoff, ymask, cen, sc, sh,
                           ACT, HAS_SCALE, HAS_SHIFT, HAS_CENTER, KH, KW, True)
        if cols_in:
            accs = _fwd_stream(a, b, accs, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, yb, syh, yoff, ymask, cen, sc,
                               sh, ACT, HAS_SCALE, HAS_SHIFT, HAS_CENTER, KH, KW, False)
        else:
            accs = _fwd_stream(a, b, accs, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, yb, syh, yoff, ymask, cen, sc,
                               sh, ACT, HAS_SCALE, HAS_SHIFT, HAS_CENTER, KH, KW, True)
        _fwd_stream(b, nr, accs, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, yb, syh, yoff, ymask, cen, sc, sh,
                    ACT, HAS_SCALE, HAS_SHIFT, HAS_CENTER, KH, KW, True)
    else:
        a, b = _direct_split(rows, oh0, H, PH, SH, DH, KH)
        _fwd_direct(0, a, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, yb, syh, yoff, ymask, cen, sc, sh, ACT,
                    HAS_SCALE, HAS_SHIFT, HAS_CENTER, SH, DH, KH, KW, True, BLOCK_W, BLOCK_C)
        if cols_in:
            _fwd_direct(a, b, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, yb, syh, yoff, ymask, cen, sc, sh, ACT,
                        HAS_SCALE, HAS_SHIFT, HAS_CENTER, SH, DH, KH, KW, False, BLOCK_W, BLOCK_C)
        else:
            _fwd_direct(a, b, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, yb, syh, yoff, ymask, cen, sc, sh, ACT,
                        HAS_SCALE, HAS_SHIFT, HAS_CENTER, SH, DH, KH, KW, True, BLOCK_W, BLOCK_C)
        _fwd_direct(b, rows, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, yb, syh, yoff, ymask, cen, sc, sh, ACT,
                    HAS_SCALE, HAS_SHIFT, HAS_CENTER, SH, DH, KH, KW, True, BLOCK_W, BLOCK_C)


@triton.jit
def _gu_row(acc, dyp, gcp, ymask, cen, sc, sh, lin, cst, dsa, dba, ACT: tl.constexpr,
            HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, STORE_GC: tl.constexpr, NEED_RED: tl.constexpr,
            TRAIN: tl.constexpr, MASKED: tl.constexpr):
    """One output row of the backward's first pass: u from the recomputed conv, g = act'(u) * dy;
    the dscale / dshift terms g * (conv - center) and g added to dsa / dba; gc = g * scale (+ the
    batch-statistics terms lin * (conv - center) + cst in training) stored in gc's dtype and
    returned (fp32). Lanes
    outside the tile are zeroed (MASKED); the unmasked copy runs on full tiles only."""
    zc = acc
    if TRAIN:
        zc = acc - cen
    u = zc
    if HAS_SCALE:
        u = u * sc
    if HAS_SHIFT:
        u = u + sh
    g = _act_bwd(u, _load_row(dyp, ymask, MASKED), ACT)
    if MASKED:  # lanes outside the tile: u is finite there but may overflow (silu's inf * 0)
        g = tl.where(ymask, g, 0.0)
    if NEED_RED:
        dsa += g * zc
        dba += g
    gc = g
    if HAS_SCALE:
        gc = g * sc
    if TRAIN:
        gc = gc + (lin * zc + cst)
    if STORE_GC:
        _store_row(gcp, gc, ymask, MASKED)
    return dsa, dba, gc


@triton.jit
def _gu_stream(lo, hi, accs, dsa, dba, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, dyb, sdh, doff, gb, sgh, goff,
               ymask, cen, sc, sh, lin, cst, ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
               STORE_GC: tl.constexpr, NEED_RED: tl.constexpr, TRAIN: tl.constexpr, KH: tl.constexpr,
               KW: tl.constexpr, MASKED: tl.constexpr):
    """Trips lo..hi of the streamed first backward pass (as _fwd_stream)."""
    for r in range(lo, hi):
        ih = oh0 - PH + r
        xs = _load_taps(xb + ih * sxh + xoff, step, xmask, (ih >= 0) & (ih < H), KW, MASKED)
        done, accs = _roll_rows(xs, ws, accs, KH, KW)
        o = oh0 + r - (KH - 1)
        if MASKED:
            if r >= KH - 1:
                dsa, dba, _ = _gu_row(done, dyb + o * sdh + doff, gb + o * sgh + goff, ymask, cen, sc, sh, lin,
                                      cst, dsa, dba, ACT, HAS_SCALE, HAS_SHIFT, STORE_GC, NEED_RED, TRAIN, True)
        else:
            dsa, dba, _ = _gu_row(done, dyb + o * sdh + doff, gb + o * sgh + goff, ymask, cen, sc, sh, lin, cst,
                                  dsa, dba, ACT, HAS_SCALE, HAS_SHIFT, STORE_GC, NEED_RED, TRAIN, False)
    return accs, dsa, dba


@triton.jit
def _gu_direct(lo, hi, dsa, dba, dwa, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, dyb, sdh, doff, gb, sgh, goff,
               ymask, cen, sc, sh, lin, cst, ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
               STORE_GC: tl.constexpr, NEED_RED: tl.constexpr, TRAIN: tl.constexpr, NEED_DW: tl.constexpr,
               SH: tl.constexpr, DH: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows oh0 + lo .. oh0 + hi of the direct first backward pass; NEED_DW: the weight gradient
    too, each tap of a row times the row's gc, summed in registers (dwa)."""
    for r in range(lo, hi):
        o = oh0 + r
        a, taps = _direct_row(xb, o, sxh, xoff, step, xmask, H, PH, ws, SH, DH, KH, KW, MASKED, BLOCK_W, BLOCK_C)
        dsa, dba, gc = _gu_row(a, dyb + o * sdh + doff, gb + o * sgh + goff, ymask, cen, sc, sh, lin, cst, dsa,
                               dba, ACT, HAS_SCALE, HAS_SHIFT, STORE_GC, NEED_RED, TRAIN, MASKED)
        if NEED_DW:
            nd = ()
            for k in tl.static_range(KH * KW):
                nd = nd + (dwa[k] + taps[k] * gc,)
            dwa = nd
    return dsa, dba, dwa


@triton.jit(do_not_specialize=["N_BUCKET", "C_BUCKET", "HW_BUCKET"])
def _dwconv_bwd_gu_kernel(
    X, Wt, S, B, DY, GC, PART, PARTW,
    C, H, W, OH, OW, BAND,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, sgn, sgc, sgh, sgw,
    PH, PW,
    CEN, LIN, CST,
    N_BUCKET, C_BUCKET, HW_BUCKET,
    ACT: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, STORE_GC: tl.constexpr, NEED_RED: tl.constexpr,
    TRAIN: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The backward's first pass, one program per band of BAND output rows x BLOCK_W columns x
    BLOCK_C channels, streamed like the forward: recomputes u = conv(x)*scale + shift, forms
    g = act'(u)*dy, stores gc = g*scale (STORE_GC; in GC's dtype, x's) and sums, in registers over
    the band, g*conv (dscale) and g (dshift), written once as PART[t, 0, c] and PART[t, 1, c]
    (fp32; t the band tile) when NEED_RED.
    TRAIN (batch-statistics BatchNorm): conv is centred on the batch mean CEN (u = (conv - CEN) *
    scale + shift, and the dscale sum is of g*(conv - CEN)), and gc = g*scale + LIN*(conv - CEN) +
    CST, the gradient of z through the batch statistics.
    NEED_DW (the direct rows: stride > 1 or row dilation): the weight gradient as well, from the
    taps the row already read, PARTW[t, k, c] (fp32); the dx pass then computes dx only."""
    t, n, oh0, ow0, c0 = _band_coords(C, OH, OW, BAND, BLOCK_W, BLOCK_C)
    ow = ow0 + tl.arange(0, BLOCK_W)
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < C
    cen, sc, sh = _channel_params(c, cm, S, B, CEN, HAS_SCALE, HAS_SHIFT, TRAIN, BLOCK_C)
    lin = tl.zeros([1, BLOCK_C], dtype=tl.float32)
    cst = tl.zeros([1, BLOCK_C], dtype=tl.float32)
    if TRAIN:
        lin = tl.load(LIN + c, mask=cm, other=0.0)[None, :]
        cst = tl.load(CST + c, mask=cm, other=0.0)[None, :]
    ws = _weights(Wt, c, cm, KH * KW)
    xoff, xmask, cols_in = _tap_columns(ow0, c0, OW, C, W, PW, sxw, sxc, SW, DW, KW, BLOCK_W, BLOCK_C)
    step = DW * sxw
    ymask = (ow < OW)[:, None] & cm[None, :]
    doff = (ow * sdw)[:, None] + (c * sdc)[None, :]
    goff = (ow * sgw)[:, None] + (c * sgc)[None, :]
    xb = X + n.to(tl.int64) * sxn
    dyb = DY + n.to(tl.int64) * sdn
    gb = GC + n.to(tl.int64) * sgn
    dsa = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    dba = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    rows = tl.minimum(OH - oh0, BAND)
    if SH == 1 and DH == 1:
        accs = ()
        for j in tl.static_range(KH - 1):
            accs = accs + (tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32),)
        nr = rows + KH - 1
        a, b = _stream_split(nr, KH - 1, PH - oh0, H + PH - oh0)
        accs, dsa, dba = _gu_stream(0, a, accs, dsa, dba, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, dyb, sdh, doff,
                                    gb, sgh, goff, ymask, cen, sc, sh, lin, cst, ACT, HAS_SCALE, HAS_SHIFT, STORE_GC,
                                    NEED_RED, TRAIN, KH, KW, True)
        if cols_in:
            accs, dsa, dba = _gu_stream(a, b, accs, dsa, dba, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, dyb, sdh,
                                        doff, gb, sgh, goff, ymask, cen, sc, sh, lin, cst, ACT, HAS_SCALE, HAS_SHIFT,
                                        STORE_GC, NEED_RED, TRAIN, KH, KW, False)
        else:
            accs, dsa, dba = _gu_stream(a, b, accs, dsa, dba, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, dyb, sdh,
                                        doff, gb, sgh, goff, ymask, cen, sc, sh, lin, cst, ACT, HAS_SCALE, HAS_SHIFT,
                                        STORE_GC, NEED_RED, TRAIN, KH, KW, True)
        accs, dsa, dba = _gu_stream(b, nr, accs, dsa, dba, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, dyb, sdh, doff,
                                    gb, sgh, goff, ymask, cen, sc, sh, lin, cst, ACT, HAS_SCALE, HAS_SHIFT, STORE_GC,
                                    NEED_RED, TRAIN, KH, KW, True)
    else:
        dwa = ()
        for k in tl.static_range(KH * KW):
            dwa = dwa + (tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32),)
        a, b = _direct_split(rows, oh0, H, PH, SH, DH, KH)
        dsa, dba, dwa = _gu_direct(0, a, dsa, dba, dwa, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, dyb, sdh, doff,
                                   gb, sgh, goff, ymask, cen, sc, sh, lin, cst, ACT, HAS_SCALE, HAS_SHIFT, STORE_GC,
                                   NEED_RED, TRAIN, NEED_DW, SH, DH, KH, KW, True, BLOCK_W, BLOCK_C)
        if cols_in:
            dsa, dba, dwa = _gu_direct(a, b, dsa, dba, dwa, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, dyb, sdh,
                                       doff, gb, sgh, goff, ymask, cen, sc, sh, lin, cst, ACT, HAS_SCALE, HAS_SHIFT,
                                       STORE_GC, NEED_RED, TRAIN, NEED_DW, SH, DH, KH, KW, False, BLOCK_W, BLOCK_C)
        else:
            dsa, dba, dwa = _gu_direct(a, b, dsa, dba, dwa, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, dyb, sdh,
                                       doff, gb, sgh, goff, ymask, cen, sc, sh, lin, cst, ACT, HAS_SCALE, HAS_SHIFT,
                                       STORE_GC, NEED_RED, TRAIN, NEED_DW, SH, DH, KH, KW, True, BLOCK_W, BLOCK_C)
        dsa, dba, dwa = _gu_direct(b, rows, dsa, dba, dwa, xb, oh0, PH, H, sxh, xoff, step, xmask, ws, dyb, sdh, doff,
                                   gb, sgh, goff, ymask, cen, sc, sh, lin, cst, ACT, HAS_SCALE, HAS_SHIFT, STORE_GC,
                                   NEED_RED, TRAIN, NEED_DW, SH, DH, KH, KW, True, BLOCK_W, BLOCK_C)
        if NEED_DW:
            pw = PARTW + t.to(tl.int64) * (KH * KW) * C + c
            for k in tl.static_range(KH * KW):
                tl.store(pw + k * C, tl.sum(dwa[k], axis=0), mask=cm)
    if NEED_RED:
        pr = PART + t.to(tl.int64) * 2 * C + c
        tl.store(pr, tl.sum(dsa, axis=0), mask=cm)
        tl.store(pr + C, tl.sum(dba, axis=0), mask=cm)


@triton.jit
def _dx_stream(lo, hi, accs, xwin, dwa, gb, i0, QH, OH, rows, sgh, goff, sgw, gmask, wf, xb, sxh, xoff, dxb, sdh,
               doff, wmask, KH: tl.constexpr, KW: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
               MASKED: tl.constexpr):
    """Trips lo..hi of the streamed second backward pass: trip r reads gc row i0 - QH + r (its KW
    column taps) and x row i0 + r (zeros past the band), finishes dx row i0 + r - (KH - 1) and adds
    each (x row, gc tap) pair of the KH live x rows to its weight-gradient tap."""
    KK: tl.constexpr = KH * KW
    # unmasked trips unrolled KH times (up to 3x3): the KH - 1 open dx rows and live x rows then
    # rotate by renaming instead of register moves (2.1 -> 1.3 MOV per element, fp16 CL)
    for r in tl.range(lo, hi, loop_unroll_factor=KH if (not MASKED) and KH <= 3 else 1):
        jj = i0 - QH + r
        gs = _load_taps(gb + jj * sgh + goff, sgw, gmask, (jj >= 0) & (jj < OH), KW, MASKED)
        if NEED_DX:
            done, accs = _roll_rows(gs, wf, accs, KH, KW)
            if MASKED:
                if r >= KH - 1:
                    _store_row(dxb + (i0 + r - (KH - 1)) * sdh + doff, done, wmask, True)
            else:
                _store_row(dxb + (i0 + r - (KH - 1)) * sdh + doff, done, wmask, False)
        if NEED_DW:
            xw = xwin + (_load_row(xb + (i0 + r) * sxh + xoff, wmask & (r < rows), MASKED),)
            nd = ()
            for k in tl.static_range(KK):  # tap (kh, kw) = (k // KW, k % KW): x row kh with gs[KW - 1 - kw]
                nd = nd + (dwa[k] + xw[k // KW] * gs[KW - 1 - k % KW],)
            dwa = nd
            xwin = xw[1:]
    return accs, xwin, dwa


@triton.jit(do_not_specialize=["N_BUCKET", "C_BUCKET", "HW_BUCKET"])
def _dwconv_bwd_dx_rows_kernel(
    X, Wt, GC, DX, PART,
    C, H, W, OH, OW, BAND,
    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
    PH, PW,
    N_BUCKET, C_BUCKET, HW_BUCKET,
    KH: tl.constexpr, KW: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The backward's second pass at stride 1 without dilation, one program per band of BAND
    input rows x BLOCK_W columns x BLOCK_C channels. dx is the forward conv of gc with the flipped
    kernel and padding K-1-P, streamed like the forward: each trip reads one gc row (its KW column
    taps, zeros outside gc) and finishes one dx row. The same gc taps give the weight gradient:
    dweight[kh, kw] += x[i] * gc[i + PH - kh, w + PW - kw], with the band's x rows streamed beside
    them (KH of them live), summed in registers over the band and written once per program as
    PART[t, kh*KW + kw, c] (fp32). Each x element belongs to one band, so every (x, gc) pair is
    counted once."""
    KK: tl.constexpr = KH * KW
    t, n, i0, w0, c0 = _band_coords(C, H, W, BAND, BLOCK_W, BLOCK_C)
    w = w0 + tl.arange(0, BLOCK_W)
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < C
    ws = _weights(Wt, c, cm, KK)
    wf = ()  # the flipped kernel
    for k in tl.static_range(KK):
        wf = wf + (ws[KK - 1 - k],)
    QH = KH - 1 - PH
    QW = KW - 1 - PW
    goff, gmask, cols_in = _tap_columns(w0, c0, W, C, OW, QW, sgw, sgc, 1, 1, KW, BLOCK_W, BLOCK_C)
    wmask = (w < W)[:, None] & cm[None, :]
    xoff = (w * sxw)[:, None] + (c * sxc)[None, :]
    doff = (w * sdw)[:, None] + (c * sdc)[None, :]
    xb = X + n.to(tl.int64) * sxn
    gb = GC + n.to(tl.int64) * sgn
    dxb = DX + n.to(tl.int64) * sdn
    rows = tl.minimum(H - i0, BAND)
    accs = ()
    xwin = ()  # x rows i0 + r - (KH - 1) .. i0 + r - 1 (zeros outside the band)
    for j in tl.static_range(KH - 1):
        accs = accs + (tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32),)
        xwin = xwin + (tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32),)
    dwa = ()
    for k in tl.static_range(KK):
        dwa = dwa + (tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32),)
    nr = rows + KH - 1
    # unmasked: gc row inside gc, a dx row finished, x row inside the band
    a, b = _stream_split(rows, KH - 1, QH - i0, OH + QH - i0)
    accs, xwin, dwa = _dx_stream(0, a, accs, xwin, dwa, gb, i0, QH, OH, rows, sgh, goff, sgw, gmask, wf, xb, sxh,
                                 xoff, dxb, sdh, doff, wmask, KH, KW, NEED_DX, NEED_DW, True)
    if cols_in:
        accs, xwin, dwa = _dx_stream(a, b, accs, xwin, dwa, gb, i0, QH, OH, rows, sgh, goff, sgw, gmask, wf, xb, sxh,
                                     xoff, dxb, sdh, doff, wmask, KH, KW, NEED_DX, NEED_DW, False)
    else:
        accs, xwin, dwa = _dx_stream(a, b, accs, xwin, dwa, gb, i0, QH, OH, rows, sgh, goff, sgw, gmask, wf, xb, sxh,
                                     xoff, dxb, sdh, doff, wmask, KH, KW, NEED_DX, NEED_DW, True)
    accs, xwin, dwa = _dx_stream(b, nr, accs, xwin, dwa, gb, i0, QH, OH, rows, sgh, goff, sgw, gmask, wf, xb, sxh,
                                 xoff, dxb, sdh, doff, wmask, KH, KW, NEED_DX, NEED_DW, True)
    if NEED_DW:
        pr = PART + t.to(tl.int64) * KK * C + c
        for k in tl.static_range(KK):
            tl.store(pr + k * C, tl.sum(dwa[k], axis=0), mask=cm)


@triton.jit
def _dx2_stream(lo, hi, accs, gb, m0, OH, H, PH, sgh, goff, sgw, gmask, ws, dxb, sdh, doff0, doff1, smask0, smask1,
                KH: tl.constexpr, KW: tl.constexpr, MASKED: tl.constexpr, BLOCK_W: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """Trips lo..hi of the stride-2 dx pass: trip r reads gc row j = m0 - (T0 - 1) + r (its U0
    column taps gc[j, n - u]) and, for each output parity class (q, p) (dx row 2m + q - PH, column
    2n + p - PW), adds it to the open rows of that class's sub-kernel w[q + 2t, p + 2u] and
    finishes row m = j (stored from trip T0 - 1 on). accs holds the four classes' open rows."""
    T0: tl.constexpr = (KH + 1) // 2
    U0: tl.constexpr = (KW + 1) // 2
    for r in range(lo, hi):
        j = m0 - (T0 - 1) + r
        gs = _load_taps(gb + j * sgh + goff, sgw, gmask, (j >= 0) & (j < OH), U0, MASKED)  # gs[b]: gc[j, n-(U0-1)+b]
        nxt = ()
        for q in tl.static_range(2):
            i = 2 * j + q - PH
            rv = (i >= 0) & (i < H)
            for p in tl.static_range(2):
                # (the class's tap counts Tq = (KH - q + 1) // 2 and Up = (KW - p + 1) // 2 are written
                # out: a name assigned in the row loop would not stay constexpr)
                if (KH - q + 1) // 2 > 0 and (KW - p + 1) // 2 > 0:
                    xs = ()
                    for u in tl.static_range((KW - p + 1) // 2):
                        xs = xs + (gs[U0 - 1 - u],)
                    wsub = ()  # row a of the rolled sub-kernel is tap t = Tq - 1 - a
                    for a in tl.static_range((KH - q + 1) // 2):
                        for u in tl.static_range((KW - p + 1) // 2):
                            wsub = wsub + (ws[(q + 2 * ((KH - q + 1) // 2 - 1 - a)) * KW + p + 2 * u],)
                    done, acc = _roll_rows(xs, wsub, accs[2 * q + p], (KH - q + 1) // 2, (KW - p + 1) // 2)
                else:  # no tap reaches this class (a 1-wide kernel): dx is 0 there
                    done = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
                    acc = ()
                nxt = nxt + (acc,)
                dp = dxb + i * sdh + (doff0 if p == 0 else doff1)
                if MASKED:
                    if r >= T0 - 1:
                        _store_row(dp, done, (smask0 if p == 0 else smask1) & rv, True)
                else:
                    _store_row(dp, done, smask0, False)
        accs = nxt
    return accs


@triton.jit(do_not_specialize=["N_BUCKET", "C_BUCKET", "HW_BUCKET"])
def _dwconv_bwd_dx_s2_kernel(
    GC, Wt, DX,
    C, H, W, OH, OW, MH, NW, BAND,
    sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
    PH, PW,
    N_BUCKET, C_BUCKET, HW_BUCKET,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx at stride 2 without dilation, split by output parity: dx row i = 2m + q - PH and column
    w = 2n + p - PW take only the taps kh = q + 2t, kw = p + 2u, from gc[m - t, n - u], so each of
    the four classes (q, p) is a stride-1 correlation of gc with a sub-kernel and no tap is
    computed to be masked away. One program per band of BAND values of m x BLOCK_W values of n x
    BLOCK_C channels; the gc rows are streamed as in the forward (each gc row is read once per
    column tap and serves all four classes). The weight gradient comes from the gu pass."""
    T0: tl.constexpr = (KH + 1) // 2
    U0: tl.constexpr = (KW + 1) // 2
    t, n, m0, n0, c0 = _band_coords(C, MH, NW, BAND, BLOCK_W, BLOCK_C)
    nn = n0 + tl.arange(0, BLOCK_W)
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < C
    ws = _weights(Wt, c, cm, KH * KW)
    # the gc column taps n - (U0 - 1) .. n, inside gc, for n < NW
    goff, gmask, gcols_in = _tap_columns(n0, c0, NW, C, OW, U0 - 1, sgw, sgc, 1, 1, U0, BLOCK_W, BLOCK_C)
    w0 = 2 * nn - PW
    doff0 = (w0 * sdw)[:, None] + (c * sdc)[None, :]
    doff1 = doff0 + sdw
    smask0 = ((w0 >= 0) & (w0 < W))[:, None] & cm[None, :]
    smask1 = ((w0 + 1 >= 0) & (w0 + 1 < W))[:, None] & cm[None, :]
    # the unmasked loop also stores both column classes unmasked: every column inside dx
    cols_in = gcols_in & (2 * n0 - PW >= 0) & (2 * (n0 + BLOCK_W - 1) + 1 - PW < W)
    gb = GC + n.to(tl.int64) * sgn
    dxb = DX + n.to(tl.int64) * sdn
    rows = tl.minimum(MH - m0, BAND)
    accs = ()
    for q in tl.static_range(2):
        for p in tl.static_range(2):
            acc = ()
            for a in tl.static_range((KH - q + 1) // 2 - 1):
                acc = acc + (tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32),)
            accs = accs + (acc,)
    nr = rows + T0 - 1
    # unmasked trips: the gc row inside gc, a row finished, both of its dx rows inside dx
    a, b = _stream_split(nr, T0 - 1, (PH + 1) // 2 + T0 - 1 - m0, tl.minimum(OH, (H + PH) // 2) + T0 - 1 - m0)
    accs = _dx2_stream(0, a, accs, gb, m0, OH, H, PH, sgh, goff, sgw, gmask, ws, dxb, sdh, doff0, doff1, smask0,
                       smask1, KH, KW, True, BLOCK_W, BLOCK_C)
    if cols_in:
        accs = _dx2_stream(a, b, accs, gb, m0, OH, H, PH, sgh, goff, sgw, gmask, ws, dxb, sdh, doff0, doff1, smask0,
                           smask1, KH, KW, False, BLOCK_W, BLOCK_C)
    else:
        accs = _dx2_stream(a, b, accs, gb, m0, OH, H, PH, sgh, goff, sgw, gmask, ws, dxb, sdh, doff0, doff1, smask0,
                           smask1, KH, KW, True, BLOCK_W, BLOCK_C)
    _dx2_stream(b, nr, accs, gb, m0, OH, H, PH, sgh, goff, sgw, gmask, ws, dxb, sdh, doff0, doff1, smask0, smask1,
                KH, KW, True, BLOCK_W, BLOCK_C)


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
# The per-channel finishes: partial-sum rows summed in float64 and the BatchNorm algebra, as small
# kernels, so a launcher runs no tensor op between its kernels (allocations only). Each program
# owns FIN_C channels and sums the rows in a fixed order whatever the GPU (row t adds into slot
# t % FIN_T of an [FIN_T, FIN_C] float64 accumulator, one tree sum over the slots at the end):
# deterministic, and at least as accurate as a float64 torch.sum. FIN_T * FIN_C = 4096 loads in
# flight per trip (32 per thread) so the few programs are not latency bound.
_FIN_T, _FIN_C = 128, 32  # launched with Triton's default 4 warps


@triton.jit
def _rows_sum(P, T, RS, c, cm, FIN_T: tl.constexpr, FIN_C: tl.constexpr):
    """sum over t < T of P[t * RS + c], float64, [FIN_C]."""
    acc = tl.zeros([FIN_T, FIN_C], dtype=tl.float64)
    tt = tl.arange(0, FIN_T)
    for t0 in range(0, T, FIN_T):
        t = t0 + tt
        m = (t < T)[:, None] & cm[None, :]
        acc += tl.load(P + t.to(tl.int64)[:, None] * RS + c[None, :], mask=m, other=0.0).to(tl.float64)
    return tl.sum(acc, axis=0)


@triton.jit
def _sum_rows_kernel(PART, T, RS, C, OUT0, OUT1, R0, sor, soc, FIN_T: tl.constexpr, FIN_C: tl.constexpr):
    """Program (row r, channel block): OUT[r, c] = sum_t PART[t, r, c] (PART's rows RS elements
    apart), in float64, rounded to fp32 and stored in OUT's dtype (csrc's store_as): rows r < R0
    at OUT0 + r * sor + c * soc, the rest at OUT1 + (r - R0) * sor + c * soc (two parameters'
    gradients of different dtypes)."""
    r = tl.program_id(0)
    c = tl.program_id(1) * FIN_C + tl.arange(0, FIN_C)
    cm = c < C
    s = _rows_sum(PART + r * C, T, RS, c, cm, FIN_T, FIN_C).to(tl.float32)
    if r < R0:
        tl.store(OUT0 + r * sor + c * soc, s, mask=cm)
    else:
        tl.store(OUT1 + (r - R0) * sor + c * soc, s, mask=cm)


@triton.jit
def _invstd_of(v32, E0, E1, E2, c):
    """1 / sqrt(var + eps) in float64 from the variance as the forward returns it (fp32), both
    operations correctly rounded (csrc's invstd_of); eps exactly, from its three fp32 parts
    (_eps_parts)."""
    eps = ((tl.zeros(c.shape, dtype=tl.float64) + E0) + E1) + E2
    return 1.0 / tl.sqrt(v32.to(tl.float64) + eps)


@triton.jit
def _invstd(VAR, sv, c, cm, E0, E1, E2):
    return _invstd_of(tl.load(VAR + c * sv, mask=cm, other=1.0).to(tl.float32), E0, E1, E2, c)


@triton.jit
def _chan(P, sp, c, cm, value, HAS: tl.constexpr):
    """A per-channel parameter (any strides) as fp32 [FIN_C], `value` where it is absent."""
    if HAS:
        return tl.load(P + c * sp, mask=cm, other=value).to(tl.float32)
    else:
        return tl.zeros(c.shape, dtype=tl.float32) + value


@triton.jit
def _train_stat_finish_kernel(PART, T, C, BIAS, sbias, GAMMA, sgamma, BETA, sbeta, E0, E1, E2,
                              MEAN_OUT, CENTER, VAR_OUT, AFFINE,
                              HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                              FIN_T: tl.constexpr, FIN_C: tl.constexpr):
    """The training forward's statistics: PART (T, 3, C) float64 rows (n, mean, M2) of the splits
    merged in a fixed order by the parallel-axis form (mean = sum n_i m_i / n, M2 = sum M2_i +
    sum n_i (m_i - mean)^2); the batch mean and biased variance rounded to fp32 (what the op
    returns), mean + bias, and the forward's AFFINE (2, C) fp32 rows: the folded scale gamma *
    invstd (invstd in float64 from the fp32 variance, as the backward computes it) and the shift
    beta (read in place whatever its dtype and strides)."""
    c = tl.program_id(0) * FIN_C + tl.arange(0, FIN_C)
    cm = c < C
    tt = tl.arange(0, FIN_T)
    a_n = tl.zeros([FIN_T, FIN_C], dtype=tl.float64)
    a_s = tl.zeros([FIN_T, FIN_C], dtype=tl.float64)
    for t0 in range(0, T, FIN_T):
        t = t0 + tt
        m = (t < T)[:, None] & cm[None, :]
        p = PART + t.to(tl.int64)[:, None] * (3 * C) + c[None, :]
        ni = tl.load(p, mask=m, other=0.0)
        a_n += ni
        a_s += ni * tl.load(p + C, mask=m, other=0.0)
    cnt = tl.where(cm, tl.sum(a_n, axis=0), 1.0)  # > 0 on live lanes: every channel has M > 0 values
    mean = tl.sum(a_s, axis=0) / cnt
    a_q = tl.zeros([FIN_T, FIN_C], dtype=tl.float64)
    for t0 in range(0, T, FIN_T):
        t = t0 + tt
        m = (t < T)[:, None] & cm[None, :]
        p = PART + t.to(tl.int64)[:, None] * (3 * C) + c[None, :]
        d = tl.load(p + C, mask=m, other=0.0) - mean[None, :]
        a_q += tl.load(p + 2 * C, mask=m, other=0.0) + tl.load(p, mask=m, other=0.0) * d * d
    m32 = mean.to(tl.float32)
    v32 = (tl.sum(a_q, axis=0) / cnt).to(tl.float32)
    tl.store(CENTER + c, m32, mask=cm)
    tl.store(VAR_OUT + c, v32, mask=cm)
    if HAS_BIAS:
        tl.store(MEAN_OUT + c, m32 + tl.load(BIAS + c * sbias, mask=cm, other=0.0).to(tl.float32), mask=cm)
    g = _chan(GAMMA, sgamma, c, cm, 1.0, HAS_GAMMA).to(tl.float64)
    invstd = _invstd_of(v32, E0, E1, E2, c)
    tl.store(AFFINE + c, (g * invstd).to(tl.float32), mask=cm)
    tl.store(AFFINE + C + c, _chan(BETA, sbeta, c, cm, 0.0, HAS_BETA), mask=cm)


@triton.jit
def _train_bwd_prep_kernel(GAMMA, sgamma, BETA, sbeta, MEAN, smean, VAR, svar, E0, E1, E2, COEF, C,
                           HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, FIN_C: tl.constexpr):
    """Before the training backward's first pass: COEF (5, C) fp32 rows 0-2 = the folded scale
    gamma * invstd, the shift beta and the center mean (rows 3-4: _train_bwd_finish_kernel)."""
    c = tl.program_id(0) * FIN_C + tl.arange(0, FIN_C)
    cm = c < C
    g = _chan(GAMMA, sgamma, c, cm, 1.0, HAS_GAMMA).to(tl.float64)
    tl.store(COEF + c, (g * _invstd(VAR, svar, c, cm, E0, E1, E2)).to(tl.float32), mask=cm)
    tl.store(COEF + C + c, _chan(BETA, sbeta, c, cm, 0.0, HAS_BETA), mask=cm)
    tl.store(COEF + 2 * C + c, tl.load(MEAN + c * smean, mask=cm, other=0.0).to(tl.float32), mask=cm)


@triton.jit(do_not_specialize=["M"])
def _train_bwd_finish_kernel(PART, T, C, GAMMA, sgamma, VAR, svar, E0, E1, E2, GMEAN, sgm, GVAR, sgv, M,
                             COEF, DG, DB,
                             HAS_GAMMA: tl.constexpr, HAS_GM: tl.constexpr, HAS_GV: tl.constexpr,
                             NEED_DG: tl.constexpr, NEED_DB: tl.constexpr,
                             FIN_T: tl.constexpr, FIN_C: tl.constexpr):
    """After the first pass: S = sum gu * (z - mean), B = sum gu from PART (T, 2, C) fp32, in
    float64; dgamma = invstd * S and dbeta = B in their parameters' dtypes; the coefficients of
    dz = scale * gu + lin * (z - mean) + cst into COEF rows 3-4:
    lin = (2 * grad_var - gamma * invstd^3 * S) / M, cst = (grad_mean - gamma * invstd * B) / M."""
    c = tl.program_id(0) * FIN_C + tl.arange(0, FIN_C)
    cm = c < C
    S = _rows_sum(PART, T, 2 * C, c, cm, FIN_T, FIN_C)
    B = _rows_sum(PART + C, T, 2 * C, c, cm, FIN_T, FIN_C)
    invstd = _invstd(VAR, svar, c, cm, E0, E1, E2)
    g = _chan(GAMMA, sgamma, c, cm, 1.0, HAS_GAMMA).to(tl.float64)
    if NEED_DG:
        tl.store(DG + c, (invstd * S).to(tl.float32), mask=cm)
    if NEED_DB:
        tl.store(DB + c, B.to(tl.float32), mask=cm)
    lin = -(g * (invstd * invstd * invstd) * S)
    if HAS_GV:
        lin += 2.0 * _chan(GVAR, sgv, c, cm, 0.0, True).to(tl.float64)
    cst = -((g * invstd) * B)
    if HAS_GM:
        cst += _chan(GMEAN, sgm, c, cm, 0.0, True).to(tl.float64)
    Md = M.to(tl.float64)
    tl.store(COEF + 3 * C + c, (lin / Md).to(tl.float32), mask=cm)
    tl.store(COEF + 4 * C + c, (cst / Md).to(tl.float32), mask=cm)


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

# The forward (row bands: BLOCK_H is the rows a program streams through, [BLOCK_W, BLOCK_C] one
# row of its outputs), by layout and tap count (up to 3x3, up to 5x5, more). Up to 3x3 taps: rows
# of 8 elements per thread (a 16-byte vector of fp16 channels); larger kernels: 4 (5x5) or 2 (7x7)
# per thread, so that the KH*KW weight registers per channel fit without spilling. NCHW: BLOCK_C
# channels of BLOCK_W columns, 4 columns per thread (2 from 7x7 on); the 8- and 16-column tiles
# keep 7x7 and 14x14 planes from running mostly masked lanes.
_FWD_NCHW = [_cfg(16, 128, 4, 4), _cfg(16, 64, 8, 4), _cfg(16, 32, 16, 4), _cfg(16, 16, 32, 4), _cfg(8, 8, 64, 4)]
_FWD_CONFIGS = {
    (True, 0): [_cfg(16, 16, 64, 4), _cfg(16, 32, 32, 4), _cfg(16, 8, 128, 4), _cfg(8, 16, 64, 4),
                _cfg(16, 16, 128, 8)],
    (True, 1): [_cfg(16, 16, 32, 4), _cfg(16, 8, 64, 4), _cfg(32, 16, 32, 4), _cfg(16, 32, 16, 4)],
    (True, 2): [_cfg(16, 8, 32, 4), _cfg(32, 8, 32, 4), _cfg(16, 16, 16, 4), _cfg(16, 4, 64, 4)],
    (False, 0): _FWD_NCHW,
    (False, 1): _FWD_NCHW,
    (False, 2): [_cfg(16, 64, 4, 4), _cfg(16, 32, 8, 4), _cfg(16, 16, 16, 4), _cfg(16, 8, 32, 4)],
}
_INTERP_FWD = {True: [_cfg(8, 8, 16, 4)], False: [_cfg(8, 16, 4, 4)]}


def _fwd_table_key(cl: bool, taps: int):
    """The forward's config list for a layout and a tap count KH*KW."""
    return cl, (0 if taps <= 9 else 1 if taps <= 25 else 2)


def _configs(channels_last: bool):
    if INTERPRET:
        return _INTERP_CL if channels_last else _INTERP_NCHW
    cfgs = _CL_CONFIGS if channels_last else _NCHW_CONFIGS
    return cfgs if AUTOTUNE else cfgs[:1]


def _fwd_configs(key):
    """key: _fwd_table_key."""
    if INTERPRET:
        return _INTERP_FWD[key[0]]
    cfgs = _FWD_CONFIGS[key]
    return cfgs if AUTOTUNE else cfgs[:1]


# The band kernels of the backward (gu, and dx at stride 1): one program per band of BAND rows x
# BLOCK_W columns (both chosen on the host, _band_plan, because they fix how many partial-sum rows
# there are), autotuned over the channel block, by tap-count class (_fwd_table_key). Up to 3x3:
# 8 elements per thread and row for channels_last (a 16-byte vector of fp16 channels), 4 for NCHW
# (the dx kernel's KH*KW weight-gradient registers spill at 8 there); 5x5: 2; 7x7 and up: 1, so
# that the KH*KW weight and weight-gradient registers per element fit without spilling.
def _bcfg(bw, bc, warps):
    return triton.Config({"BLOCK_W": bw, "BLOCK_C": bc}, num_warps=warps, num_stages=1)


_BAND_KEYS = [(cl, bw, kc) for kc in (0, 1, 2) for cl in (True, False)
              for bw in ((8, 16, 32) if cl else (8, 16, 32, 64))]


def _band_configs(key, every=False):
    """key: (channels_last, BLOCK_W, tap-count class); every: the whole list, even when autotuning
    is off (the GPU test that pins each config in turn)."""
    cl, bw, kc = key
    if INTERPRET:  # 16 channels for channels_last (partial and full channel blocks in small tests)
        return [_bcfg(bw, 16 if cl else max(1, 128 // bw), 4)]
    per = ((8 if cl else 4), 2, 1)[kc]  # elements per thread and row
    cfgs = [_bcfg(bw, max(1, per * 128 // bw), 4), _bcfg(bw, max(1, per * 256 // bw), 8),
            _bcfg(bw, max(1, per * 64 // bw), 4)]
    return cfgs if AUTOTUNE or every else cfgs[:1]


_CACHE_RESULTS = "cache_results" in inspect.signature(triton.autotune).parameters


def _autotune(kernel, configs):
    extra = {"cache_results": True} if _CACHE_RESULTS and len(configs) > 1 else {}
    return triton.autotune(configs=configs, key=_KEY, **extra)(kernel)


def _tuned(kernel, channels_last: bool):
    return _autotune(kernel, _configs(channels_last))


def _pinned_table(kernel, tuned, configs=_configs):
    """The pinned kernels (first config) beside the tuned ones: the same table when one config is
    all there is (interpreter, FASTDW_TRITON_AUTOTUNE=0)."""
    if all(len(k.configs) == 1 for k in tuned.values()):
        return tuned
    return {key: _autotune(kernel, configs(key)[:1]) for key in tuned}


_FWD = {key: _autotune(_dwconv_fwd_kernel, _fwd_configs(key)) for key in _FWD_CONFIGS}
_BWD_GU = {key: _autotune(_dwconv_bwd_gu_kernel, _band_configs(key)) for key in _BAND_KEYS}
_BWD_DX_ROWS = {key: _autotune(_dwconv_bwd_dx_rows_kernel, _band_configs(key)) for key in _BAND_KEYS}
_BWD_DX_S2 = {key: _autotune(_dwconv_bwd_dx_s2_kernel, _band_configs(key)) for key in _BAND_KEYS}
_BWD_DX = {cl: _tuned(_dwconv_bwd_dx_kernel, cl) for cl in (True, False)}
_TRAIN_STATS = {cl: _tuned(_dwconv_train_stats_kernel, cl) for cl in (True, False)}
_PINNED = {id(t): _pinned_table(k, t) for k, t in ((_dwconv_bwd_dx_kernel, _BWD_DX),
                                                  (_dwconv_train_stats_kernel, _TRAIN_STATS))}
_PINNED[id(_FWD)] = _pinned_table(_dwconv_fwd_kernel, _FWD, _fwd_configs)
_PINNED[id(_BWD_GU)] = _pinned_table(_dwconv_bwd_gu_kernel, _BWD_GU, _band_configs)
_PINNED[id(_BWD_DX_ROWS)] = _pinned_table(_dwconv_bwd_dx_rows_kernel, _BWD_DX_ROWS, _band_configs)
_PINNED[id(_BWD_DX_S2)] = _pinned_table(_dwconv_bwd_dx_s2_kernel, _BWD_DX_S2, _band_configs)
# (kernel, key) pairs this process launched through the autotuner outside a CUDA-graph capture
_TUNED_KEYS: set = set()


def _capturing(x) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _run(table, grid, args, consts, x, k, deterministic=None, tkey=None):
    """Launch a kernel of `table` (_FWD, ...) for the launch's plan `k` (_common) with positional
    `args` and constexpr keyword arguments `consts`: the autotuned one, or the pinned one in
    deterministic mode (None: deterministic_requested()) and for a key not yet tuned while the
    stream is being captured. Traced calls (torch.compile) take the autotuned one: Inductor tunes
    user kernels itself."""
    cl = k["cl"] if tkey is None else tkey  # the table's key: the layout (and, forward, the tap count class)
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


def _cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (triton.cdiv is a jit function: several microseconds a call
    from Python, six or more per backward call)."""
    return -(-a // b)


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
    return max(1, min(_cdiv(positions, 256), (8 * sms) // max(1, channel_programs)))


def _check_triton_limits(x, OH=None, OW=None, *more):
    """What the Triton kernels add to the op's argument checks: no fp64, and int32 offsets inside
    an image: C*H*W and C*OH*OW < 2**31, and the elements x and the tensors `more` (grad_out)
    span inside one image through their strides (a strided view of a larger tensor) too."""
    torch._check_type(x.dtype in (torch.float32, torch.float16, torch.bfloat16),
                      lambda: f"fastdw: the Triton backend takes float32, float16 or bfloat16 x; got {x.dtype}")
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    for n in (C * H * W, None if OH is None else C * OH * OW):
        if n is not None:
            torch._check_value(n < 2 ** 31,
                               lambda: "fastdw: the Triton backend needs C*H*W and C*OH*OW < 2**31 elements per "
                                       f"image (int32 offsets); got x {list(x.shape)}, output {OH}x{OW}")
    for t in (x, *more):
        span = sum((t.shape[d] - 1) * t.stride(d) for d in (1, 2, 3))
        torch._check_value(span < 2 ** 31,
                           lambda: "fastdw: the Triton backend addresses one image with int32 offsets: a tensor "
                                   f"of shape {list(t.shape)} and strides {list(t.stride())} spans {span} "
                                   "elements per image (needs < 2**31; make it contiguous)")


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
    _check_triton_limits(x, OH, OW)
    return _plan(x, weight, OH, OW)


def _bwd_plan(grad_out, x, weight, scale, shift, stride, padding, dilation, act, output_mask) -> _Plan:
    pl = _fwd_plan(x, weight, scale, shift, stride, padding, dilation, act)
    _check_bwd(grad_out, x, pl.OH, pl.OW, output_mask)
    _check_triton_limits(x, pl.OH, pl.OW, grad_out)
    return pl


def _train_fwd_plan(x, weight, bias, gamma, beta, stride, padding, dilation, eps, act) -> _Plan:
    OH, OW = check_train_args(x, weight, bias, gamma, beta, stride, padding, dilation, eps, act)
    _check_triton_limits(x, OH, OW)
    return _plan(x, weight, OH, OW)


def _train_bwd_plan(grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var, stride, padding, dilation, eps,
                    act, output_mask) -> _Plan:
    pl = _train_fwd_plan(x, weight, None, gamma, beta, stride, padding, dilation, eps, act)
    check_channel_vectors(x, mean=mean, var=var, grad_mean=grad_mean, grad_var=grad_var)
    _check_bwd(grad_y, x, pl.OH, pl.OW, output_mask)
    _check_triton_limits(x, pl.OH, pl.OW, grad_y)
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
        return (N * _cdiv(OH, meta["BLOCK_H"]) * _cdiv(OW, meta["BLOCK_W"])
                * _cdiv(C, meta["BLOCK_C"]),)

    _run(_FWD, grid, (
        x, k["wt"], k["s"], k["b"], center if center is not None else k["wt"], y,
        C, k["H"], k["W"], OH, OW,
        *x.stride(), *y.stride(),
        padding[0], padding[1],
        *k["buckets"],
    ), dict(ACT=k["act"], SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1], KH=k["KH"], KW=k["KW"],
            HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_CENTER=center is not None),
        x, k, tkey=_fwd_table_key(k["cl"], k["KH"] * k["KW"]))
    return y


def _cprog(k) -> int:
    """Channel programs per split: an estimate (BLOCK_C = 64 for channels_last, 1 for NCHW)."""
    return _cdiv(k["C"], 64) if k["cl"] else k["C"]


def _band_plan(x, k, rows, cols, dw=False):
    """(BAND, BLOCK_W, band tiles) of a band kernel over a rows x cols plane per image: BLOCK_W
    for channels_last 8 columns (channels fill the tile), 16 for C <= 64 and 32 for C <= 32 (a
    [8, 128] tile over 32 channels ran 75% masked lanes: MobileNetV2's first layer), at most the
    plane's width rounded up to a power of two; NCHW the plane's width rounded up to a power of
    two within 8..64; BAND the most rows per program (64, 32, 16) that still makes about
    four programs per SM. Depends on the shapes and the GPU, never on the autotuned config, so the
    host knows how many partial-sum rows the programs write."""
    if k["cl"]:
        bw = min(32 if k["C"] <= 32 else 16 if k["C"] <= 64 else 8, max(8, _next_pow2(cols)))
    else:
        bw = min(16 if INTERPRET else 64, max(8, _next_pow2(cols)))
    tiles = k["N"] * _cdiv(cols, bw)
    if INTERPRET or x.device.type != "cuda":
        band = 8
    else:
        # the channel block of the table's first config (the band tables share their config lists)
        programs = tiles * _cdiv(k["C"], _BWD_GU[_band_key(k, bw, dw)].configs[0].kwargs["BLOCK_C"])
        sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
        band = next((b for b in (64, 32) if programs * _cdiv(rows, b) >= 4 * sms), 16)
    return band, bw, tiles * _cdiv(rows, band)


def _band_key(k, bw, dw=False):
    """The band kernels' config list: layout, BLOCK_W and the tap-count class, one class up when
    the kernel also keeps the taps and the weight-gradient sums live (dw: the gu pass at stride 2)."""
    kc = _fwd_table_key(k["cl"], k["KH"] * k["KW"])[1]
    return (k["cl"], bw, min(2, kc + 1) if dw else kc)


def _dx_by_parity(stride, dilation) -> bool:
    """Stride 2 without dilation: dx by output parity (_dwconv_bwd_dx_s2_kernel), the weight
    gradient in the gu pass."""
    return tuple(stride) == (2, 2) and tuple(dilation) == (1, 1)


def _gc_dtype(x, weight):
    """The dtype of the backward's gc workspace (the gradient at the conv's output): x's, as stock
    hands its BatchNorm backward's output to the conv backward, when the weight has x's dtype too
    (half the bytes in fp16/bf16); fp32 when the weight is fp32 beside a low-precision x (autocast's
    case): the weight gradient then keeps fp32's accuracy."""
    return x.dtype if weight.dtype == x.dtype else torch.float32


def _launch_gu(x, k, grad_out, gc, stride, padding, dilation, OH, OW, has_scale, has_shift, store_gc, need_red,
               deterministic, train=None, need_dw=False):
    """The gu kernel over all outputs: gc (when store_gc), the (tiles, 2, C) fp32 partial sums of
    dscale / dshift (when need_red) and, need_dw (direct rows only), dweight's (tiles, KH*KW, C)
    fp32 partial sums: returns (dscale / dshift partials or None, dweight partials or None).
    train = (center, lin, cst) switches on the batch-statistics terms (k["s"], k["b"] are then
    the folded batch scale and shift)."""
    C, H, W = k["C"], k["H"], k["W"]
    band, bw, tiles = _band_plan(x, k, OH, OW, need_dw)
    part = torch.empty((tiles, 2, C), dtype=torch.float32, device=x.device) if need_red else gc
    partw = torch.empty((tiles, k["KH"] * k["KW"], C), dtype=torch.float32, device=x.device) if need_dw else gc
    cen, lin, cst = train if train is not None else (k["wt"],) * 3

    def grid(meta):
        return (tiles * _cdiv(C, meta["BLOCK_C"]),)

    _run(_BWD_GU, grid, (
        x, k["wt"], k["s"], k["b"], grad_out, gc, part, partw,
        C, H, W, OH, OW, band,
        *x.stride(), *grad_out.stride(), *(gc.stride() if store_gc else (0, 0, 0, 0)),
        padding[0], padding[1],
        cen, lin, cst,
        *k["buckets"],
    ), dict(ACT=k["act"], SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1], KH=k["KH"], KW=k["KW"],
            HAS_SCALE=has_scale, HAS_SHIFT=has_shift, STORE_GC=store_gc, NEED_RED=need_red,
            TRAIN=train is not None, NEED_DW=need_dw), x, k, deterministic, tkey=_band_key(k, bw, need_dw))
    return (part if need_red else None), (partw if need_dw else None)


def _launch_dx_s2(x, k, gc, dx, padding, OH, OW, deterministic):
    """dx at stride 2 without dilation, by output parity (the weight gradient comes from gu)."""
    C, H, W = k["C"], k["H"], k["W"]
    MH, NW = (H + padding[0] + 1) // 2, (W + padding[1] + 1) // 2
    band, bw, tiles = _band_plan(x, k, MH, NW)

    def grid(meta):
        return (tiles * _cdiv(C, meta["BLOCK_C"]),)

    _run(_BWD_DX_S2, grid, (
        gc, k["wt"], dx,
        C, H, W, OH, OW, MH, NW, band,
        *gc.stride(), *dx.stride(),
        padding[0], padding[1],
        *k["buckets"],
    ), dict(KH=k["KH"], KW=k["KW"]), x, k, deterministic, tkey=_band_key(k, bw))


def _launch_dx_rows(x, k, gc, dx, padding, OH, OW, need_dx, need_dw, deterministic):
    """The stride-1, undilated dx kernel from gc: fills dx (when need_dx) and returns dweight's
    (tiles, KH*KW, C) fp32 partial sums (when need_dw, else None)."""
    C, H, W = k["C"], k["H"], k["W"]
    KK = k["KH"] * k["KW"]
    band, bw, tiles = _band_plan(x, k, H, W)
    part = torch.empty((tiles, KK, C), dtype=torch.float32, device=x.device) if need_dw else gc

    def grid(meta):
        return (tiles * _cdiv(C, meta["BLOCK_C"]),)

    _run(_BWD_DX_ROWS, grid, (
        x, k["wt"], gc, dx, part,
        C, H, W, OH, OW, band,
        *x.stride(), *gc.stride(), *(dx.stride() if need_dx else (0, 0, 0, 0)),
        padding[0], padding[1],
        *k["buckets"],
    ), dict(KH=k["KH"], KW=k["KW"], NEED_DX=need_dx, NEED_DW=need_dw), x, k, deterministic,
         tkey=_band_key(k, bw))
    return part if need_dw else None


def _launch_dx(x, k, gc, dx, stride, padding, dilation, OH, OW, need_dx, need_dw, deterministic):
    """The dx kernel from gc (the gradient of the conv output): fills dx (when need_dx) and
    returns dweight's partial sums, (rows, >= KH*KW, C) (when need_dw, else None). Stride 1
    without dilation streams rows (_launch_dx_rows); otherwise the split kernel gathers every tap."""
    if tuple(stride) == (1, 1) and tuple(dilation) == (1, 1):
        return _launch_dx_rows(x, k, gc, dx, padding, OH, OW, need_dx, need_dw, deterministic)
    N, C, H, W = k["N"], k["C"], k["H"], k["W"]
    KK = k["KH"] * k["KW"]
    KKP = _next_pow2(KK)
    ns = _num_splits(x, N * H * W, _cprog(k))
    part = torch.empty((ns, KKP, C), dtype=torch.float64, device=x.device) if need_dw else gc

    def grid(meta):
        return (ns * _cdiv(C, meta["BLOCK_C"]),)

    _run(_BWD_DX, grid, (
        x, k["wt"], gc, dx, part,
        N, C, H, W, OH, OW, ns,
        *x.stride(), *gc.stride(), *(dx.stride() if need_dx else (0, 0, 0, 0)),
        padding[0], padding[1], dilation[0], dilation[1],
        *k["buckets"],
    ), dict(SH=stride[0], SW=stride[1], KH=k["KH"], KW=k["KW"], KKP=KKP, NEED_DX=need_dx, NEED_DW=need_dw),
        x, k, deterministic)
    return part if need_dw else None


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


def _grad_buf(like, need, shape, x):
    """A parameter gradient's buffer: the parameter's dtype (fp32 when it is absent), the given
    shape, a new tensor (the gradients never alias); an empty (0,) tensor where it was not asked for."""
    dtype = like.dtype if like is not None else torch.float32
    return torch.empty(shape if need else (0,), dtype=dtype, device=x.device)


def _fin(kernel, C):
    """A per-channel finish kernel, one program per _FIN_C channels."""
    return _launch(kernel)[(_cdiv(C, _FIN_C),)]


def _sum_rows(part, rows, out0, out1=None, r0=None, sor=0, soc=1):
    """out[r, c] = sum_t part[t, r, c] for the first `rows` rows of part ((T, R, C), rows
    part.stride(0) apart, channels contiguous), in float64, fixed order, stored in the output's
    dtype: rows below r0 into out0 (element r * sor + c * soc), the rest into out1."""
    C = part.shape[2]
    _launch(_sum_rows_kernel)[(rows, _cdiv(C, _FIN_C))](
        part, part.shape[0], part.stride(0), C, out0, out1 if out1 is not None else out0,
        rows if r0 is None else r0, sor, soc, FIN_T=_FIN_T, FIN_C=_FIN_C)


def _sum_pair(part, a, b):
    """The two per-channel gradients a (row 0) and b (row 1) of (T, 2, C) partial sums, each in
    its own dtype (None: not wanted): one launch."""
    if a is not None:
        _sum_rows(part, 2 if b is not None else 1, a, b, r0=1)
    elif b is not None:
        _sum_rows(part[:, 1:], 1, b)


def _zero_unsummed(ran, *bufs):
    """Zeros into the gradients that were asked for when no pass ran (nothing to sum)."""
    if not ran:
        for buf in bufs:
            if buf.numel() > 0:
                buf.zero_()


def _dx_pass(x, k, gc, dx, dwt, partw, stride, padding, dilation, OH, OW, need_dx, need_dw, deterministic):
    """The backward's second pass from gc (the gradient at the conv's output), then dweight (C, 1,
    KH, KW) from its partial sums in one launch: at stride 2 dx by output parity (dweight's
    partials partw came from the gu pass), otherwise the dx kernel, which takes them itself."""
    if _dx_by_parity(stride, dilation):
        if need_dx:
            _launch_dx_s2(x, k, gc, dx, padding, OH, OW, deterministic)
    elif need_dx or need_dw:
        partw = _launch_dx(x, k, gc, dx, stride, padding, dilation, OH, OW, need_dx, need_dw, deterministic)
    if need_dw:
        KK = k["KH"] * k["KW"]
        _sum_rows(partw, KK, dwt, sor=1, soc=KK)


def _bwd(grad_out, x, weight, scale, shift, stride, padding, dilation, act, output_mask, deterministic, pl):
    OH, OW = pl.OH, pl.OW
    N, C, H, W = x.shape
    need_dx, need_dw = bool(output_mask[0]), bool(output_mask[1])
    need_ds, need_db = bool(output_mask[2]) and scale is not None, bool(output_mask[3]) and shift is not None
    fmt = pl.fmt
    KH, KW = weight.shape[2], weight.shape[3]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if need_dx \
        else torch.empty((0,), dtype=x.dtype, device=x.device)
    dwt = _grad_buf(weight, need_dw, (C, 1, KH, KW), x)
    dst, dbt = _grad_buf(scale, need_ds, (C,), x), _grad_buf(shift, need_db, (C,), x)
    ran = False
    if x.numel() > 0 and (need_dx or need_dw or need_ds or need_db):
        ran = True
        k = _common(x, weight, scale, shift, act, pl)
        need_red = need_ds or need_db
        parity = _dx_by_parity(stride, dilation)
        store_gc = need_dx or (need_dw and not parity)
        gc = torch.empty((N, C, OH, OW), memory_format=fmt, dtype=_gc_dtype(x, weight), device=x.device) \
            if store_gc else dx
        part1, partw = _launch_gu(x, k, grad_out, gc, stride, padding, dilation, OH, OW, has_scale=scale is not None,
                                  has_shift=shift is not None, store_gc=store_gc, need_red=need_red,
                                  deterministic=deterministic, need_dw=need_dw and parity)
        if need_red:
            _sum_pair(part1, dst if need_ds else None, dbt if need_db else None)
        _dx_pass(x, k, gc, dx, dwt, partw, stride, padding, dilation, OH, OW, need_dx, need_dw, deterministic)
    _zero_unsummed(ran, dwt, dst, dbt)
    return dx, dwt, dst, dbt


# ------------------------------------------------------------------------------------------
# Training mode (batch-statistics BatchNorm). The per-channel algebra between the passes (the
# statistics merge, BatchNorm folding, the dz coefficients) runs in the finish kernels above:
# the training forward is three launches (statistics, finish, forward), the backward at most six
# (prep, pass A, finish, pass B, dx, the weight gradient's sum).


def _eps_parts(eps: float):
    """eps as three fp32 numbers whose float64 sum is eps exactly: Triton passes a float scalar
    as fp32 (so does Inductor for the kernels it launches), and invstd is formed in float64 from
    the double eps, as the CUDA and CPU backends do."""
    parts = []
    v = float(eps)
    for _ in range(3):
        p = struct.unpack("f", struct.pack("f", v))[0]
        parts.append(p)
        v -= p  # exact: p is v rounded to fp32
    return parts


def _param(t: Optional[Tensor], dummy: Tensor):
    """(pointer, stride) of an optional per-channel tensor for the finish kernels."""
    return (t, t.stride(0)) if t is not None else (dummy, 0)


def dwconv_bn_act_train_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: Optional[Tensor],
                            beta: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                            eps: float, act: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Training forward launcher (the body of fastdw::dwconv_bn_act_train_triton): the statistics
    kernel, the finish kernel (its per-split (n, mean, M2) rows merged in float64 in a fixed
    order, the folded scale), then the inference forward with center = mean, scale = gamma *
    invstd, shift = beta. Returns (y, mean + bias, biased var), mean and var fp32 (C,)."""
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
        return (ns * _cdiv(C, meta["BLOCK_C"]),)

    _run(_TRAIN_STATS, grid, (
        x, k["wt"], part,
        N, C, H, W, OH, OW, ns,
        *x.stride(),
        padding[0], padding[1], dilation[0], dilation[1],
        *k["buckets"],
    ), dict(SH=stride[0], SW=stride[1], KH=k["KH"], KW=k["KW"]), x, k)
    center, var = (torch.empty((C,), dtype=torch.float32, device=x.device) for _ in range(2))
    mean_out = torch.empty_like(center) if bias is not None else center
    affine = torch.empty((2, C), dtype=torch.float32, device=x.device)  # scale, shift
    _fin(_train_stat_finish_kernel, C)(
        part, ns, C, *_param(bias, part), *_param(gamma, part), *_param(beta, part), *_eps_parts(eps),
        mean_out, center, var, affine,
        HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, FIN_T=_FIN_T, FIN_C=_FIN_C)
    y = _fwd_launch(x, weight, affine[0], affine[1], stride, padding, dilation, act, pl, center=center)
    return y, mean_out, var


def dwconv_bn_act_train_bwd(grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor], x: Tensor,
                            weight: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], mean: Tensor, var: Tensor,
                            stride: List[int], padding: List[int], dilation: List[int], eps: float, act: str,
                            output_mask: List[bool], deterministic: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training backward launcher (the body of fastdw::_dwconv_bn_act_train_backward_triton):
    the prep kernel (scale, shift, center), the gu kernel twice (A: sums of gu and gu*(z - mean),
    finished into dgamma, dbeta and the dz coefficients; B: dz), then the dx kernel on dz.
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
    dwt = _grad_buf(weight, need_dw, (C, 1, KH, KW), x)
    dgt, dbt = _grad_buf(gamma, need_dg, (C,), x), _grad_buf(beta, need_db, (C,), x)
    M = N * OH * OW
    ran = M > 0 and C > 0
    if ran:
        # the per-channel algebra in float64 inside the prep and finish kernels; fp32 to the passes:
        # coef rows scale, shift, center (prep), lin, cst (finish)
        coef = torch.empty((5, C), dtype=torch.float32, device=x.device)
        g_arg, v_arg, e_arg = _param(gamma, coef), (var, var.stride(0)), _eps_parts(eps)
        _fin(_train_bwd_prep_kernel, C)(*g_arg, *_param(beta, coef), mean, mean.stride(0), *v_arg, *e_arg,
                                        coef, C, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, FIN_C=_FIN_C)
        k = _common(x, weight, coef[0], coef[1], act, pl)
        center = coef[2]
        part, _ = _launch_gu(x, k, grad_y, dx, stride, padding, dilation, OH, OW, has_scale=True, has_shift=True,
                             store_gc=False, need_red=True, deterministic=deterministic, train=(center, center, center))
        _fin(_train_bwd_finish_kernel, C)(
            part, part.shape[0], C, *g_arg, *v_arg, *e_arg, *_param(grad_mean, coef),
            *_param(grad_var, coef), M,
            coef, dgt if need_dg else coef, dbt if need_db else coef,
            HAS_GAMMA=gamma is not None, HAS_GM=grad_mean is not None, HAS_GV=grad_var is not None,
            NEED_DG=need_dg, NEED_DB=need_db, FIN_T=_FIN_T, FIN_C=_FIN_C)
        if need_dx or need_dw:
            parity = _dx_by_parity(stride, dilation)
            store_gz = need_dx or not parity
            gz = torch.empty((N, C, OH, OW), memory_format=fmt, dtype=_gc_dtype(x, weight), device=x.device) \
                if store_gz else dx
            _, partw = _launch_gu(x, k, grad_y, gz, stride, padding, dilation, OH, OW, has_scale=True,
                                  has_shift=True, store_gc=store_gz, need_red=False, deterministic=deterministic,
                                  train=(center, coef[3], coef[4]), need_dw=need_dw and parity)
            _dx_pass(x, k, gz, dx, dwt, partw, stride, padding, dilation, OH, OW, need_dx, need_dw, deterministic)
    elif need_dx:
        dx.zero_()
    _zero_unsummed(ran, dwt, dgt, dbt)
    return dx, dwt, dgt, dbt


# ------------------------------------------------------------------------------------------
# Op registration


def _fwd_fake(x, weight, scale, shift, stride, padding, dilation, act):
    out = AG.fake_forward(x, weight, scale, shift, stride, padding, dilation, act)
    _check_triton_limits(x, out.shape[2], out.shape[3])
    return out


def _bwd_fake(grad_out, x, weight, scale, shift, stride, padding, dilation, act, output_mask, deterministic):
    out = AG.fake_backward(grad_out, x, weight, scale, shift, stride, padding, dilation, act, output_mask,
                           deterministic)
    _check_triton_limits(x, grad_out.shape[2], grad_out.shape[3], grad_out)
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
    _check_triton_limits(x, out[0].shape[2], out[0].shape[3])
    return out


def _train_bwd_fake(grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var, stride, padding, dilation, eps,
                    act, output_mask, deterministic):
    out = AG.fake_train_backward(grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var, stride, padding,
                                 dilation, eps, act, output_mask, deterministic)
    _check_triton_limits(x, grad_y.shape[2], grad_y.shape[3], grad_y)
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
