"""The Triton backend (fastdw/triton/dwconv_bn_act.py) against the reference.

On a GPU: the full numerics grid of test_dwconv_bn_act.py (every dtype, layout, activation and
conv config) with backend="triton", opcheck of the triton_ops, and torch.compile of a converted
MobileNetV2. On a CPU-only machine the same kernels run through the Triton interpreter
(TRITON_INTERPRET=1, set by conftest.py before fastdw.triton is imported): it costs tens of ms
per program instance, so the shapes are tiny (one or a few programs per launch) and the grid is a
subset chosen to still reach every activation, both kernels' layouts, every dtype, k = 3/5/7,
stride 2, dilation, multi-split reductions and masked gradients.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastdw
import fastdw.ops
from conftest import (
    ACTS,
    HAS_CUDA,
    LAYOUTS,
    assert_close_fp,
    dtype_id,
    make_inputs,
    reduction_scale,
    ref_forward,
    report,
    skip_unsupported,
    to_layout,
)
from test_dwconv_bn_act import BWD_CONFIGS, FWD_CONFIGS, NAMES, SHAPE, backward_failures, forward_failures

T = fastdw.ops._triton_module()

pytestmark = pytest.mark.skipif(T is None, reason=f"Triton kernels not importable "
                                                  f"({fastdw.ops._TRITON_IMPORT_ERROR})")

GPU_DTYPES = [pytest.param(dt, id=dtype_id(dt)) for dt in (torch.float32, torch.float16, torch.bfloat16)]
requires_gpu = pytest.mark.skipif(not HAS_CUDA or (T is not None and T.INTERPRET),
                                  reason="needs a CUDA device (and TRITON_INTERPRET unset)")
requires_interp = pytest.mark.skipif(T is None or not T.INTERPRET,
                                     reason="CPU tensors run through the Triton interpreter only "
                                            "(TRITON_INTERPRET=1; set by conftest.py without a GPU)")
DEVICES = [pytest.param("cpu", id="interp", marks=requires_interp),
           pytest.param("cuda", id="cuda", marks=[requires_gpu, pytest.mark.gpu])]

OP = torch.ops.fastdw.dwconv_bn_act_triton.default if T is not None else None
BWD = torch.ops.fastdw._dwconv_bn_act_backward_triton.default if T is not None else None


def _fwd(*a, **k):
    return fastdw.dwconv_bn_act(*a, **k, backend="triton")


# ------------------------------------------------------------------------------------------
# GPU: the full numerics grid


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@requires_gpu
@pytest.mark.gpu
def test_forward_grid_gpu(dtype, layout, act):
    skip_unsupported("cuda", dtype)
    N, C, H, W = SHAPE
    fails = []
    for k, s, p, d in FWD_CONFIGS:
        x, w, sc, sh = make_inputs(N, C, H, W, k, dtype=dtype, device="cuda", layout=layout)
        fails += [f"(k={k}, s={s}, p={p}, d={d}): {m}"
                  for m in forward_failures(x, w, sc, sh, s, p, d, act, backend="triton", raw_op=OP)]
    report(fails, len(FWD_CONFIGS))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@requires_gpu
@pytest.mark.gpu
def test_backward_grid_gpu(dtype, layout, act):
    skip_unsupported("cuda", dtype)
    N, C, H, W = SHAPE
    fails = []
    for k, s, p, d in BWD_CONFIGS:
        x, w, sc, sh = make_inputs(N, C, H, W, k, dtype=dtype, device="cuda", layout=layout, requires_grad=True)
        fails += [f"(k={k}, s={s}, p={p}, d={d}): {m}"
                  for m in backward_failures(x, w, sc, sh, s, p, d, act, backend="triton")]
    report(fails, len(BWD_CONFIGS))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("C", [32, 96, 144, 960])
def test_real_layer_shapes_gpu(C):
    """MobileNetV2-like channel counts with big planes: many tiles, several splits per channel
    block, every channel block width of the configs."""
    for dtype in (torch.float16, torch.float32):
        x, w, sc, sh = make_inputs(8, C, 28, 28, 3, dtype=dtype, device="cuda", layout="channels_last",
                                   requires_grad=True)
        fails = forward_failures(x.detach(), w.detach(), sc.detach(), sh.detach(), 1, 1, 1, "relu6",
                                 backend="triton", raw_op=OP)
        fails += backward_failures(x, w, sc, sh, 2, 1, 1, "relu6", backend="triton")
        assert not fails, f"{dtype_id(dtype)}: {fails}"


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_every_config_gpu(layout, monkeypatch):
    """Each tile config of the autotune lists, pinned in turn (gpu_check.sh runs the suite with
    FASTDW_TRITON_AUTOTUNE=0, i.e. the first config only): the forward's 3x3 list and every band
    kernel's list of this layout (the i-th config of each, cycled), forward, backward at stride 1
    (dx by rows) and 2 (dx by parity, dweight in the gu pass), on shapes with partial tiles and
    channel blocks: 72 channels (8-column bands for channels_last) and 24 (32-column bands)."""
    cl = layout == "channels_last"
    fwd_key = T._fwd_table_key(cl, 9)
    band_keys = [key for key in T._BAND_KEYS if key[0] == cl]
    lists = {(id(T._FWD), fwd_key): (T._FWD, T._dwconv_fwd_kernel, T._FWD_CONFIGS[fwd_key])}
    for table, kernel in ((T._BWD_GU, T._dwconv_bwd_gu_kernel), (T._BWD_DX_ROWS, T._dwconv_bwd_dx_rows_kernel),
                          (T._BWD_DX_S2, T._dwconv_bwd_dx_s2_kernel)):
        for key in band_keys:
            lists[(id(table), key)] = (table, kernel, T._band_configs(key, every=True))
    rounds = max(len(cfgs) for _, _, cfgs in lists.values())
    assert rounds > 1
    fails = []
    for i in range(rounds):
        for (_, key), (table, kernel, cfgs) in lists.items():
            pinned = T._autotune(kernel, [cfgs[i % len(cfgs)]])
            monkeypatch.setitem(table, key, pinned)
            if T._PINNED[id(table)] is not table:
                monkeypatch.setitem(T._PINNED[id(table)], key, pinned)
        for dtype, C in ((torch.float16, 72), (torch.float32, 72), (torch.float16, 24)):
            x, w, sc, sh = make_inputs(3, C, 19, 37, 3, dtype=dtype, device="cuda", layout=layout,
                                       requires_grad=True)
            f = forward_failures(x.detach(), w.detach(), sc.detach(), sh.detach(), 1, 1, 1, "hardswish",
                                 backend="triton", raw_op=OP)
            for s in (1, 2):
                f += backward_failures(x, w, sc, sh, s, 1, 1, "hardswish", backend="triton")
            fails += [f"round {i} {dtype_id(dtype)} C={C}: {m}" for m in f]
    assert not fails, fails


# ------------------------------------------------------------------------------------------
# CPU (interpreter): a covering subset at tiny shapes

# (k, stride, padding, dilation), cycled through the cases so each appears with several acts
INTERP_CONFIGS = [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 0, 1), (5, 2, 2, 1), (7, 1, 3, 2), ((3, 5), (2, 1), (1, 2), 1)]
INTERP_SHAPE = (1, 5, 7, 8)  # C = 5: masked channel lanes; one program per launch (channels_last)


@requires_interp
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_forward_interp(dtype, layout, act):
    N, C, H, W = INTERP_SHAPE
    i = ACTS.index(act) + 2 * ["contiguous", "channels_last", "sliced"].index(layout)
    k, s, p, d = INTERP_CONFIGS[i % len(INTERP_CONFIGS)]
    x, w, sc, sh = make_inputs(N, C, H, W, k, dtype=dtype, layout=layout)
    # the raw op gets the sliced window as is (strided loads); the public function makes it dense
    fails = forward_failures(x, w, sc, sh, s, p, d, act, backend="triton", raw_op=OP,
                             raw=layout != "contiguous")
    assert not fails, f"(k={k}, s={s}, p={p}, d={d}): {fails}"


INTERP_BWD = ([(torch.float32, layout, act, INTERP_CONFIGS[(j + i) % 3])
               for j, layout in enumerate(("contiguous", "channels_last")) for i, act in enumerate(ACTS)]
              + [(dt, layout, "hardswish", (3, 2, 1, 1)) for dt in (torch.float16, torch.bfloat16)
                 for layout in ("contiguous", "channels_last")]
              + [(torch.float32, layout, "relu6", cfg) for layout in ("contiguous", "channels_last")
                 for cfg in ((5, 2, 2, 1), (7, 1, 3, 2), ((3, 5), (2, 1), (1, 2), 1))]
              # stride 2 by parity: a 1x1 kernel (odd rows and columns get no tap), an even kernel
              + [(torch.float32, layout, "silu", cfg) for layout in ("contiguous", "channels_last")
                 for cfg in ((1, 2, 0, 1), (2, 2, 1, 1), ((4, 3), 2, (2, 0), 1))])


@requires_interp
@pytest.mark.parametrize("dtype,layout,act,cfg", INTERP_BWD,
                         ids=[f"{dtype_id(d)}-{l}-{a}-k{c[0]}s{c[1]}" for d, l, a, c in INTERP_BWD])
def test_backward_interp(dtype, layout, act, cfg):
    N, C, H, W = INTERP_SHAPE
    k, s, p, d = cfg
    x, w, sc, sh = make_inputs(N, C, H, W, k, dtype=dtype, layout=layout, requires_grad=True)
    fails = backward_failures(x, w, sc, sh, s, p, d, act, backend="triton")
    assert not fails, fails


# (k, stride, padding, dilation, activation): every forward path (streamed rows at stride 1, the
# direct taps at stride 2 or with row dilation), each tap-count class, a rectangular kernel
BANDS_CASES = [(3, 1, 1, 1, "relu6"), (3, 2, 1, 1, "hardswish"), (5, 1, 2, 1, "silu"), (7, 1, 3, 1, "relu"),
               (3, 1, 2, 2, "none"), ((5, 3), (1, 2), (2, 1), 1, "relu6")]


def _interior_tiles(cfg, OW, W, C, k, s, p, d):
    """Column tiles of the interpreter's forward config whose taps all lie inside the image, with a
    full channel block (the kernel's unmasked path), and the column tiles and bands of a launch."""
    BW, BC = cfg.kwargs["BLOCK_W"], cfg.kwargs["BLOCK_C"]
    kw = k if isinstance(k, int) else k[1]
    sw = s if isinstance(s, int) else s[1]
    pw = p if isinstance(p, int) else p[1]
    dw = d if isinstance(d, int) else d[1]
    inside = [t for t in range(-(-OW // BW)) if t * BW * sw - pw >= 0 and (t * BW + BW - 1) * sw - pw + (kw - 1) * dw < W
              and t * BW + BW <= OW]
    return inside, -(-OW // BW), C >= BC


@requires_interp
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", BANDS_CASES, ids=[f"k{c[0]}s{c[1]}p{c[2]}d{c[3]}-{c[4]}" for c in BANDS_CASES])
def test_forward_bands_interp(layout, case):
    """The forward's row bands: several bands and a partial last one, interior column tiles (the
    unmasked loads) beside border ones, a full and a partial channel block, for each path."""
    k, s, p, d, act = case
    cl = layout == "channels_last"
    kh, kw = (k, k) if isinstance(k, int) else k
    sw = s if isinstance(s, int) else s[1]
    N, C, H, W = (1, 20, 19, 40) if cl else (1, 6, 19, 40 if sw == 1 else 72)
    x, w, sc, sh = make_inputs(N, C, H, W, k, layout=layout)
    cfg = T._fwd_configs(T._fwd_table_key(cl, kh * kw))[0]
    y = _fwd(x, w, sc, sh, stride=s, padding=p, dilation=d, act=act)
    inside, tiles, full_cb = _interior_tiles(cfg, y.shape[3], W, C, k, s, p, d)
    bands = -(-y.shape[2] // cfg.kwargs["BLOCK_H"])
    assert inside and tiles > len(inside) and full_cb and C % cfg.kwargs["BLOCK_C"], (inside, tiles, cfg)
    assert bands >= 2 and y.shape[2] % cfg.kwargs["BLOCK_H"], (bands, cfg)
    fails = forward_failures(x, w, sc, sh, s, p, d, act, backend="triton", raw_op=OP)
    assert not fails, fails


BWD_BANDS_CASES = [(3, 1, 1, 1, "relu6"), (5, 1, 2, 1, "silu"), (3, 2, 1, 1, "hardswish"), (3, 1, 2, 2, "relu")]


@requires_interp
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", BWD_BANDS_CASES, ids=[f"k{c[0]}s{c[1]}p{c[2]}d{c[3]}-{c[4]}" for c in BWD_BANDS_CASES])
def test_backward_bands_interp(layout, case):
    """The backward's band kernels (gu; dx and dweight at stride 1): several bands and a partial
    last one, interior column tiles (the unmasked loops) beside border ones, a full and a partial
    channel block; stride 2 and dilation take the direct gu rows and the gathering dx kernel."""
    k, s, p, d, act = case
    cl = layout == "channels_last"
    # channels_last: 20 channels take 32-column bands (W 70: a border, an interior, a partial tile)
    N, C, H, W = (1, 20, 19, 70 if s == 1 else 140) if cl else (1, 10, 19, 40 if s == 1 else 72)
    x, w, sc, sh = make_inputs(N, C, H, W, k, layout=layout, requires_grad=True)
    kk = {"N": N, "C": C, "cl": cl}
    OH = (H + 2 * p - d * (k - 1) - 1) // s + 1
    OW = (W + 2 * p - d * (k - 1) - 1) // s + 1
    for rows, cols, P, S in ((OH, OW, p, s), (H, W, k - 1 - p, 1)):  # the gu grid, then the dx grid
        band, bw, tiles = T._band_plan(x, kk, rows, cols)
        cfg = T._band_configs((cl, bw, T._fwd_table_key(cl, k * k)[1]))[0]
        bc = cfg.kwargs["BLOCK_C"]
        src_w = W if S == s and (rows, cols) == (OH, OW) else OW  # the tapped plane's width
        inside = [t for t in range(-(-cols // bw)) if t * bw * S - P >= 0 and (t * bw + bw - 1) * S - P + (k - 1) * d
                  < src_w and t * bw + bw <= cols]
        assert inside and len(inside) < -(-cols // bw) and C >= bc and C % bc, (rows, cols, bw, bc, inside)
        assert -(-rows // band) >= 2 and rows % band, (rows, band)
    fails = backward_failures(x, w, sc, sh, s, p, d, act, backend="triton")
    assert not fails, fails


@requires_interp
@pytest.mark.parametrize("C", [20, 40, 66])
def test_backward_band_width_by_channels_interp(C):
    """channels_last bands are 32 columns wide for C <= 32, 16 for C <= 64, 8 above (the channel
    block fills the tile either way), capped by the plane's width; each width gives the
    reference's gradients at stride 1 and 2."""
    x, w, sc, sh = make_inputs(1, C, 9, 17, 3, layout="channels_last", requires_grad=True)
    kk = {"N": 1, "C": C, "cl": True}
    want = 32 if C <= 32 else 16 if C <= 64 else 8
    assert T._band_plan(x, kk, 9, 40)[1] == want
    assert T._band_plan(x, kk, 9, 7)[1] == 8  # a 7-wide plane: 8 columns whatever C
    for s in (1, 2):
        fails = backward_failures(x, w, sc, sh, s, 1, 1, "relu6", backend="triton")
        assert not fails, (s, fails)


@requires_interp
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_splits_tiles_channel_blocks_interp(layout):
    """Several tiles per split, two splits, several channel blocks (channels_last), a partial
    last tile: the reduction bookkeeping of the backward kernels."""
    N, C, H, W = (2, 20, 10, 9) if layout == "channels_last" else (2, 2, 18, 17)
    x, w, sc, sh = make_inputs(N, C, H, W, 3, layout=layout, requires_grad=True)
    assert T._num_splits(x, N * H * W, 1) == 2
    fails = forward_failures(x.detach(), w.detach(), sc.detach(), sh.detach(), 1, 1, 1, "silu",
                             backend="triton", raw_op=OP)
    fails += backward_failures(x, w, sc, sh, 1, 1, 1, "silu", backend="triton")
    assert not fails, fails


# ------------------------------------------------------------------------------------------
# Both: masks, determinism, empty inputs, errors, opcheck, compile


def _small(device):
    return (2, 6, 7, 9) if device == "cuda" else (1, 4, 5, 6)


SUBSETS = {"x": (0,), "weight": (1,), "scale": (2,), "x+shift": (0, 3), "all": (0, 1, 2, 3)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("subset", list(SUBSETS))
def test_requires_grad_subsets(device, subset):
    want = SUBSETS[subset]
    N, C, H, W = _small(device)
    x, w, s, b = make_inputs(N, C, H, W, 3, device=device, layout="channels_last")
    inputs = [x, w, s, b]
    for i in want:
        inputs[i].requires_grad_(True)
    y = _fwd(*inputs, act="hardswish")
    go = torch.randn_like(y)
    y.backward(go)
    full = [t.detach().double().requires_grad_(True) for t in inputs]
    ref = torch.autograd.grad(ref_forward(*full, 1, 1, 1, "hardswish", torch.float64), full, go.double())
    for i, (name, t) in enumerate(zip(NAMES, inputs)):
        if i in want:
            assert t.grad is not None, f"{name} requires grad but got no gradient"
            assert_close_fp(t.grad, ref[i], atol_scale=reduction_scale(N * H * W), what=name)
        else:
            assert t.grad is None, f"{name} does not require grad but got one"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_ss", [True, False])
def test_raw_backward_masks(device, has_ss):
    N, C, H, W = _small(device)
    x, w, s, b = make_inputs(N, C, H, W, 3, device=device, scale=has_ss, shift=has_ss)
    go = torch.randn(N, C, H, W, device=device)
    full = BWD(go, x, w, s, b, [1, 1], [1, 1], [1, 1], "relu", [True, True, True, True], False)
    for mask in ([True, False, False, False], [False, True, False, False], [False, False, True, True]):
        got = BWD(go, x, w, s, b, [1, 1], [1, 1], [1, 1], "relu", mask, False)
        for name, m, g, f, like in zip(NAMES, mask, got, full, (x, w, s, b)):
            exists = m and (like is not None)
            if exists:
                assert torch.equal(g, f), f"{name} with mask {mask} differs from the full backward"
            else:
                assert g.shape == (0,), f"{name}: not requested (mask {mask}) but shape {tuple(g.shape)}"
            dt = like.dtype if like is not None else torch.float32
            assert g.dtype == dt, f"{name}: dtype {g.dtype} != {dt}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_fp32_weight_lowp_x(device, dtype):
    """Autocast's case: x in fp16/bf16, weight and scale/shift in fp32; gradients keep each
    input's dtype."""
    N, C, H, W = _small(device)
    x, w, s, b = make_inputs(N, C, H, W, 3, dtype=dtype, device=device, layout="channels_last",
                             wdtype=torch.float32, requires_grad=True)
    fails = forward_failures(x.detach(), w.detach(), s.detach(), b.detach(), 1, 1, 1, "relu6",
                             backend="triton", raw_op=OP)
    fails += backward_failures(x, w, s, b, 1, 1, 1, "relu6", backend="triton")
    assert not fails, fails


def _views(C, device, kind, fill):
    """A (C,) parameter that is not dense: every other element of a longer buffer, or one value
    expanded (stride 0); returned with its dense clone and the leaf gradients flow to."""
    if kind == "strided":
        leaf = fill(2 * C + 1).to(device).requires_grad_(True)
        view = leaf[1::2]
    else:
        leaf = fill(1).to(device).requires_grad_(True)
        view = leaf.expand(C)
    dense = view.detach().clone().requires_grad_(True)
    return leaf, view, dense


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["strided", "expanded"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_noncontiguous_parameters(device, kind, layout):
    """scale / shift / bias / gamma / beta as strided or expanded (stride-0) views, and the weight
    as a prepacked view: the same bits as dense copies, forward and every gradient, inference
    and training ops (these views were once read as if dense)."""
    torch.manual_seed(3)
    N, C, H, W = _small(device)
    x = to_layout(torch.randn(N, C, H, W, device=device), layout).requires_grad_(True)
    w = (torch.randn(C, 1, 3, 3, device=device) / 3).requires_grad_(True)
    gy = torch.randn(N, C, H, W, device=device)
    pos = lambda n: torch.rand(n) * 2 + 0.5  # noqa: E731
    neg = lambda n: torch.randn(n)  # noqa: E731

    # inference op: scale, shift
    (sl, sv, sd), (bl, bv, bd) = _views(C, device, kind, pos), _views(C, device, kind, neg)
    y = _fwd(x, w, sv, bv, act="hardswish")
    yd = _fwd(x, w, sd, bd, act="hardswish")
    assert torch.equal(y, yd)
    g = torch.autograd.grad(y, [x, w, sl, bl], gy)
    gd = torch.autograd.grad(yd, [x, w, sd, bd], gy)
    assert torch.equal(g[0], gd[0]) and torch.equal(g[1], gd[1])
    # the leaf's gradient is the view's, scattered (strided) or summed (expanded)
    for leaf_g, dense_g in ((g[2], gd[2]), (g[3], gd[3])):
        want = torch.zeros_like(leaf_g)
        if kind == "strided":
            want[1::2] = dense_g
        else:
            want[0] = dense_g.sum()
        torch.testing.assert_close(leaf_g, want, rtol=1e-6, atol=1e-6)
    # a prepacked weight (a (C, 1, 3, 3) view with strides (1, *, 3C, C)) with dense scale / shift
    pw, ps, pb = fastdw.prepack_params(w.detach(), sd.detach(), bd.detach())
    assert torch.equal(_fwd(x.detach(), pw, ps, pb, act="hardswish"), yd.detach())

    # training op: bias, gamma, beta
    (bil, biv, bid), (gl, gv, gd_), (bel, bev, bed) = (_views(C, device, kind, neg), _views(C, device, kind, pos),
                                                       _views(C, device, kind, neg))
    out = fastdw.dwconv_bn_act_train(x, w, biv, gv, bev, act="silu", backend="triton")
    outd = fastdw.dwconv_bn_act_train(x, w, bid, gd_, bed, act="silu", backend="triton")
    for a, b in zip(out, outd):
        assert torch.equal(a, b)
    loss = lambda o: (o[0] * gy).sum() + o[1].sum() * 0.5 + o[2].sum() * 0.25  # noqa: E731
    g = torch.autograd.grad(loss(out), [x, w, biv, gv, bev])
    gd = torch.autograd.grad(loss(outd), [x, w, bid, gd_, bed])
    for a, b in zip(g, gd):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic(device):
    N, C, H, W = (4, 40, 33, 31) if device == "cuda" else (2, 20, 9, 10)
    x, w, s, b = make_inputs(N, C, H, W, 3, device=device, layout="channels_last")
    go = torch.randn(N, C, H, W, device=device)
    runs = [BWD(go, x, w, s, b, [1, 1], [1, 1], [1, 1], "relu6", [True] * 4, det) for det in (True, False, True)]
    for r in runs[1:]:
        for name, a, c in zip(NAMES, runs[0], r):
            assert torch.equal(a, c), f"{name} differs between runs"


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    for N, C in ((0, 4), (2, 0)):
        x, w, s, b = make_inputs(N, C, 5, 6, 3, device=device, requires_grad=True)
        y = _fwd(x, w, s, b, act="relu6")
        assert y.shape == (N, C, 5, 6)
        y.sum().backward()
        assert x.grad.shape == x.shape and torch.all(w.grad == 0) and torch.all(s.grad == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device, monkeypatch):
    x, w, s, b = make_inputs(1, 4, 5, 5, 3, device=device)
    with pytest.raises(TypeError, match="Triton backend takes float32, float16 or bfloat16"):
        OP(x.double(), w.double(), None, None, [1, 1], [1, 1], [1, 1], "relu")
    with pytest.raises(ValueError, match=r"weight must be \(C, 1, kH, kW\) with C == x.size\(1\)"):
        _fwd(x, w[:3], act="relu")
    with pytest.raises(ValueError, match="act must be one of"):
        OP(x, w, s, b, [1, 1], [1, 1], [1, 1], "gelu")
    with pytest.raises(ValueError, match="kernel larger than the padded input"):
        _fwd(x[:, :, :1, :1], w, padding=0)
    # int32 offsets inside an image (checked on metadata: meta tensors, nothing allocated)
    big = torch.empty_strided((1, 4, 5, 5), (0, 2 ** 30, 5, 1), dtype=torch.float16, device="meta")
    wm, sm = w.half().to("meta"), s.to("meta")
    with pytest.raises(ValueError, match="spans .* elements per image"):
        T.dwconv_bn_act_fwd(big, wm, sm, sm, [1, 1], [1, 1], [1, 1], "relu")
    go = torch.empty_strided((1, 4, 5, 5), (0, 25, 2 ** 29, 1), dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="spans .* elements per image"):
        T.dwconv_bn_act_bwd(go, big.contiguous(), wm, sm, sm, [1, 1], [1, 1], [1, 1], "relu", [True] * 4, False)
    huge = torch.empty((1, 1024, 1024, 2048), dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match=r"C\*H\*W and C\*OH\*OW < 2\*\*31"):
        T.dwconv_bn_act_fwd(huge, torch.empty(1024, 1, 3, 3, device="meta"), None, None, [1, 1], [1, 1], [1, 1],
                            "relu")
    if device == "cpu":
        monkeypatch.setattr(T, "INTERPRET", False)
        with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
            _fwd(x, w)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    from conftest import opcheck_samples

    samples = list(opcheck_samples(device=device))
    if device == "cpu":  # interpreter: a few samples (opcheck runs each about ten times)
        keep = ("fp32-contiguous-grad-ss-k3x3", "fp32-channels_last-grad-noss-k3x5", "fp32-sliced-nograd-ss-k3x3")
        samples = [sm for sm in samples if sm[0].startswith(keep)]
        assert len(samples) == 3, [sid for sid, _ in samples]
    for sid, args in samples:
        torch.library.opcheck(OP, args, test_utils=("test_schema", "test_autograd_registration",
                                                    "test_faketensor", "test_aot_dispatch_dynamic"))
    x, w, s, b = args[:4]
    y = OP(*[t.detach() if isinstance(t, torch.Tensor) else t for t in args])
    g = torch.randn_like(y)
    torch.library.opcheck(BWD, (g, x.detach(), w.detach(), s.detach() if s is not None else None,
                                b.detach() if b is not None else None, *args[4:], [True, True, True, True], True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("device", DEVICES)
def test_compile_converted_block(device, train):
    """torch.compile(fullgraph=True) of a converted InvertedResidual on the Triton backend: equal
    to eager, forward and backward (on a GPU Inductor schedules the Triton kernels; under the
    interpreter the op is opaque). train: the training op, and the running statistics advance
    the same under compile."""
    tv = pytest.importorskip("torchvision")
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    blk = InvertedResidual(8, 8, stride=1, expand_ratio=2).to(device).eval()
    for m in blk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    blk.train(train)
    fused = fastdw.convert(copy.deepcopy(blk), backend="triton")
    assert sum(isinstance(m, fastdw.DWConvBNAct2d) for m in fused.modules()) == 1
    x = torch.randn(2, 8, 6, 6, device=device).to(memory_format=torch.channels_last)
    del tv
    compiled_copy = copy.deepcopy(fused)  # each copy sees x once: the same running statistics after
    ref = blk(x)
    eager = fused(x)
    comp = torch.compile(compiled_copy, fullgraph=True)
    out = comp(x)
    if train:
        for (n, b_e), (_, b_c) in zip(fused.named_buffers(), compiled_copy.named_buffers()):
            if b_e.is_floating_point():
                torch.testing.assert_close(b_c, b_e, rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(eager, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    comp(xg).square().sum().backward()
    xe = x.clone().requires_grad_(True)
    fused(xe).square().sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad, rtol=1e-4, atol=1e-4)


@requires_gpu
@pytest.mark.gpu
def test_compile_mobilenet_v2_gpu():
    """A converted MobileNetV2 on the Triton backend under torch.compile(fullgraph=True) equals
    eager (fp16, channels_last, eval), and the compiled graph calls the Triton kernels."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.mobilenet_v2().cuda().eval().half().to(memory_format=torch.channels_last)
    fastdw.convert(model, backend="triton")
    x = torch.randn(8, 3, 224, 224, device="cuda").half().to(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        comp = torch.compile(model, fullgraph=True)
        out = comp(x)
    torch.testing.assert_close(out.float(), eager.float(), rtol=2e-2, atol=2e-2)
    assert (out.float().argmax(1) == eager.float().argmax(1)).float().mean() >= 0.99


def test_kernels_compile_for_sm80_sm90():
    """The GPU compiler is stricter than the interpreter: compile the kernels of a channels_last
    fp16 and an NCHW fp32 call (first config each) for sm_80 and sm_90 through Triton's own ptxas,
    without a GPU, and fail on compile errors or register spills."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton has no NVIDIA backend (ptxas)")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = subprocess.run([sys.executable, str(root / "scripts" / "triton_compile_check.py"), "--smoke"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    # per call and arch: forward, gu, dx (inference); statistics, centred forward, gu sums, gu dz
    # (training; its dx is the inference one)
    assert "0 failures" in r.stdout and "40 kernel variants compiled" in r.stdout, r.stdout[-2000:]


# ------------------------------------------------------------------------------------------
# Host side: memoized checks, the direct eager path, config pinning, the device guard


class _Recorder:
    """Stands in for T._launch: records which kernel object each launch used and runs it."""

    def __init__(self, orig):
        self.orig, self.kernels = orig, []

    def __call__(self, kernel):
        self.kernels.append(kernel)
        return self.orig(kernel)


@pytest.mark.parametrize("device", DEVICES)
def test_checks_memoized(device, monkeypatch):
    """A repeated call with the same argument metadata skips the ~40 argument checks; a new shape,
    dtype or layout checks again; a call that fails its checks fails every time (never memoized)."""
    calls = []
    real = T.check_args

    def counting(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(T, "check_args", counting)
    monkeypatch.setattr(T, "_MEMO", {})
    x, w, s, b = make_inputs(1, 4, 6, 5, 3, device=device, layout="channels_last")
    y0 = T.dwconv_bn_act_fwd(x, w, s, b, [1, 1], [1, 1], [1, 1], "relu6")
    for _ in range(3):
        assert torch.equal(T.dwconv_bn_act_fwd(x, w, s, b, [1, 1], [1, 1], [1, 1], "relu6"), y0)
    assert len(calls) == 1
    x2 = x.contiguous()  # new strides: checked again, same numbers
    torch.testing.assert_close(T.dwconv_bn_act_fwd(x2, w, s, b, [1, 1], [1, 1], [1, 1], "relu6"), y0)
    T.dwconv_bn_act_fwd(x, w, s, b, [2, 2], [1, 1], [1, 1], "relu6")  # new stride argument
    assert len(calls) == 3
    for _ in range(2):
        with pytest.raises(ValueError, match="act must be one of"):
            T.dwconv_bn_act_fwd(x, w, s, b, [1, 1], [1, 1], [1, 1], "gelu")
        with pytest.raises(ValueError, match=r"must be a 1-D tensor of C = 4"):
            T.dwconv_bn_act_fwd(x, w, s[:3], b, [1, 1], [1, 1], [1, 1], "relu6")
    assert len(calls) == 7
    g = torch.randn_like(y0)
    for _ in range(2):
        with pytest.raises(ValueError, match="grad_out must have the output's shape"):
            T.dwconv_bn_act_bwd(g[:, :, :3], x, w, s, b, [1, 1], [1, 1], [1, 1], "relu6", [True] * 4, False)
        with pytest.raises(ValueError, match="grad_out must be on x's device"):
            T.dwconv_bn_act_bwd(g.to("meta"), x, w, s, b, [1, 1], [1, 1], [1, 1], "relu6", [True] * 4, False)


@requires_interp
def test_eager_direct_path(monkeypatch):
    """The public function skips the op dispatch exactly when nothing needs the op (tracing, a
    mode, a transform, the profiler): the launcher alone without an autograd graph, through an
    autograd.Function with one; same bits and gradients as the op, and the op's refusal of a
    double backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x, w, s, b = make_inputs(1, 4, 6, 5, 3, device="cpu", layout="channels_last")
    direct = fastdw.ops._eager_direct
    assert direct(x, w, s, b) == 1 and direct(x, w, None, None) == 1
    assert direct(x.clone().requires_grad_(), w, s, b) == 2
    with torch.no_grad():
        assert direct(x.clone().requires_grad_(), w, s, b) == 1
    leaf = x.clone().requires_grad_()
    with torch.inference_mode(), torch.enable_grad():  # no graph in inference mode, as for the op
        assert direct(leaf, w, s, b) == 1
        assert _fwd(leaf, w, s, b).grad_fn is None
    assert direct(x, torch.nn.Parameter(w), s, b) == 2  # a weight that wants a gradient
    assert direct(x.to("meta"), w.to("meta"), None, None) == 0

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert direct(x, w, s, b) == 0
    with torch.profiler.profile():
        assert direct(x, w, s, b) == 0
    assert torch.func.vmap(lambda xx: torch.tensor(direct(xx, w, s, b)))(x[None]).item() == 0

    ran = []
    real = T.dwconv_bn_act_fwd
    monkeypatch.setattr(T, "dwconv_bn_act_fwd", lambda *a: ran.append(1) or real(*a))
    y_direct = _fwd(x, w, s, b, act="hardswish")
    assert ran == [1] and y_direct.grad_fn is None
    assert torch.equal(y_direct, OP(x, w, s, b, [1, 1], [1, 1], [1, 1], "hardswish"))

    leaves = [t.clone().requires_grad_() for t in (x, w, s, b)]
    y = _fwd(*leaves, act="hardswish")
    assert ran == [1, 1] and type(y.grad_fn).__name__.startswith("_TritonEager")
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, gy)
    leaves_op = [t.clone().requires_grad_() for t in (x, w, s, b)]
    y_op = OP(*leaves_op, [1, 1], [1, 1], [1, 1], "hardswish")
    assert torch.equal(y, y_op)
    for name, a, c in zip(NAMES, grads, torch.autograd.grad(y_op, leaves_op, gy)):
        assert torch.equal(a, c), name
    # only x wants a gradient: the others come back None, as through the op
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(_fwd(xg, w, s, b, act="hardswish"), [xg], gy)
    torch.testing.assert_close(gx, grads[0], rtol=0, atol=0)
    (gx,) = torch.autograd.grad(_fwd(xg, w, s, b, act="hardswish").square().sum(), [xg], create_graph=True)
    with pytest.raises(RuntimeError, match="fastdw: double backward"):
        gx.sum().backward()
    # a mode that starts after the forward sees the backward op (the backward re-checks)
    seen = []

    class Names(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    y = _fwd(xg, w, s, b, act="hardswish")
    with Names():
        (gx2,) = torch.autograd.grad(y, [xg], gy)
    assert "fastdw._dwconv_bn_act_backward_triton.default" in seen, seen[:20]
    assert torch.equal(gx2, grads[0])


def _fake_tables(monkeypatch):
    """Give every kernel table a distinct pinned table (as on a GPU with autotuning on): returns
    {table name: (tuned, pinned)}. Both launch the same kernel here (one config under the
    interpreter); what the test sees is which object the launcher chose."""
    out = {}
    pinned_all = dict(T._PINNED)
    for name in ("_FWD", "_BWD_GU", "_BWD_DX_ROWS", "_BWD_DX_S2", "_BWD_DX", "_TRAIN_STATS"):
        tuned = getattr(T, name)
        pinned = {cl: T._autotune(k.fn, k.configs[:1]) for cl, k in tuned.items()}
        pinned_all[id(tuned)] = pinned
        out[name] = (tuned, pinned)
    monkeypatch.setattr(T, "_PINNED", pinned_all)
    monkeypatch.setattr(T, "_TUNED_KEYS", set())
    return out


@requires_interp
def test_config_pinning(monkeypatch):
    """Deterministic mode launches the pinned config of every kernel; a key not yet tuned inside a
    CUDA-graph capture takes the pinned config, one tuned before the capture keeps the tuned one;
    the batch size is part of the autotune key."""
    tables = _fake_tables(monkeypatch)
    pinned_ids = {id(k) for _, p in tables.values() for k in p.values()}
    tuned_ids = {id(k) for t, _ in tables.values() for k in t.values()}
    rec = _Recorder(T._launch)
    monkeypatch.setattr(T, "_launch", rec)
    x, w, s, b = make_inputs(1, 4, 6, 5, 3, device="cpu", layout="channels_last")
    g = torch.randn(1, 4, 6, 5).to(memory_format=torch.channels_last)

    def launched(fn):
        """The autotuned kernels fn launched (the finish kernels have no configs to pin)."""
        rec.kernels.clear()
        fn()
        return {id(k) for k in rec.kernels if hasattr(k, "configs")}

    def bwd(det):
        return lambda: T.dwconv_bn_act_bwd(g, x, w, s, b, [1, 1], [1, 1], [1, 1], "relu6", [True] * 4, det)

    def train_fwd():
        return T.dwconv_bn_act_train_fwd(x, w, None, s, b, [1, 1], [1, 1], [1, 1], 1e-5, "relu6")

    assert launched(bwd(True)) <= pinned_ids and len(launched(bwd(True))) == 2
    assert launched(bwd(False)) <= tuned_ids
    torch.use_deterministic_algorithms(True)
    try:
        assert launched(lambda: T.dwconv_bn_act_fwd(x, w, s, b, [1, 1], [1, 1], [1, 1], "relu")) <= pinned_ids
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("FASTDW_DETERMINISTIC", "1")
    assert launched(train_fwd) <= pinned_ids
    assert launched(lambda: T.dwconv_bn_act_fwd(x, w, s, b, [1, 1], [1, 1], [1, 1], "relu6")) <= pinned_ids
    monkeypatch.delenv("FASTDW_DETERMINISTIC")
    assert launched(train_fwd) <= tuned_ids

    # capture: the forward at this key was tuned above (outside a capture), a new batch size was not
    monkeypatch.setattr(T, "_capturing", lambda t: True)
    fwd = lambda xx: lambda: T.dwconv_bn_act_fwd(xx, w, s, b, [1, 1], [1, 1], [1, 1], "relu6")  # noqa: E731
    T._TUNED_KEYS.clear()
    assert launched(fwd(x)) <= pinned_ids
    monkeypatch.setattr(T, "_capturing", lambda t: False)
    assert launched(fwd(x)) <= tuned_ids  # a warm-up call tunes it
    monkeypatch.setattr(T, "_capturing", lambda t: True)
    assert launched(fwd(x)) <= tuned_ids
    x2 = torch.cat([x, x, x]).contiguous(memory_format=torch.channels_last)
    assert launched(fwd(x2)) <= pinned_ids  # N = 3: another bucket of the key
    assert T._plan(x2, w, 6, 5).buckets[0] != T._plan(x, w, 6, 5).buckets[0]


class _LaunchLog:
    """Stands in for T._launch: the name of each kernel launched, and the tensor operators the
    launcher itself ran outside the launches (allocations and views aside), through a dispatch
    mode that looks away while a kernel runs (the interpreter copies arguments with torch ops)."""

    FREE = {"empty", "empty_strided", "empty_like", "select", "slice", "as_strided", "view", "alias", "detach",
            "t", "transpose", "expand", "unsqueeze", "squeeze", "reshape", "_reshape_alias"}

    def __init__(self, orig):
        self.orig, self.names, self.ops, self.inside = orig, [], [], False

    def __call__(self, kernel):
        self.names.append(getattr(kernel, "fn", kernel).__name__)
        grid_of, log = self.orig(kernel), self

        class Grid:
            def __getitem__(self, grid):
                run = grid_of[grid]

                def call(*a, **k):
                    log.inside = True
                    try:
                        return run(*a, **k)
                    finally:
                        log.inside = False
                return call
        return Grid()

    def run(self, fn):
        from torch.utils._python_dispatch import TorchDispatchMode

        log = self

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if not log.inside and name not in _LaunchLog.FREE:
                    log.ops.append(name)
                return func(*args, **(kwargs or {}))

        self.names, self.ops = [], []
        with Ops():
            out = fn()
        return out, self.names, self.ops


@requires_interp
@pytest.mark.parametrize("stride", [1, 2])
def test_launches_per_call(stride, monkeypatch):
    """Issue 16: each call launches only its kernels, with no tensor operator in between
    (allocations and views only; there were about 20 in the training forward and 25 in its
    backward: the statistics merge, the BatchNorm algebra, casts, the partial sums): inference
    backward gu, dx and two sums (dscale with dshift, dweight); training forward statistics,
    finish, conv; training backward prep, pass A, finish, pass B, dx, dweight's sum. The
    training parameters are read in place whatever their strides (a strided view, an expanded
    tensor), and the numbers match the reference."""
    from test_train import check_backend, make_train_inputs

    log = _LaunchLog(T._launch)
    monkeypatch.setattr(T, "_launch", log)
    s2 = [stride, stride]
    x, w, s, b = make_inputs(1, 6, 7, 8, 3, device="cpu", layout="channels_last")
    y, names, ops = log.run(lambda: T.dwconv_bn_act_fwd(x, w, s, b, s2, [1, 1], [1, 1], "relu6"))
    assert names == ["_dwconv_fwd_kernel"] and ops == [], (names, ops)
    g = torch.randn_like(y)
    _, names, ops = log.run(lambda: T.dwconv_bn_act_bwd(g, x, w, s, b, s2, [1, 1], [1, 1], "relu6", [True] * 4,
                                                        False))
    dx_kernel = "_dwconv_bwd_dx_rows_kernel" if stride == 1 else "_dwconv_bwd_dx_s2_kernel"
    assert names == ["_dwconv_bwd_gu_kernel", "_sum_rows_kernel", dx_kernel, "_sum_rows_kernel"] and ops == [], \
        (names, ops)

    x, w, bias, gam, bet = make_train_inputs(2, 6, 7, 8, 3, dtype=torch.float32, layout="channels_last",
                                             affine=True, bias=True)
    gam = torch.stack([gam, gam], 1)[:, 0]  # a strided view
    bet = bet[:1].expand(6)  # an expanded tensor
    conf = (s2, [1, 1], [1, 1], 1e-5)
    (y, mean, var), names, ops = log.run(lambda: T.dwconv_bn_act_train_fwd(x, w, bias, gam, bet, *conf, "hardswish"))
    assert names == ["_dwconv_train_stats_kernel", "_train_stat_finish_kernel", "_dwconv_fwd_kernel"], names
    assert ops == [], ops
    center = (mean - bias)[None].expand(3, 6)[1]  # another strided view
    gy, gm, gv = torch.randn_like(y), torch.randn(6), torch.randn(12)[::2]
    _, names, ops = log.run(lambda: T.dwconv_bn_act_train_bwd(gy, gm, gv, x, w, gam, bet, center, var, *conf,
                                                              "hardswish", [True] * 4, False))
    assert names == ["_train_bwd_prep_kernel", "_dwconv_bwd_gu_kernel", "_train_bwd_finish_kernel",
                     "_dwconv_bwd_gu_kernel", dx_kernel, "_sum_rows_kernel"] and ops == [], (names, ops)
    monkeypatch.setattr(T, "_launch", log.orig)
    assert not check_backend("triton", (x, w, bias, gam, bet), conf, "hardswish", f"s{stride}")


def test_eps_parts_exact():
    """The finish kernels get eps as three fp32 scalars (Triton and Inductor pass float scalars
    as fp32) whose float64 sum is eps exactly, so invstd is formed from the double eps."""
    import struct

    for eps in (1e-5, 1e-3, 0.1, 2.0 ** -10, 1e-12, 0.0, 3.3e-7):
        parts = T._eps_parts(eps)
        assert len(parts) == 3
        assert all(struct.unpack("f", struct.pack("f", p))[0] == p for p in parts)
        assert (parts[0] + parts[1]) + parts[2] == eps, (eps, parts)


def test_autotune_results_cached_across_processes(monkeypatch):
    """Config lists are autotuned with cache_results where Triton has it (the interpreter turns
    the cache off itself, so the call is what is checked here)."""
    import inspect

    import triton

    seen = []
    real = triton.autotune
    monkeypatch.setattr(triton, "autotune", lambda configs, key, **kw: seen.append((configs, key, kw)) or
                        real(configs=configs, key=key, **kw))
    k = T._autotune(T._dwconv_fwd_kernel, T._CL_CONFIGS)
    assert len(k.configs) == len(T._CL_CONFIGS) and seen[0][1] == T._KEY and "N_BUCKET" in T._KEY
    if "cache_results" in inspect.signature(real).parameters:
        assert seen[0][2] == {"cache_results": True}
    T._autotune(T._dwconv_fwd_kernel, T._CL_CONFIGS[:1])  # one config: nothing to benchmark or cache
    assert seen[1][2] == {}


def test_backends_import_apart():
    """fastdw/ops.py and the Triton module do not import each other at module level: the fake
    kernels and autograd they share live in fastdw/_autograd.py."""
    import ast
    from pathlib import Path

    root = Path(fastdw.__file__).parent

    def imports(path):
        """Module-level imports as 'from:name' (fastdw.ops imports Triton lazily, in a function)."""
        out = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                out.update("." * node.level + (node.module or "") + ":" + a.name for a in node.names)
            elif isinstance(node, ast.Import):
                out.update(a.name + ":" for a in node.names)
        return out

    tri = imports(root / "triton" / "dwconv_bn_act.py")
    assert not any(m.split(":")[0] in ("..ops", "fastdw.ops") or m == "..:ops" for m in tri), tri
    assert "..:_autograd" in tri, tri
    ops = imports(root / "ops.py")
    assert not any("triton" in m for m in ops), ops
    assert any(m.startswith("._autograd:") for m in ops), ops


@requires_gpu
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_device():
    """x on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (right numbers), and the
    current device is left as it was."""
    torch.cuda.set_device(0)
    x, w, s, b = make_inputs(2, 16, 9, 10, 3, device="cuda:1", layout="channels_last", requires_grad=True)
    y = _fwd(x, w, s, b, act="relu6")
    assert torch.cuda.current_device() == 0 and y.device == x.device
    ref = ref_forward(x.detach().double(), w.detach().double(), s.detach().double(), b.detach().double(),
                      1, 1, 1, "relu6")
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    assert torch.cuda.current_device() == 0 and x.grad.device == x.device and torch.isfinite(x.grad).all()


@requires_gpu
@pytest.mark.gpu
def test_cuda_graph_capture(monkeypatch):
    """Autotuning on: a first call inside a CUDA-graph capture (no warm-up) takes the pinned config
    instead of benchmarking, and the replayed graph equals eager."""
    _fake_tables(monkeypatch)
    monkeypatch.setitem(T._FWD, True, T._autotune(T._dwconv_fwd_kernel, T._CL_CONFIGS))
    T._PINNED[id(T._FWD)] = {cl: T._autotune(T._dwconv_fwd_kernel, T._configs(cl)[:1]) for cl in (True, False)}
    x, w, s, b = make_inputs(3, 40, 17, 19, 3, dtype=torch.float16, device="cuda", layout="channels_last")
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        with torch.cuda.graph(graph):
            y = T.dwconv_bn_act_fwd(static_x, w, s, b, [1, 1], [1, 1], [1, 1], "hardswish")
    torch.cuda.current_stream().wait_stream(stream)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    eager = T.dwconv_bn_act_fwd(x2, w, s, b, [1, 1], [1, 1], [1, 1], "hardswish")
    assert torch.equal(y, eager)
