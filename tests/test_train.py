"""The training-mode op (batch-statistics BatchNorm), fastdw::dwconv_bn_act_train: every backend
against the reference (outputs y, mean, var and the gradients through all three), the GPU
kernels' bodies through their CPU emulation, opcheck, gradcheck, determinism and errors.
Modules, running statistics and whole networks trained step for step: tests/test_train_nn.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdw
from conftest import (
    HAS_CUDA,
    LOWP,
    assert_close_fp,
    dtype_id,
    kernel_scale,
    lowp_check,
    reduction_scale,
    requires_cuda,
    to_layout,
)
from fastdw.reference import activation, dwconv_bn_act_train_ref

OP = torch.ops.fastdw.dwconv_bn_act_train.default
BWD = torch.ops.fastdw._dwconv_bn_act_train_backward.default
EMU_FWD = torch.ops.fastdw._dwconv_bn_act_train_gpu_emulated.default
EMU_BWD = torch.ops.fastdw._dwconv_bn_act_train_backward_gpu_emulated.default

NAMES = ("x", "weight", "bias", "gamma", "beta")


def make_train_inputs(N, C, H, W, k=3, *, dtype=torch.float32, device="cpu", layout="contiguous", bias=True,
                      affine=True, wdtype=None, pdtype=None, offset=0.7):
    """(x, weight, bias, gamma, beta). x has a non-zero mean (offset) so that the batch mean
    matters; gamma in [0.5, 2.5] and beta ~ N(0, 1) put u on both sides of every kink."""
    kh, kw = (k, k) if isinstance(k, int) else k
    if pdtype is None:  # BatchNorm parameters: fp32 (fp64 with fp64 x, for gradcheck precision)
        pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = to_layout((torch.randn(N, C, H, W, device=device) * 1.5 + offset).to(dtype), layout)
    w = (torch.randn(C, 1, kh, kw, device=device) / (kh * kw) ** 0.5).to(dtype if wdtype is None else wdtype)
    b = (torch.randn(C, device=device) * 0.3).to(pdtype) if bias else None
    g = (torch.rand(C, device=device) * 2 + 0.5).to(pdtype) if affine else None
    be = torch.randn(C, device=device).to(pdtype) if affine else None
    return x, w, b, g, be


def run_backend(backend, inputs, conf, act, gy, gm, gv):
    """(y, mean, var, grads) with grads = {name: gradient} of <y, gy> + <mean, gm> + <var, gv>.
    'cpu' / 'cuda' / 'triton' go through the public function and autograd; 'emulated' calls the
    debug ops that run the CUDA kernels' bodies on the CPU."""
    stride, padding, dilation, eps = conf
    x, w, b, g, be = inputs
    if backend == "emulated":
        y, mean, var = EMU_FWD(x, w, b, g, be, stride, padding, dilation, eps, act)
        center = mean - b.float() if b is not None else mean
        dx, dw, dg, db = EMU_BWD(gy, gm, gv, x, w, g, be, center, var, stride, padding, dilation, eps, act,
                                 [True] * 4, False)
        grads = {"x": dx, "weight": dw, "bias": gm if b is not None else None, "gamma": dg if g is not None else None,
                 "beta": db if be is not None else None}
        return y, mean, var, grads
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    y, mean, var = fastdw.dwconv_bn_act_train(*leaves, stride, padding, dilation, eps, act, backend=backend)
    want = [t for t in leaves if t is not None]
    got = torch.autograd.grad((y, mean, var), want, (gy, gm, gv))
    it = iter(got)
    grads = {n: (next(it) if t is not None else None) for n, t in zip(NAMES, leaves)}
    return y.detach(), mean.detach(), var.detach(), grads


def reference(inputs, conf, act, gy, gm, gv, compute_dtype):
    """The same quantities from the pure-PyTorch reference in compute_dtype."""
    stride, padding, dilation, eps = conf
    leaves = [t.detach().to(compute_dtype).requires_grad_(True) if t is not None else None for t in inputs]
    y, mean, var = dwconv_bn_act_train_ref(*leaves, stride, padding, dilation, eps, act, compute_dtype=compute_dtype)
    want = [t for t in leaves if t is not None]
    got = torch.autograd.grad((y, mean, var), want, (gy.to(compute_dtype), gm.to(compute_dtype), gv.to(compute_dtype)))
    it = iter(got)
    return y, mean, var, {n: (next(it) if t is not None else None) for n, t in zip(NAMES, leaves)}


def stock_lowp(inputs, conf, act, gy, gm, gv):
    """Stock PyTorch as autocast runs it: conv in the low-precision dtype, BatchNorm statistics in
    fp32 from the rounded conv output, activation in the low-precision dtype. The error yardstick."""
    stride, padding, dilation, eps = conf
    x, w, b, g, be = inputs
    dt = x.dtype
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    xl, wl, bl, gl, bel = leaves
    z = F.conv2d(xl, wl.to(dt), None if bl is None else bl.to(dt), stride, padding, dilation, groups=x.shape[1])
    zf = z.float()
    mean, var = zf.mean(dim=(0, 2, 3)), zf.var(dim=(0, 2, 3), unbiased=False)
    u = (zf - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + eps).view(1, -1, 1, 1)
    if gl is not None:
        u = u * gl.float().view(1, -1, 1, 1) + bel.float().view(1, -1, 1, 1)
    y = activation(u.to(dt), act)
    want = [t for t in leaves if t is not None]
    got = torch.autograd.grad((y, mean, var), want, (gy, gm, gv))
    it = iter(got)
    return y, mean, var, {n: (next(it) if t is not None else None) for n, t in zip(NAMES, leaves)}


def check_backend(backend, inputs, conf, act, what=""):
    """Runs `backend` and compares everything with the reference; returns a list of failures."""
    x = inputs[0]
    N, C = x.shape[:2]
    y0 = dwconv_bn_act_train_ref(*inputs, *conf, act)[0]
    M = y0.shape[0] * y0.shape[2] * y0.shape[3]
    gy = torch.randn(y0.shape, device=x.device).to(x.dtype)
    gm = torch.randn(C, device=x.device)
    gv = torch.randn(C, device=x.device)
    sd = torch.float64 if x.dtype == torch.float64 else torch.float32
    gm, gv = gm.to(sd), gv.to(sd)
    y, mean, var, grads = run_backend(backend, inputs, conf, act, gy, gm, gv)
    fails = []
    if y.dtype != x.dtype or y.shape != y0.shape:
        fails.append(f"{what}: y dtype/shape {y.dtype}/{tuple(y.shape)}")
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    if not y.is_contiguous(memory_format=fmt) or not grads["x"].is_contiguous(memory_format=fmt):
        fails.append(f"{what}: layout of y / dx is not {fmt}")
    if mean.dtype != sd or var.dtype != sd:
        fails.append(f"{what}: mean/var dtype {mean.dtype}/{var.dtype}, want {sd}")
    ks, rs = kernel_scale(inputs[1]), reduction_scale(M)
    if x.dtype in LOWP:
        ref = reference(inputs, conf, act, gy, gm, gv, torch.float32)
        stock = stock_lowp(inputs, conf, act, gy, gm, gv)
        pairs = [("y", y, ref[0], stock[0]), ("mean", mean, ref[1], stock[1]), ("var", var, ref[2], stock[2])]
        pairs += [(f"d{n}", grads[n], ref[3][n], stock[3][n]) for n in NAMES if ref[3][n] is not None]
        for name, out, r32, rl in pairs:
            msg = lowp_check(out, r32, rl, x.dtype)
            if msg:
                fails.append(f"{what} {name}: {msg}")
    else:
        ref = reference(inputs, conf, act, gy, gm, gv, torch.float64)
        checks = [("y", y, ref[0], ks), ("mean", mean, ref[1], ks * rs), ("var", var, ref[2], ks * rs)]
        checks += [(f"d{n}", grads[n], ref[3][n], ks * rs * (1 if n == "x" else 4)) for n in NAMES
                   if ref[3][n] is not None]
        for name, out, r, scale in checks:
            try:
                assert_close_fp(out, r, dtype=x.dtype, atol_scale=scale, what=f"{what} {name}")
            except AssertionError as e:
                fails.append(str(e).splitlines()[0])
    for n in NAMES:
        if (grads[n] is None) != (inputs[NAMES.index(n)] is None):
            fails.append(f"{what}: gradient of {n} present={grads[n] is not None}")
    return fails


# (k, stride, padding, dilation)
CONFS = {
    "k3s1": (3, (1, 1), (1, 1), (1, 1)),
    "k3s2": (3, (2, 2), (1, 1), (1, 1)),
    "k5s2": (5, (2, 2), (2, 2), (1, 1)),
    "k7s1": (7, (1, 1), (3, 3), (1, 1)),
    "k3x5": ((3, 5), (2, 1), (2, 1), (1, 2)),
}


def _conf(name, eps=1e-5):
    k, s, p, d = CONFS[name]
    return k, (list(s), list(p), list(d), eps)


# ------------------------------------------------------------------------------------------
# CPU kernels


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "permuted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=dtype_id)
def test_cpu_every_activation(dtype, layout):
    fails = []
    for i, act in enumerate(fastdw.ACTIVATIONS):
        k, conf = _conf("k3s1" if i % 2 == 0 else "k3s2")
        inputs = make_train_inputs(2, 5 + i, 7, 9, k, dtype=dtype, layout=layout, bias=i % 2 == 0, affine=i != 3)
        fails += check_backend("cpu", inputs, conf, act, f"{act}")
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("conf", list(CONFS))
def test_cpu_kernel_configs(conf, layout):
    k, c = _conf(conf)
    fails = []
    for act, N, C, H, W in (("relu6", 3, 16, 13, 11), ("hardswish", 1, 7, 14, 14), ("silu", 2, 33, 9, 12)):
        inputs = make_train_inputs(N, C, H, W, k, layout=layout)
        fails += check_backend("cpu", inputs, c, act, f"{conf} {act} N{N} C{C} {H}x{W}")
    assert not fails, "\n".join(fails)


def test_cpu_fp32_weight_with_lowp_x():
    """Autocast's call: fp16/bf16 x, fp32 weight and BatchNorm parameters."""
    fails = []
    for dtype in LOWP:
        for layout in ("contiguous", "channels_last"):
            inputs = make_train_inputs(2, 16, 10, 10, 3, dtype=dtype, layout=layout, wdtype=torch.float32)
            fails += check_backend("cpu", inputs, _conf("k3s1")[1], "relu6", f"{dtype_id(dtype)} {layout}")
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("backend", ["cpu", "emulated", pytest.param("triton", marks=pytest.mark.slow)])
def test_variance_without_cancellation(backend):
    """z with |mean| / std ~ 10^3: a sum / sum-of-squares variance in fp32 would lose every digit."""
    if backend == "triton" and "triton" not in fastdw.available_backends():
        pytest.skip("no Triton backend here")
    for layout in ("contiguous", "channels_last"):
        x, w, b, g, be = make_train_inputs(2, 8, 12, 12, 3, layout=layout, offset=0.0)
        x = to_layout(x * 0.01 + 50.0, layout)
        conf = _conf("k3s1")[1]
        if backend == "emulated":
            y, mean, var = EMU_FWD(x, w, b, g, be, *conf, "none")
        else:
            y, mean, var = fastdw.dwconv_bn_act_train(x, w, b, g, be, *conf, act="none", backend=backend)
        _, rm, rv = dwconv_bn_act_train_ref(x.double(), w.double(), b.double(), g.double(), be.double(), *conf,
                                            act="none")
        torch.testing.assert_close(var.double(), rv, rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(mean.double(), rm, rtol=1e-6, atol=1e-5)


def test_gradcheck_fp64():
    for layout, bias in (("contiguous", True), ("channels_last", False)):
        x, w, b, g, be = make_train_inputs(2, 3, 5, 6, 3, dtype=torch.float64, layout=layout, bias=bias,
                                           pdtype=torch.float64)
        leaves = [t.requires_grad_(True) if t is not None else None for t in (x, w, b, g, be)]

        def f(*ts):
            it = iter(ts)
            args = [next(it) if t is not None else None for t in leaves]
            y, m, v = fastdw.dwconv_bn_act_train(*args, stride=1, padding=1, act="silu", eps=1e-3)
            return y, m, v

        assert torch.autograd.gradcheck(f, [t for t in leaves if t is not None], eps=1e-6, atol=1e-6)


def test_deterministic_bitwise():
    for backend in ("cpu", "emulated"):
        inputs = make_train_inputs(2, 16, 11, 11, 3, layout="channels_last")
        gy = torch.randn(2, 16, 11, 11)
        gm, gv = torch.randn(16), torch.randn(16)
        conf = _conf("k3s1")[1]
        a = run_backend(backend, inputs, conf, "relu6", gy, gm, gv)
        b = run_backend(backend, inputs, conf, "relu6", gy, gm, gv)
        for t, u in zip(a[:3], b[:3]):
            assert torch.equal(t, u), backend
        for n in NAMES:
            if a[3][n] is not None:
                assert torch.equal(a[3][n], b[3][n]), (backend, n)


def test_empty_batch_and_masks():
    x, w, b, g, be = make_train_inputs(0, 4, 6, 6, 3)
    y, mean, var = fastdw.dwconv_bn_act_train(x, w, b, g, be)
    assert y.shape == (0, 4, 6, 6) and mean.isnan().all() and var.isnan().all()
    conf = _conf("k3s1")[1]
    for op in (BWD, EMU_BWD):
        dx, dw, dg, db = op(torch.empty(0, 4, 6, 6), None, None, x, w, g, be, torch.zeros(4), torch.ones(4), *conf,
                            "relu6", [True] * 4, False)
        assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))
        assert torch.equal(dg, torch.zeros(4)) and torch.equal(db, torch.zeros(4))
    # output masks: what is not asked for (or has no input) comes back as an empty (0,) tensor
    x, w, b, g, be = make_train_inputs(2, 4, 6, 6, 3)
    _, mean, var = OP(x, w, None, g, be, *conf, "relu6")
    gy = torch.randn(2, 4, 6, 6)
    full = BWD(gy, None, None, x, w, g, be, mean, var, *conf, "relu6", [True] * 4, False)
    for mask in ([True, False, False, False], [False, True, True, False], [False, False, False, True]):
        part = BWD(gy, None, None, x, w, g, be, mean, var, *conf, "relu6", mask, False)
        for want, got, full_t in zip(mask, part, full):
            if want:
                torch.testing.assert_close(got, full_t)
            else:
                assert got.shape == (0,)
    none = BWD(gy, None, None, x, w, None, None, mean, var, *conf, "relu6", [False, False, True, True], False)
    assert none[2].shape == (0,) and none[3].shape == (0,)


def test_errors_name_the_constraint():
    x, w, b, g, be = make_train_inputs(2, 4, 6, 6, 3)
    with pytest.raises(ValueError, match="gamma must be a 1-D tensor of C = 4"):
        fastdw.dwconv_bn_act_train(x, w, b, torch.ones(5), be)
    with pytest.raises(ValueError, match="bias must be a 1-D tensor of C = 4"):
        fastdw.dwconv_bn_act_train(x, w, torch.ones(2, 2), g, be)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        fastdw.dwconv_bn_act_train(x, w, b, g, be, eps=-1.0)
    with pytest.raises(TypeError, match="beta must be float32 or x's dtype"):
        fastdw.dwconv_bn_act_train(x, w, b, g, be.to(torch.int32))
    with pytest.raises(ValueError, match="act must be one of"):
        fastdw.dwconv_bn_act_train(x, w, b, g, be, act="gelu")
    _, mean, var = OP(x, w, None, g, be, [1, 1], [1, 1], [1, 1], 1e-5, "relu6")
    with pytest.raises(ValueError, match="mean must be a 1-D tensor of C = 4"):
        BWD(torch.randn(2, 4, 6, 6), None, None, x, w, g, be, mean[:3], var, [1, 1], [1, 1], [1, 1], 1e-5,
            "relu6", [True] * 4, False)
    with pytest.raises(ValueError, match="grad_out must have the output's shape"):
        BWD(torch.randn(2, 4, 5, 6), None, None, x, w, g, be, mean, var, [1, 1], [1, 1], [1, 1], 1e-5,
            "relu6", [True] * 4, False)
    x2 = torch.randn(2, 4, 6, 6, requires_grad=True)
    y, _, _ = fastdw.dwconv_bn_act_train(x2, w, None, g, be)
    (gx,) = torch.autograd.grad(y.sum(), x2, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


# ------------------------------------------------------------------------------------------
# opcheck


def _opcheck_samples():
    for layout in ("contiguous", "channels_last", "sliced", "permuted"):
        for rg in (False, True):
            for bias, affine in ((True, True), (False, False)):
                x, w, b, g, be = make_train_inputs(2, 3, 5, 6, (3, 3) if rg else (3, 5), layout=layout, bias=bias,
                                                   affine=affine)
                ts = [t.requires_grad_(rg) if t is not None else None for t in (x, w, b, g, be)]
                s, p = ([1, 1], [1, 1]) if rg else ([2, 1], [1, 2])
                yield f"{layout}-{rg}-{bias}", (*ts, s, p, [1, 1], 1e-5, "hardswish" if rg else "relu6")


@pytest.mark.parametrize("sample", list(_opcheck_samples()), ids=lambda s: s[0])
def test_opcheck_forward(sample):
    result = torch.library.opcheck(OP, sample[1])
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_backward(layout):
    x, w, b, g, be = make_train_inputs(2, 3, 5, 6, 3, layout=layout)
    conf = ([1, 1], [1, 1], [1, 1], 1e-5, "relu6")
    y, mean, var = OP(x, w, None, g, be, *conf)
    gy = torch.randn_like(y)
    for gm, gv, mask in ((None, None, [True] * 4), (torch.randn(3), torch.randn(3), [True, True, False, True])):
        result = torch.library.opcheck(BWD, (gy, gm, gv, x, w, g, be, mean, var, *conf, mask, False))
        assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------------------------------------
# The CUDA kernels' bodies (CPU emulation), the Triton kernels (interpreter on a CPU), the GPU


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_emulated_gpu_bodies(dtype, layout):
    """C = 16 takes the 16-byte vector path of the statistics and reduce kernels in channels_last
    (8 fp16/bf16 or 4 fp32 channels per thread); C = 6 the scalar path."""
    fails = []
    for i, act in enumerate(fastdw.ACTIVATIONS):
        name = ("k3s1", "k3s2", "k5s2", "k3x5", "k7s1")[i]
        k, conf = _conf(name)
        C = 16 if i % 2 == 0 else 6
        inputs = make_train_inputs(2, C, 9, 10, k, dtype=dtype, layout=layout, bias=i != 1, affine=i != 2,
                                   wdtype=torch.float32 if i == 3 else None)
        fails += check_backend("emulated", inputs, conf, act, f"{act} {name} C{C}")
    assert not fails, "\n".join(fails)


def test_emulated_many_chunks():
    """More rows than one chunk per channel vector: the chunk merge (Chan) and partial sums."""
    k, conf = _conf("k3s1")
    inputs = make_train_inputs(3, 4, 30, 7, k, layout="channels_last")  # scalar path, 90 rows
    assert not check_backend("emulated", inputs, conf, "relu6", "many chunks")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_emulated_fused_backward_tiles(layout):
    """Images with interior tiles of the fused 3x3 backward (the batch-statistics terms folded into
    its q), ragged last tiles, and padding 0 / 2, every activation."""
    fails = []
    for i, (act, s, p, H, W) in enumerate((("relu6", 1, 1, 37, 29), ("hardswish", 2, 1, 35, 36),
                                            ("silu", 1, 0, 34, 20), ("relu", 2, 2, 19, 33),
                                            ("none", 1, 2, 18, 17))):
        inputs = make_train_inputs(2, 3, H, W, 3, layout=layout, bias=i != 1)
        conf = ([s, s], [p, p], [1, 1], 1e-5)
        fails += check_backend("emulated", inputs, conf, act, f"{act} s{s} p{p} {H}x{W}")
    assert not fails, "\n".join(fails)


TRAIN_LAUNCHES = torch.ops.fastdw._dwconv_bn_act_train_gpu_launches.default
TRAIN_BWD_LAUNCHES = torch.ops.fastdw._dwconv_bn_act_train_backward_gpu_launches.default
# allocations, views and the wrappers above the operators that write (those are counted)
_NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::select", "aten::slice",
              "aten::as_strided", "aten::view", "aten::alias", "aten::detach", "aten::lift_fresh",
              "aten::expand", "aten::resize_", "aten::contiguous", "aten::to", "aten::_to_copy"}


def _tensor_ops(fn):
    """The ATen operators fn runs that write memory (the leaves of the profiler's tree, less
    allocations and views): on a GPU, one launch each."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()
            if e.name.startswith("aten::") and not e.cpu_children and e.name not in _NO_KERNEL]


@pytest.mark.parametrize("case", ["channels_last-fp32", "contiguous-fp16-params", "channels_last-bf16-noaffine"])
def test_training_launches_without_host_tensor_ops(case):
    """Issue 15: the training op's forward is 5 launches (parameter pack, statistics, the two
    finish stages, the conv) and its backward 8 (coefficients, pack, pass A, its two finish
    stages, the fused kernel and its two finish stages), with no tensor op in between (there were
    23 and 31 (C,)-sized tensor ops: the chunk merge, the BatchNorm algebra, casts); the
    parameters are read in place whatever their dtype and strides."""
    layout, dt = case.split("-")[:2]
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt]
    affine = not case.endswith("noaffine")
    x, w, b, g, be = make_train_inputs(2, 16, 12, 12, 3, dtype=dtype, layout=layout, affine=affine,
                                       bias=affine, pdtype=dtype if case.endswith("params") else None)
    if affine:  # a strided view and an expanded tensor
        g = torch.stack([g, g], 1)[:, 0]
        be = be[:1].expand(16)
    conf = ([1, 1], [1, 1], [1, 1], 1e-5)
    fwd = TRAIN_LAUNCHES(x, w, b, g, be, *conf, "hardswish")
    assert fwd[:4] == ["PackParams", "TrainStats", "TrainStatGroups", "TrainStatFinish"] and len(fwd) == 5, fwd
    assert fwd[4].startswith("Fwd"), fwd
    y, mean, var = EMU_FWD(x, w, b, g, be, *conf, "hardswish")
    center = mean - b.float() if b is not None else mean
    gy, gm, gv = torch.randn_like(y), torch.randn(16), torch.randn(16)
    bwd = TRAIN_BWD_LAUNCHES(gy, gm, gv, x, w, g, be, center, var, *conf, "hardswish", [True] * 4)
    assert bwd == ["TrainBwdPrep", "PackParams", "TrainBwdReduce", "TrainBwdGroups", "TrainBwdFinish", "BwdFused",
                   "BwdReduceTiles", "BwdReduceGroups"], bwd
    assert _tensor_ops(lambda: EMU_FWD(x, w, b, g, be, *conf, "hardswish")) == []
    assert _tensor_ops(lambda: EMU_BWD(gy, gm, gv, x, w, g, be, center, var, *conf, "hardswish", [True] * 4,
                                       False)) == []
    # and the values: the reference through the same views
    assert not check_backend("emulated", (x, w, b, g, be), conf, "hardswish", case)


def _triton_or_skip():
    if "triton" not in fastdw.available_backends():
        pytest.skip("no Triton backend here (no GPU and no TRITON_INTERPRET=1)")


TRITON_CASES = [("relu6", "k3s1", "channels_last", torch.float32, 16),
                ("hardswish", "k3s2", "contiguous", torch.float32, 5),
                ("silu", "k5s2", "channels_last", torch.float16, 8),
                ("none", "k3x5", "sliced", torch.float32, 3),
                ("relu", "k3s1", "channels_last", torch.bfloat16, 16)]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(map(str, c[:3])) + "-" + dtype_id(c[3]))
def test_triton_matches_reference(case):
    _triton_or_skip()
    act, name, layout, dtype, C = case
    k, conf = _conf(name)
    N, H, W = (2, 9, 10) if not HAS_CUDA else (4, 28, 30)
    inputs = make_train_inputs(N, C, H, W, k, dtype=dtype, layout=layout, wdtype=torch.float32 if dtype in LOWP
                               else None, device="cuda" if HAS_CUDA else "cpu")
    fails = check_backend("triton", inputs, conf, act, "-".join(map(str, case)))
    assert not fails, "\n".join(fails)


def test_triton_opcheck():
    _triton_or_skip()
    from fastdw.triton.dwconv_bn_act import TRAIN_BWD_OP, TRAIN_OP

    dev = "cuda" if HAS_CUDA else "cpu"
    x, w, b, g, be = make_train_inputs(2, 4, 5, 6, 3, layout="channels_last", device=dev)
    ts = [t.requires_grad_(True) for t in (x, w, b, g, be)]
    args = (*ts, [1, 1], [1, 1], [1, 1], 1e-5, "relu6")
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(TRAIN_OP, args, test_utils=utils)
    y, mean, var = TRAIN_OP(*[t.detach() for t in ts], *args[5:])
    torch.library.opcheck(TRAIN_BWD_OP, (torch.randn_like(y), None, None, x.detach(), w.detach(), g.detach(),
                                         be.detach(), mean, var, *args[5:], [True] * 4, False),
                          test_utils=("test_schema", "test_faketensor"))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_gpu_matches_reference(backend, dtype, layout):
    if backend not in fastdw.available_backends():
        pytest.skip(f"no {backend} backend in this build")
    fails = []
    for i, act in enumerate(fastdw.ACTIVATIONS):
        name = tuple(CONFS)[i]
        k, conf = _conf(name)
        for C in (32, 24 + i):
            inputs = make_train_inputs(8, C, 28, 28, k, dtype=dtype, layout=layout, device="cuda",
                                       bias=i % 2 == 0, wdtype=torch.float32 if i == 1 else None)
            fails += check_backend(backend, inputs, conf, act, f"{act} {name} C{C}")
    assert not fails, "\n".join(fails)


@requires_cuda
@pytest.mark.gpu
def test_gpu_matches_cpu_on_mobilenet_layers():
    """Every distinct MobileNetV2 depthwise layer at N = 8, fp32 channels_last: the GPU op (each
    backend) against the fp64 reference, outputs and gradients."""
    from fastdw.layers import MOBILENET_V2, unique_layers

    fails = []
    for L in unique_layers(MOBILENET_V2):
        inputs = make_train_inputs(8, L.C, L.H, L.W, L.k, layout="channels_last")
        conf = ([L.stride] * 2, [L.padding] * 2, [1, 1], 1e-5)
        for backend in [b for b in ("cuda", "triton") if b in fastdw.available_backends()]:
            gpu = [t.cuda() if t is not None else None for t in inputs]
            fails += check_backend(backend, gpu, conf, L.act, f"{backend} {L}")
    assert not fails, "\n".join(fails)
