"""Numerics of fastdw.dwconv_bn_act (forward and backward) against fastdw.reference.

Every layout, dtype, activation and a spread of (kernel, stride, padding, dilation) configs; awkward
sizes; optional scale/shift; mixed weight dtypes; gradcheck; determinism; the raw backward op; the
output layout rule. Large sweeps loop inside one test and report every failing config at once.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastdw
import fastdw.ops
from conftest import (
    ACTS,
    DTYPES,
    LAYOUTS,
    LOWP,
    assert_close_fp,
    assert_format,
    check_close,
    dtype_id,
    expected_format,
    f32_copy,
    format_name,
    kernel_scale,
    lowp_check,
    make_inputs,
    reduction_scale,
    ref_forward,
    report,
    skip_unsupported,
    to_layout,
)

OP = torch.ops.fastdw.dwconv_bn_act.default
BWD = torch.ops.fastdw._dwconv_bn_act_backward.default

DTYPE_PARAMS = [pytest.param(dt, id=dtype_id(dt)) for dt in DTYPES]
LOWP_PARAMS = [pytest.param(dt, id=dtype_id(dt)) for dt in LOWP]

# (k, stride, padding, dilation)
FWD_CONFIGS = [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 0, 1), (3, 2, 2, 2),
               (5, 1, 2, 1), (5, 2, 0, 1), (7, 1, 3, 1), (7, 2, 1, 2)]
BWD_CONFIGS = [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 2), (7, 2, 3, 1)]
# H, W: odd, W not a multiple of a vector width, and W + 2 >= 13 so (7, 2, 1, 2) fits.
SHAPE = (2, 17, 15, 13)


def _p2(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _conf(stride, padding, dilation):
    return [list(_p2(stride)), list(_p2(padding)), list(_p2(dilation))]


def _out_hw(H, W, k, stride, padding, dilation):
    kh, kw = _p2(k)
    (sh, sw), (ph, pw), (dh, dw) = _p2(stride), _p2(padding), _p2(dilation)
    return (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _fits(H, W, k, padding, dilation):
    kh, kw = _p2(k)
    (ph, pw), (dh, dw) = _p2(padding), _p2(dilation)
    return dh * (kh - 1) + 1 <= H + 2 * ph and dw * (kw - 1) + 1 <= W + 2 * pw


# ------------------------------------------------------------------------------------------
# Forward / backward comparison helpers: return a list of failure messages (empty when fine).


def forward_failures(x, w, s, b, stride, padding, dilation, act, *, raw=True, backend="auto", raw_op=None):
    """Public function (and raw op) vs reference: dtype, layout by the rule, shape, values."""
    fails = []
    raw_op = OP if raw_op is None else raw_op
    out = fastdw.dwconv_bn_act(x, w, s, b, stride=stride, padding=padding, dilation=dilation, act=act,
                               backend=backend)
    N, C, H, W = x.shape
    oh, ow = _out_hw(H, W, tuple(w.shape[2:]), stride, padding, dilation)
    if tuple(out.shape) != (N, C, oh, ow):
        return [f"shape {tuple(out.shape)} != {(N, C, oh, ow)}"]
    if out.dtype != x.dtype:
        fails.append(f"dtype {out.dtype} != x.dtype {x.dtype}")
    fmt = expected_format(x)
    if fastdw.output_memory_format(x) != fmt:
        fails.append(f"fastdw.output_memory_format(x) = {fastdw.output_memory_format(x)} != rule {fmt}")
    if not out.is_contiguous(memory_format=fmt):
        fails.append(f"output layout {format_name(out)} (strides {out.stride()}), rule says {fmt}")
    dtype = x.dtype
    if dtype in LOWP:
        ref = ref_forward(x, w, s, b, stride, padding, dilation, act, torch.float32)
        stock = ref_forward(x, w, s, b, stride, padding, dilation, act, None)
        msg = lowp_check(out, ref, stock, dtype)
    else:
        ref = ref_forward(x, w, s, b, stride, padding, dilation, act, torch.float64)
        msg = check_close(out, ref, dtype=dtype, atol_scale=kernel_scale(w))
    if msg:
        fails.append(f"values: {msg}")
    if raw:
        out_raw = raw_op(x, w, s, b, *_conf(stride, padding, dilation), act)
        if not torch.equal(out_raw, out) and not (out.numel() == 0 and out_raw.shape == out.shape):
            fails.append("raw op output differs from the public function's")
        if not out_raw.is_contiguous(memory_format=fmt):
            fails.append(f"raw op output layout {format_name(out_raw)}, rule says {fmt}")
    return fails


def _grads(fn, inputs, grad_out):
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    y = fn(*inputs)
    gs = torch.autograd.grad(y, leaves, grad_out, allow_unused=True) if leaves else ()
    it = iter(gs)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


NAMES = ("dx", "dweight", "dscale", "dshift")


def backward_failures(x, w, s, b, stride, padding, dilation, act, *, backend="auto"):
    """Gradients (x, w, s, b that require grad) of the public function vs autograd through the
    reference: fp64 reference for fp32/fp64, the 2x-of-stock rule for fp16/bf16."""
    fails = []
    fwd = lambda *a: fastdw.dwconv_bn_act(*a, stride=stride, padding=padding, dilation=dilation, act=act,
                                          backend=backend)
    y = fwd(x, w, s, b)
    go = torch.randn(y.shape, device=y.device).to(y.dtype)
    got = _grads(fwd, (x, w, s, b), go)
    inputs = (x, w, s, b)
    # dtypes and layouts of the gradients
    for name, t, g in zip(NAMES, inputs, got):
        if t is None or not t.requires_grad:
            continue
        if g is None:
            fails.append(f"{name} is None")
            continue
        if g.shape != t.shape or g.dtype != t.dtype:
            fails.append(f"{name}: shape/dtype {tuple(g.shape)}/{g.dtype} != input's {tuple(t.shape)}/{t.dtype}")
    if got[0] is not None and not got[0].is_contiguous(memory_format=expected_format(x)):
        fails.append(f"dx layout {format_name(got[0])}, rule says {expected_format(x)}")
    if fails:
        return fails
    N = x.shape[0]
    count = N * y.shape[2] * y.shape[3]
    scales = (kernel_scale(w), reduction_scale(count), reduction_scale(count), reduction_scale(count))
    ref_fn = lambda cd: (lambda *a: ref_forward(*a, stride, padding, dilation, act, cd))
    if x.dtype in LOWP:
        ref_in = [f32_copy(t) for t in inputs]
        ref = _grads(ref_fn(torch.float32), ref_in, go.float())
        stock_in = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        stock = _grads(ref_fn(None), stock_in, go)
        for name, g, r, st in zip(NAMES, got, ref, stock):
            if g is not None:
                msg = lowp_check(g, r, st, g.dtype)
                if msg:
                    fails.append(f"{name}: {msg}")
    else:
        ref_in = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
        ref = _grads(ref_fn(torch.float64), ref_in, go.double())
        for name, g, r, sc in zip(NAMES, got, ref, scales):
            if g is not None:
                # tolerance of the gradient's own dtype (fp32 scale with fp64 x gives an fp32 dscale)
                msg = check_close(g, r, dtype=g.dtype, atol_scale=sc)
                if msg:
                    fails.append(f"{name}: {msg}")
    return fails


# ------------------------------------------------------------------------------------------
# Layout helpers themselves


def test_layout_helpers():
    t = torch.randn(*SHAPE)
    for layout in LAYOUTS:
        x = to_layout(t, layout)
        assert torch.equal(x, t), layout
    c, cl = to_layout(t, "contiguous"), to_layout(t, "channels_last")
    sl, pm = to_layout(t, "sliced"), to_layout(t, "permuted")
    assert c.is_contiguous() and not c.is_contiguous(memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert not sl.is_contiguous() and not sl.is_contiguous(memory_format=torch.channels_last)
    assert sl.untyped_storage().nbytes() > t.numel() * t.element_size()  # really a window
    assert not pm.is_contiguous() and not pm.is_contiguous(memory_format=torch.channels_last)
    assert pm.untyped_storage().nbytes() == t.numel() * t.element_size()  # dense


# ------------------------------------------------------------------------------------------
# Forward grid


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_forward_grid(device, dtype, layout, act):
    skip_unsupported(device, dtype)
    N, C, H, W = SHAPE
    fails = []
    for k, s, p, d in FWD_CONFIGS:
        x, w, sc, sh = make_inputs(N, C, H, W, k, dtype=dtype, device=device, layout=layout)
        for f in forward_failures(x, w, sc, sh, s, p, d, act):
            fails.append(f"(k={k}, s={s}, p={p}, d={d}): {f}")
    report(fails, len(FWD_CONFIGS))


# ------------------------------------------------------------------------------------------
# Awkward sizes (fp32): tiny / 1-wide / non-square images, C = 1 and non-multiples of the vector
# width, N = 0; kernels that do not fit must raise.


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_awkward_sizes(layout):
    fails, total = [], 0
    for C, (H, W), N, k, s, p, d in itertools.product(
            (1, 3, 17), ((1, 1), (2, 2), (7, 7), (15, 15), (1, 15), (15, 2)), (0, 1), (3, 5, 7), (1, 2),
            (0, 1, 2), (1, 2)):
        total += 1
        cfg = f"C={C} H={H} W={W} N={N} k={k} s={s} p={p} d={d}"
        x, w, sc, sh = make_inputs(N, C, H, W, k, layout=layout, requires_grad=True)
        if not _fits(H, W, k, p, d):
            for name, call in (("public", lambda: fastdw.dwconv_bn_act(x, w, sc, sh, s, p, d, "relu6")),
                               ("raw", lambda: OP(x, w, sc, sh, *_conf(s, p, d), "relu6"))):
                try:
                    call()
                    fails.append(f"{cfg}: {name}: kernel larger than the padded input did not raise")
                except ValueError as e:
                    if "kernel larger than the padded input" not in str(e):
                        fails.append(f"{cfg}: {name}: unclear message {e}")
                except Exception as e:  # noqa: BLE001
                    fails.append(f"{cfg}: {name}: {type(e).__name__} instead of ValueError: {e}")
            continue
        try:
            f = forward_failures(x.detach(), w.detach(), sc.detach(), sh.detach(), s, p, d, "hardswish")
            if N == 0:
                out = fastdw.dwconv_bn_act(x, w, sc, sh, s, p, d, "hardswish")
                if out.numel() != 0 or tuple(out.shape) != (0, C, *_out_hw(H, W, k, s, p, d)):
                    f.append(f"N=0 output shape {tuple(out.shape)}")
            f += backward_failures(x, w, sc, sh, s, p, d, "hardswish")
        except Exception as e:  # noqa: BLE001
            f = [f"raised {type(e).__name__}: {e}"]
        fails += [f"{cfg}: {m}" for m in f]
    report(fails, total)


def test_empty_batch_backward():
    """N = 0: empty dx, zero dweight/dscale/dshift (a sum over nothing)."""
    for layout in ("contiguous", "channels_last"):
        x, w, s, b = make_inputs(0, 5, 6, 6, 3, layout=layout, requires_grad=True)
        y = fastdw.dwconv_bn_act(x, w, s, b)
        assert y.shape == (0, 5, 6, 6)
        dx, dw, ds, db = torch.autograd.grad(y, (x, w, s, b), torch.empty_like(y))
        assert dx.shape == x.shape
        for g, t in ((dw, w), (ds, s), (db, b)):
            assert g.shape == t.shape and not g.any(), (layout, g)


# ------------------------------------------------------------------------------------------
# Optional scale/shift, their dtypes, fp32 weight with low-precision x


SS_MODES = {"both": (True, True), "neither": (False, False), "scale_only": (True, False), "shift_only": (False, True)}


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_scale_shift_optional(device, dtype):
    skip_unsupported(device, dtype)
    fails, total = [], 0
    for (mode, (has_s, has_b)), ssd, layout, act in itertools.product(
            SS_MODES.items(), (torch.float32, dtype), ("contiguous", "channels_last"), ("relu6", "silu")):
        total += 1
        x, w, s, b = make_inputs(2, 9, 8, 7, 3, dtype=dtype, device=device, layout=layout, scale=has_s,
                                 shift=has_b, ssdtype=ssd, requires_grad=True)
        f = forward_failures(x.detach(), w.detach(), None if s is None else s.detach(),
                             None if b is None else b.detach(), 1, 1, 1, act)
        f += backward_failures(x, w, s, b, 1, 1, 1, act)
        fails += [f"{mode} ss={dtype_id(ssd)} {layout} {act}: {m}" for m in f]
    report(fails, total)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", LOWP_PARAMS)
def test_fp32_weight_lowp_x(device, dtype, layout):
    """Autocast-style call: fp16/bf16 activations, fp32 weight (and fp32 or lowp scale/shift)."""
    skip_unsupported(device, dtype)
    fails = []
    for (k, s, p, d), ssd in itertools.product(BWD_CONFIGS, (torch.float32, dtype)):
        x, w, sc, sh = make_inputs(2, 17, 11, 10, k, dtype=dtype, device=device, layout=layout,
                                   wdtype=torch.float32, ssdtype=ssd, requires_grad=True)
        f = forward_failures(x.detach(), w.detach(), sc.detach(), sh.detach(), s, p, d, "hardswish")
        f += backward_failures(x, w, sc, sh, s, p, d, "hardswish")
        fails += [f"(k={k}, s={s}, p={p}, d={d}) ss={dtype_id(ssd)}: {m}" for m in f]
    report(fails, len(BWD_CONFIGS) * 2)


# ------------------------------------------------------------------------------------------
# Non-square and even kernels, asymmetric stride/padding/dilation


KERNELS = [(3, 5), (5, 3), (2, 2), (4, 4), (1, 1), (2, 3), (1, 7), (7, 1), (9, 9)]
CONVS = [(1, 1, 1), (2, 1, 1), ((2, 1), (1, 2), 1), (1, (0, 2), (2, 1)), ((1, 2), 0, (1, 2)), (3, 2, 1)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_nonsquare_even_kernels(device, dtype, layout):
    skip_unsupported(device, dtype)
    fails, total = [], 0
    for k, (s, p, d) in itertools.product(KERNELS, CONVS):
        if not _fits(13, 12, k, p, d):
            continue
        total += 1
        x, w, sc, sh = make_inputs(2, 10, 13, 12, k, dtype=dtype, device=device, layout=layout,
                                   requires_grad=True)
        try:
            f = forward_failures(x.detach(), w.detach(), sc.detach(), sh.detach(), s, p, d, "relu6")
            f += backward_failures(x, w, sc, sh, s, p, d, "relu6")
        except Exception as e:  # noqa: BLE001
            f = [f"raised {type(e).__name__}: {e}"]
        fails += [f"k={k} s={s} p={p} d={d}: {m}" for m in f]
    assert total > 40
    report(fails, total)


@pytest.mark.parametrize("dtype", [pytest.param(dt, id=dtype_id(dt)) for dt in (torch.float32,) + LOWP])
def test_large_c_channels_last(device, dtype):
    """C around and past the vector widths (8 fp32 lanes, 16 fp16), and a 96+8 MobileNet width."""
    skip_unsupported(device, dtype)
    fails, total = [], 0
    for C, k, s in itertools.product((7, 8, 9, 16, 24, 32, 33, 104), (3, 5, 7), (1, 2)):
        total += 1
        x, w, sc, sh = make_inputs(2, C, 10, 11, k, dtype=dtype, device=device, layout="channels_last",
                                   requires_grad=True)
        f = forward_failures(x.detach(), w.detach(), sc.detach(), sh.detach(), s, k // 2, 1, "relu6")
        f += backward_failures(x, w, sc, sh, s, k // 2, 1, "relu6")
        fails += [f"C={C} k={k} s={s}: {m}" for m in f]
    report(fails, total)


def test_public_arguments():
    """int and pair forms of stride/padding/dilation; backend='cpu' == 'auto' on CPU tensors."""
    x, w, s, b = make_inputs(2, 5, 9, 8, 3)
    a = fastdw.dwconv_bn_act(x, w, s, b, stride=2, padding=1, dilation=1, act="relu")
    assert torch.equal(a, fastdw.dwconv_bn_act(x, w, s, b, stride=(2, 2), padding=[1, 1], dilation=(1, 1),
                                               act="relu"))
    assert torch.equal(a, fastdw.dwconv_bn_act(x, w, s, b, 2, 1, 1, "relu", backend="cpu"))
    assert torch.equal(a, OP(x, w, s, b, [2, 2], [1, 1], [1, 1], "relu"))
    # defaults: stride 1, padding 1, dilation 1, relu6, no scale/shift
    assert_close_fp(fastdw.dwconv_bn_act(x, w), ref_forward(x, w, None, None, 1, 1, 1, "relu6", torch.float64))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_multi_chunk_shapes(layout):
    """N*OH > 64 rows, so the CPU backward's fixed chunks hold several rows each (and the last
    chunks are short or empty); several threads' worth of forward tasks."""
    fails, total = [], 0
    for dtype, (N, C, H, W, k, s) in itertools.product(
            DTYPES, [(3, 20, 37, 29, 3, 1), (3, 20, 37, 29, 5, 2), (5, 9, 30, 31, 7, 1)]):
        total += 1
        x, w, sc, sh = make_inputs(N, C, H, W, k, dtype=dtype, layout=layout, requires_grad=True)
        f = forward_failures(x.detach(), w.detach(), sc.detach(), sh.detach(), s, k // 2, 1, "hardswish")
        f += backward_failures(x, w, sc, sh, s, k // 2, 1, "hardswish")
        fails += [f"{dtype_id(dtype)} N={N} C={C} H={H} W={W} k={k} s={s}: {m}" for m in f]
    report(fails, total)


def test_strided_params_expanded_x_fp64_mixed():
    """Non-contiguous weight/scale/shift, an expanded (stride-0) x, fp64 x with fp32 parameters."""
    x, _, _, _ = make_inputs(2, 6, 9, 9, 3, requires_grad=True)
    wb = (torch.randn(6, 1, 3, 7) / 3)[:, :, :, 2:5].requires_grad_(True)
    sb = (torch.rand(12) * 2 + 0.5)[::2].requires_grad_(True)
    bb = torch.randn(12)[1::2].requires_grad_(True)
    assert not (wb.is_contiguous() or sb.is_contiguous() or bb.is_contiguous())
    fails = forward_failures(x.detach(), wb.detach(), sb.detach(), bb.detach(), 1, 1, 1, "relu6")
    fails += backward_failures(x, wb, sb, bb, 1, 1, 1, "relu6")
    xe = torch.randn(1, 6, 9, 9).expand(3, 6, 9, 9)
    fails += forward_failures(xe, wb.detach(), sb.detach(), bb.detach(), 2, 1, 1, "silu")
    x64, w32, s32, b32 = make_inputs(2, 6, 9, 9, 3, dtype=torch.float64, wdtype=torch.float32, requires_grad=True)
    fails += forward_failures(x64.detach(), w32.detach(), s32.detach(), b32.detach(), 1, 1, 1, "silu")
    fails += backward_failures(x64, w32, s32, b32, 1, 1, 1, "silu")
    assert not fails, fails


def test_no_grad_and_inference_mode():
    x, w, s, b = make_inputs(2, 4, 6, 6, 3, requires_grad=True)
    ref = fastdw.dwconv_bn_act(x, w, s, b).detach()
    with torch.no_grad():
        y = fastdw.dwconv_bn_act(x, w, s, b)
    assert not y.requires_grad and torch.equal(y, ref)
    with torch.inference_mode():
        y = fastdw.dwconv_bn_act(x, w, s, b)
    assert not y.requires_grad and torch.equal(y, ref)


def test_zero_channels():
    x = torch.randn(2, 0, 5, 5, requires_grad=True)
    w = torch.randn(0, 1, 3, 3, requires_grad=True)
    s = torch.rand(0, requires_grad=True)
    y = fastdw.dwconv_bn_act(x, w, s, None)
    assert y.shape == (2, 0, 5, 5)
    gx, gw, gs = torch.autograd.grad(y, (x, w, s), torch.randn(y.shape))
    assert gx.shape == x.shape and gw.shape == w.shape and gs.shape == s.shape


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ACTS)
def test_activation_kink_conventions(act, layout):
    """Pre-activations exactly on the kinks (0, 6, -3, 3) take stock PyTorch's derivative there."""
    vals = torch.tensor([0.0, 6.0, -3.0, 3.0, -0.5, 0.5, 5.5, 6.5, -3.5, 2.5, -2.5, 3.5])
    for dtype in (torch.float32, torch.float64):
        x = to_layout(vals.to(dtype).view(1, 1, 1, -1).repeat(2, 8, 3, 1), layout).requires_grad_(True)
        w = torch.ones(8, 1, 1, 1, dtype=dtype, requires_grad=True)
        go = torch.randn(2, 8, 3, vals.numel(), dtype=dtype)
        out = fastdw.dwconv_bn_act(x, w, padding=0, act=act)
        gx, gw = torch.autograd.grad(out, (x, w), go)
        x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        ref = ref_forward(x2, w2, None, None, 1, 0, 1, act, None)
        rx, rw = torch.autograd.grad(ref, (x2, w2), go)
        bad = (gx - rx).abs() > 1e-5
        assert not bad.any(), (f"{dtype_id(dtype)} {act}: dx differs where u = {x[bad].unique().tolist()}: "
                               f"fastdw dx/g = {(gx / go)[bad].unique().tolist()}, "
                               f"stock dx/g = {(rx / go)[bad].unique().tolist()}")
        assert_close_fp(out, ref, what=f"{act} y")
        assert_close_fp(gw, rw, atol_scale=reduction_scale(2 * 3 * 12) * 6, what=f"{act} dweight")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ACTS)
def test_nonfinite_propagation(act, layout):
    """NaN and +-inf go through the conv and the activation as in stock PyTorch (a NaN upstream
    must stay visible). 1x1 unit kernel: output (n, c, h, w) sees exactly x[n, c, h, w]."""
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(2, 16, 5, 5)
        x[0, 3, 2, 2], x[1, 5, 0, 4], x[0, 9, 4, 0] = float("nan"), float("inf"), -float("inf")
        x = to_layout(x.to(dtype), layout)
        w = torch.ones(16, 1, 1, 1, dtype=dtype)
        out = fastdw.dwconv_bn_act(x, w, padding=0, act=act)
        ref = ref_forward(x, w, None, None, 1, 0, 1, act, None)
        picks = lambda t: [t[0, 3, 2, 2].item(), t[1, 5, 0, 4].item(), t[0, 9, 4, 0].item()]
        for kind in ("isnan", "isposinf", "isneginf"):
            assert torch.equal(getattr(out, kind)(), getattr(ref, kind)()), (
                f"{dtype_id(dtype)} {act}: {kind} pattern differs; x = nan/+inf/-inf gives {picks(out)}, "
                f"stock {picks(ref)}")
        fin = torch.isfinite(ref)
        torch.testing.assert_close(out[fin], ref[fin], rtol=2e-3, atol=1e-3)
        # 3x3: a NaN input poisons exactly its 3x3 neighbourhood of outputs
        w3 = torch.randn(16, 1, 3, 3, dtype=dtype)
        xn = x.clone()
        xn[:, :, :, :] = torch.randn(2, 16, 5, 5, dtype=dtype)
        xn[0, 3, 2, 2] = float("nan")
        out3 = fastdw.dwconv_bn_act(xn, w3, act=act)
        ref3 = ref_forward(xn, w3, None, None, 1, 1, 1, act, None)
        assert torch.equal(out3.isnan(), ref3.isnan()), f"{dtype_id(dtype)} {act}: NaN pattern differs"


# ------------------------------------------------------------------------------------------
# Backward grid


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_backward_grid(device, dtype, layout, act):
    skip_unsupported(device, dtype)
    N, C, H, W = SHAPE
    fails = []
    for k, s, p, d in BWD_CONFIGS:
        x, w, sc, sh = make_inputs(N, C, H, W, k, dtype=dtype, device=device, layout=layout,
                                   requires_grad=True)
        fails += [f"(k={k}, s={s}, p={p}, d={d}): {m}" for m in backward_failures(x, w, sc, sh, s, p, d, act)]
    report(fails, len(BWD_CONFIGS))


SUBSETS = {"x": (0,), "weight": (1,), "scale": (2,), "x+shift": (0, 3), "nothing": (), "all": (0, 1, 2, 3)}


@pytest.mark.parametrize("raw", [False, True], ids=["public", "raw_op"])
@pytest.mark.parametrize("subset", list(SUBSETS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_requires_grad_subsets(layout, subset, raw):
    want = SUBSETS[subset]
    x, w, s, b = make_inputs(2, 6, 7, 9, 3, dtype=torch.float64, layout=layout)
    inputs = [x, w, s, b]
    for i in want:
        inputs[i].requires_grad_(True)
    fwd = (lambda *a: OP(*a, [1, 1], [1, 1], [1, 1], "hardswish")) if raw else \
        (lambda *a: fastdw.dwconv_bn_act(*a, act="hardswish"))
    y = fwd(*inputs)
    if not want:
        assert not y.requires_grad and y.grad_fn is None
        return
    assert y.requires_grad
    go = torch.randn_like(y)
    y.backward(go)
    full = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref = torch.autograd.grad(ref_forward(*full, 1, 1, 1, "hardswish", torch.float64), full, go)
    for i, (name, t) in enumerate(zip(NAMES, inputs)):
        if i in want:
            assert t.grad is not None, f"{name} requires grad but got no gradient"
            assert_close_fp(t.grad, ref[i], atol_scale=reduction_scale(2 * 7 * 9), what=name)
        else:
            assert t.grad is None, f"{name} does not require grad but got one"


# ------------------------------------------------------------------------------------------
# gradcheck (fp64, tiny shapes)

KINKS = {"none": (), "relu": (0.0,), "relu6": (0.0, 6.0), "hardswish": (-3.0, 3.0), "silu": ()}


def _kink_free_inputs(act, layout, stride, margin=1e-3, tries=200):
    """fp64 inputs whose pre-activation u stays `margin` (1000x gradcheck's eps) away from the
    activation's kinks, so finite differences never straddle one. Seeds are tried in order, so the
    choice is deterministic."""
    for i in range(tries):
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
        w = torch.randn(3, 1, 3, 3, generator=g, dtype=torch.float64) / 3
        s = torch.rand(3, generator=g, dtype=torch.float64) * 2.5 + 0.5
        b = torch.randn(3, generator=g, dtype=torch.float64) * 2
        u = ref_forward(x, w, s, b, stride, 1, 1, "none", torch.float64)
        if all((u - kink).abs().min() > margin for kink in KINKS[act]):
            x = to_layout(x, layout)
            return [t.requires_grad_(True) for t in (x, w, s, b)], u
    raise AssertionError(f"no kink-free inputs for {act} in {tries} seeds")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck(act, layout, stride):
    inputs, u = _kink_free_inputs(act, layout, stride)
    # the data reaches every branch of the activation that has one
    if act == "relu6":
        assert (u < 0).any() and ((u > 0) & (u < 6)).any()
    if act == "hardswish":
        assert (u < -3).any() and ((u > -3) & (u < 3)).any() and (u > 3).any()
    fn = lambda x, w, s, b: fastdw.dwconv_bn_act(x, w, s, b, stride=stride, padding=1, act=act)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_double_backward_unsupported():
    x, w, s, b = make_inputs(1, 3, 5, 5, 3, dtype=torch.float64, requires_grad=True)
    y = fastdw.dwconv_bn_act(x, w, s, b, act="silu")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="fastdw: double backward"):
        gx.sum().backward()


# ------------------------------------------------------------------------------------------
# Determinism


def _grads_twice(layout, dtype=torch.float32):
    x, w, s, b = make_inputs(4, 40, 33, 31, 3, dtype=dtype, layout=layout, requires_grad=True)
    go = torch.randn(4, 40, 33, 31).to(dtype)
    out = []
    for _ in range(2):
        y = fastdw.dwconv_bn_act(x, w, s, b, act="hardswish")
        out.append(torch.autograd.grad(y, (x, w, s, b), go))
    return out


def _assert_bitwise(a, b):
    for name, ga, gb in zip(NAMES, a, b):
        assert torch.equal(ga, gb), f"{name} not bitwise repeatable: max|diff| {(ga - gb).abs().max().item():.3e}"


@pytest.fixture
def deterministic_spy(monkeypatch):
    """Records the `deterministic` argument the autograd formula passes to the backward op."""
    seen = []
    real = fastdw.ops._bwd_op

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(fastdw.ops, "_bwd_op", spy)
    return seen


@pytest.mark.parametrize("dtype", [pytest.param(dt, id=dtype_id(dt)) for dt in (torch.float32, torch.float16)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic_algorithms(layout, dtype, deterministic_spy):
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = _grads_twice(layout, dtype)
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
    _assert_bitwise(a, b)
    assert deterministic_spy == [True, True]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic_env(layout, monkeypatch, deterministic_spy):
    monkeypatch.setenv("FASTDW_DETERMINISTIC", "1")
    a, b = _grads_twice(layout)
    _assert_bitwise(a, b)
    assert deterministic_spy == [True, True]


def test_not_deterministic_by_default(monkeypatch, deterministic_spy):
    monkeypatch.delenv("FASTDW_DETERMINISTIC", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    _grads_twice("contiguous")
    assert deterministic_spy == [False, False]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_raw_backward_deterministic_flag_cpu(layout):
    """On the CPU the reductions are always deterministic: the flag changes nothing."""
    x, w, s, b = make_inputs(4, 40, 33, 31, 5, layout=layout)
    go = torch.randn(4, 40, 33, 31)
    conf = _conf(1, 2, 1)
    r_true = BWD(go, x, w, s, b, *conf, "relu6", [True] * 4, True)
    r_false = BWD(go, x, w, s, b, *conf, "relu6", [True] * 4, False)
    _assert_bitwise(r_true, r_false)
    _assert_bitwise(r_true, BWD(go, x, w, s, b, *conf, "relu6", [True] * 4, True))


def test_backward_independent_of_thread_count():
    """Fixed chunking: the reductions do not depend on how many threads run them."""
    x, w, s, b = make_inputs(4, 24, 20, 20, 3, layout="channels_last")
    go = torch.randn(4, 24, 20, 20).contiguous(memory_format=torch.channels_last)
    conf = _conf(1, 1, 1)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = BWD(go, x, w, s, b, *conf, "silu", [True] * 4, False)
    finally:
        torch.set_num_threads(n)
    _assert_bitwise(one, BWD(go, x, w, s, b, *conf, "silu", [True] * 4, False))


# ------------------------------------------------------------------------------------------
# The raw backward op


@pytest.mark.parametrize("has_ss", [True, False], ids=["scale_shift", "no_scale_shift"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_raw_backward_masks(layout, has_ss):
    x, w, s, b = make_inputs(2, 5, 7, 8, 3, layout=layout, scale=has_ss, shift=has_ss)
    go = torch.randn(2, 5, 7, 8)
    conf = _conf(1, 1, 1)
    full = BWD(go, x, w, s, b, *conf, "hardswish", [True] * 4, False)
    shapes = (x.shape, w.shape, (5,) if has_ss else (0,), (5,) if has_ss else (0,))
    dtypes = (x.dtype, w.dtype, torch.float32, torch.float32)
    for name, g, shp in zip(NAMES, full, shapes):
        assert tuple(g.shape) == tuple(shp), (name, g.shape)
    for mask in itertools.product((False, True), repeat=4):
        got = BWD(go, x, w, s, b, *conf, "hardswish", list(mask), False)
        assert len(got) == 4
        for name, g, m, ref, dt in zip(NAMES, got, mask, full, dtypes):
            assert g.dtype == dt, (mask, name, g.dtype)
            if m:
                assert torch.equal(g, ref), f"mask {mask}: {name} differs from the full-mask result"
            else:
                assert tuple(g.shape) == (0,), f"mask {mask}: masked {name} has shape {tuple(g.shape)}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_raw_backward_strided_grad_out(layout):
    """grad_out with any strides (expanded from a sum, channels_last for a contiguous x, sliced)."""
    x, w, s, b = make_inputs(2, 6, 9, 7, 3, layout=layout)
    conf = _conf(2, 1, 1)
    shape = (2, 6, 5, 4)
    dense = torch.randn(shape)
    cases = {
        "expanded": (torch.ones(1).expand(shape), torch.ones(shape)),
        "expanded_channel": (torch.randn(1, 6, 1, 1).expand(shape), None),
        "channels_last": (dense.contiguous(memory_format=torch.channels_last), dense),
        "sliced": (to_layout(dense, "sliced"), dense),
        "permuted": (to_layout(dense, "permuted"), dense),
    }
    for name, (go, dense_go) in cases.items():
        dense_go = go.contiguous() if dense_go is None else dense_go
        got = BWD(go, x, w, s, b, *conf, "relu6", [True] * 4, False)
        want = BWD(dense_go, x.contiguous(), w, s, b, *conf, "relu6", [True] * 4, False)
        for n, g, r in zip(NAMES, got, want):
            assert_close_fp(g, r, atol_scale=reduction_scale(40), what=f"{name} grad_out: {n}")
    # and through autograd: y.sum() hands the backward an expanded grad_out
    xr = x.detach().requires_grad_(True)
    y = fastdw.dwconv_bn_act(xr, w, s, b, stride=2, act="relu6")
    y.sum().backward()
    want = BWD(torch.ones(shape), x.contiguous(), w, s, b, *conf, "relu6", [True, False, False, False], False)[0]
    assert_close_fp(xr.grad, want)


# ------------------------------------------------------------------------------------------
# The layout rule


@pytest.mark.parametrize("case", ["C1", "HW1", "HW1_padded", "N1_C1"])
def test_layout_rule_ambiguous(case):
    """Inputs that are both contiguous and channels_last-contiguous: contiguous wins."""
    shape, k, pad = {"C1": ((2, 1, 6, 7), 3, 1), "HW1": ((2, 5, 1, 1), 1, 0),
                     "HW1_padded": ((2, 5, 1, 1), 3, 2), "N1_C1": ((1, 1, 5, 5), 3, 1)}[case]
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(shape).contiguous(memory_format=fmt)
        assert x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        assert fastdw.output_memory_format(x) == torch.contiguous_format
        w = torch.randn(shape[1], 1, k, k)
        for out in (fastdw.dwconv_bn_act(x, w, padding=pad), OP(x, w, None, None, [1, 1], [pad, pad], [1, 1], "relu6")):
            assert out.is_contiguous(), f"{case} {fmt}: output {format_name(out)} strides {out.stride()}"
            assert out.stride() == torch.empty(out.shape).stride() or out.shape[1] == 1 or \
                out.shape[2] * out.shape[3] == 1
        # the padded case has a 3x3 output, where the two formats really differ
        assert_close_fp(OP(x, w, None, None, [1, 1], [pad, pad], [1, 1], "none"),
                        ref_forward(x, w, None, None, 1, pad, 1, "none", torch.float64))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_rule_agrees(layout):
    """fastdw.output_memory_format == the op's real output layout == the fake kernel's strides."""
    x, w, s, b = make_inputs(2, 6, 9, 7, 3, layout=layout)
    fmt = fastdw.output_memory_format(x)
    assert fmt == expected_format(x)
    assert fmt == (torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    real = OP(x, w, s, b, [1, 1], [1, 1], [1, 1], "relu6")
    public = fastdw.dwconv_bn_act(x, w, s, b)
    assert_format(real, fmt, "raw op")
    assert_format(public, fmt, "public")
    go = torch.randn(real.shape)
    dx = BWD(go, x, w, s, b, [1, 1], [1, 1], [1, 1], "relu6", [True] * 4, False)[0]
    assert_format(dx, fmt, "raw backward dx")
    with FakeTensorMode() as mode:
        fx, fw, fs, fb, fgo = (mode.from_tensor(t) for t in (x, w, s, b, go))
        fake = OP(fx, fw, fs, fb, [1, 1], [1, 1], [1, 1], "relu6")
        fdx = BWD(fgo, fx, fw, fs, fb, [1, 1], [1, 1], [1, 1], "relu6", [True] * 4, False)[0]
    assert fake.stride() == real.stride(), (fake.stride(), real.stride())
    assert fdx.stride() == dx.stride(), (fdx.stride(), dx.stride())
