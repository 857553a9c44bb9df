"""Asymmetric padding: (top, left, bottom, right) pads and TensorFlow's "same" (timm's Conv2dSame)
as part of the op contract, on every backend, forward, backward and training.

The truth is F.pad + F.conv2d (what Conv2dSame runs). On a CPU-only machine the CUDA kernels'
bodies run through the emulation ops and the Triton kernels through the interpreter.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdw
import fastdw.ops
from fastdw.nn import DWConv2d, DWConvBNAct2d, conv_config
from fastdw.reference import activation, dwconv_bn_act_ref, dwconv_bn_act_train_ref

OP = torch.ops.fastdw.dwconv_bn_act.default
BWD = torch.ops.fastdw._dwconv_bn_act_backward.default
TRAIN = torch.ops.fastdw.dwconv_bn_act_train.default
TRAIN_BWD = torch.ops.fastdw._dwconv_bn_act_train_backward.default
EMU_FWD = torch.ops.fastdw._dwconv_bn_act_gpu_emulated.default
EMU_BWD = torch.ops.fastdw._dwconv_bn_act_backward_gpu_emulated.default
EMU_TRAIN = torch.ops.fastdw._dwconv_bn_act_train_gpu_emulated.default
EMU_TRAIN_BWD = torch.ops.fastdw._dwconv_bn_act_train_backward_gpu_emulated.default
PATH = torch.ops.fastdw._dwconv_bn_act_gpu_path.default
BWD_LAUNCHES = torch.ops.fastdw._dwconv_bn_act_backward_gpu_launches.default

# (k, stride, dilation, (top, left, bottom, right), H, W): TF SAME at stride 2 on even sizes (the
# odd pixel at the bottom / right), an even kernel's "same", the extra pad on top, dilation, and
# planes of several fused-backward tiles.
CASES = [
    (3, 2, 1, (0, 0, 1, 1), 16, 14),
    (3, 1, 1, (0, 1, 2, 0), 9, 11),
    (3, 2, 1, (2, 0, 0, 1), 15, 13),
    (3, 1, 1, (0, 0, 1, 1), 40, 37),
    (3, 2, 1, (0, 0, 1, 1), 34, 20),
    (5, 2, 1, (1, 1, 2, 2), 18, 20),
    (5, 1, 1, (2, 1, 2, 3), 10, 9),
    (7, 2, 1, (2, 2, 3, 3), 20, 22),
    (4, 1, 1, (1, 1, 2, 2), 9, 10),
    (3, 1, 2, (1, 2, 3, 2), 12, 11),
]
ACTS = ["none", "relu", "relu6", "hardswish", "silu"]
LAYOUTS = ["contiguous", "channels_last"]


def _id(case):
    k, s, d, pads, H, W = case
    return f"k{k}s{s}d{d}p{''.join(map(str, pads))}_{H}x{W}"


def _layout(x, layout):
    return x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def _inputs(case, layout, C=5, N=2, dtype=torch.float64, seed=0):
    k, s, d, pads, H, W = case
    g = torch.Generator().manual_seed(seed)
    x = _layout(torch.randn(N, C, H, W, generator=g, dtype=dtype), layout)
    w = torch.randn(C, 1, k, k, generator=g, dtype=dtype) / k
    sc = torch.rand(C, generator=g, dtype=dtype) + 0.5
    sh = 0.5 * torch.randn(C, generator=g, dtype=dtype)
    return x, w, sc, sh


def _truth(x, w, sc, sh, s, pads, d, act):
    top, left, bottom, right = pads
    z = F.conv2d(F.pad(x, (left, right, top, bottom)), w, None, s, 0, d, groups=x.shape[1])
    return activation(z * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1), act)


def _grads(x, w, sc, sh, s, pads, d, act, g):
    leaves = [t.detach().double().clone().requires_grad_(True) for t in (x, w, sc, sh)]
    y = _truth(*leaves, s, pads, d, act)
    return y.detach(), torch.autograd.grad(y, leaves, g.double())


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1)).item()


def test_reference_is_f_pad():
    """The reference (the tests' truth elsewhere) takes the same paddings, "same" included."""
    x, w, sc, sh = _inputs(CASES[0], "contiguous")
    y = dwconv_bn_act_ref(x, w, sc, sh, 2, (0, 0, 1, 1), 1, "silu")
    assert torch.allclose(y, _truth(x, w, sc, sh, 2, (0, 0, 1, 1), 1, "silu"))
    assert torch.equal(dwconv_bn_act_ref(x, w, sc, sh, 2, "same", 1, "silu"), y)
    assert torch.equal(dwconv_bn_act_ref(x, w, sc, sh, 2, (1, 1, 1, 1), 1, "silu"),
                       dwconv_bn_act_ref(x, w, sc, sh, 2, 1, 1, "silu"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cpu_forward_backward(case, layout):
    k, s, d, pads, H, W = case
    fails = []
    for i, act in enumerate(ACTS):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
            x, w, sc, sh = (t.to(dtype) for t in _inputs(case, layout, seed=i))
            x = _layout(x, layout)
            y = OP(x, w, sc, sh, [s, s], list(pads), [d, d], act)
            g = torch.randn(y.shape, dtype=dtype)
            want_y, want = _grads(x, w, sc, sh, s, pads, d, act, g)
            assert y.shape == want_y.shape and y.dtype == dtype
            assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                   else torch.contiguous_format)
            if _rel(y, want_y) > tol:
                fails.append(f"{act} {dtype} y: {_rel(y, want_y):.2e}")
            got = BWD(g, x, w, sc, sh, [s, s], list(pads), [d, d], act, [True] * 4, True)
            for name, a, b in zip(("dx", "dweight", "dscale", "dshift"), got, want):
                if _rel(a, b) > tol:
                    fails.append(f"{act} {dtype} {name}: {_rel(a, b):.2e}")
    assert not fails, "\n".join(fails)


def test_cpu_gradcheck():
    x, w, sc, sh = _inputs((3, 2, 1, (0, 1, 1, 2), 7, 6), "channels_last", C=3)
    leaves = [t.requires_grad_(True) for t in (x, w, sc, sh)]
    assert torch.autograd.gradcheck(lambda *a: fastdw.dwconv_bn_act(*a, stride=2, padding=(0, 1, 1, 2),
                                                                    act="silu", backend="cpu"), leaves)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cpu_training(case, layout):
    k, s, d, pads, H, W = case
    x, w, bias, gamma = _inputs(case, layout)
    beta = torch.randn(x.shape[1], dtype=x.dtype)
    y, mean, var = TRAIN(x, w, bias, gamma, beta, [s, s], list(pads), [d, d], 1e-5, "hardswish")
    ry, rm, rv = dwconv_bn_act_train_ref(x, w, bias, gamma, beta, s, pads, d, 1e-5, "hardswish")
    assert _rel(y, ry) < 1e-10 and _rel(mean, rm) < 1e-10 and _rel(var, rv) < 1e-10
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, bias, gamma, beta)]
    outs = fastdw.dwconv_bn_act_train(*leaves, stride=s, padding=pads, dilation=d, act="hardswish", backend="cpu")
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, bias, gamma, beta)]
    ref_outs = dwconv_bn_act_train_ref(*ref_leaves, s, pads, d, 1e-5, "hardswish")
    gs = [torch.randn_like(o) for o in ref_outs]
    got = torch.autograd.grad(outs, leaves, gs)
    want = torch.autograd.grad(ref_outs, ref_leaves, gs)
    for name, a, b in zip(("dx", "dweight", "dbias", "dgamma", "dbeta"), got, want):
        assert _rel(a, b) < 1e-9, (name, _rel(a, b))


# ------------------------------------------------------------------------------------------
# The CUDA kernels' bodies (emulated): forward paths, the fused and general backward, training


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emulated_forward(dtype, layout):
    fails = []
    for case in CASES:
        k, s, d, pads, H, W = case
        for C in (8, 5):  # the vector paths (C % 8 == 0) and the scalar ones
            x, w, sc, sh = _inputs(case, layout, C=C, dtype=torch.float32)
            x, w = _layout(x.to(dtype), layout), w.to(dtype)
            y = EMU_FWD(x, w, sc.float(), sh.float(), [s, s], list(pads), [d, d], "relu6")
            ref = _truth(x.double(), w.double(), sc.double(), sh.double(), s, pads, d, "relu6")
            tol = 2e-5 if dtype == torch.float32 else 2e-3
            if y.shape != ref.shape or _rel(y, ref) > tol:
                fails.append(f"{_id(case)} C{C} path={PATH(x, w, [s, s], list(pads), [d, d])}: "
                             f"{y.shape} {_rel(y, ref) if y.shape == ref.shape else ''}")
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_emulated_backward(layout):
    fails = []
    for i, case in enumerate(CASES):
        k, s, d, pads, H, W = case
        act = ACTS[i % len(ACTS)]
        x, w, sc, sh = _inputs(case, layout, C=3)
        g = torch.randn(_truth(x, w, sc, sh, s, pads, d, act).shape, dtype=torch.float64)
        _, want = _grads(x, w, sc, sh, s, pads, d, act, g)
        args = (g.float(), x.float(), w.float(), sc.float(), sh.float(), [s, s], list(pads), [d, d], act)
        got = EMU_BWD(*args, [True] * 4, True)
        path = "fused" if "BwdFused" in BWD_LAUNCHES(*args, [True] * 4) else "general"
        for name, a, b in zip(("dx", "dweight", "dscale", "dshift"), got, want):
            if _rel(a, b) > 1e-5:
                fails.append(f"{_id(case)} {act} ({path}) {name}: {_rel(a, b):.2e}")
    assert not fails, "\n".join(fails)


def test_emulated_backward_takes_the_fused_kernel():
    """TF SAME stride 2 (MobileNet's stride-2 layers in a tf_ model) stays on the fused backward."""
    x, w, sc, sh = _inputs(CASES[0], "channels_last", C=8, dtype=torch.float32)
    g = torch.randn(2, 8, 8, 7)
    assert "BwdFused" in BWD_LAUNCHES(g, x, w, sc, sh, [2, 2], [0, 0, 1, 1], [1, 1], "relu6", [True] * 4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_emulated_training(layout):
    fails = []
    for case in CASES:
        k, s, d, pads, H, W = case
        x, w, bias, gamma = _inputs(case, layout, C=3)
        beta = torch.randn(3, dtype=torch.float64)
        f32 = [t.float() for t in (x, w, bias, gamma, beta)]
        y, mean, var = EMU_TRAIN(*f32, [s, s], list(pads), [d, d], 1e-5, "silu")
        ry, rm, rv = dwconv_bn_act_train_ref(x, w, bias, gamma, beta, s, pads, d, 1e-5, "silu")
        for name, a, b in (("y", y, ry), ("mean", mean, rm), ("var", var, rv)):
            if _rel(a, b) > 2e-5:
                fails.append(f"{_id(case)} {name}: {_rel(a, b):.2e}")
        leaves = [t.clone().requires_grad_(True) for t in (x, w, gamma, beta)]
        ry, rm, rv = dwconv_bn_act_train_ref(leaves[0], leaves[1], None, leaves[2], leaves[3], s, pads, d, 1e-5,
                                             "silu")
        gy, gm, gv = torch.randn_like(ry), torch.randn_like(rm), torch.randn_like(rv)
        want = torch.autograd.grad((ry, rm, rv), leaves, (gy, gm, gv))
        got = EMU_TRAIN_BWD(gy.float(), gm.float(), gv.float(), x.float(), w.float(), gamma.float(), beta.float(),
                            rm.detach().float(), rv.detach().float(), [s, s], list(pads), [d, d], 1e-5, "silu",
                            [True] * 4, True)
        for name, a, b in zip(("dx", "dweight", "dgamma", "dbeta"), got, want):
            if _rel(a, b) > 2e-5:
                fails.append(f"{_id(case)} train {name}: {_rel(a, b):.2e}")
    assert not fails, "\n".join(fails)


# ------------------------------------------------------------------------------------------
# Triton (the interpreter on a CPU-only machine)


def test_triton_forward_backward():
    T = fastdw.ops._triton_module()
    if T is None or not T.INTERPRET:
        pytest.skip("Triton interpreter not in use (the GPU suite runs the Triton grid)")
    for layout, case in (("channels_last", (3, 2, 1, (0, 0, 1, 1), 8, 6)), ("contiguous", (5, 1, 1, (2, 1, 2, 3), 6, 5))):
        k, s, d, pads, H, W = case
        x, w, sc, sh = (t.float() for t in _inputs(case, layout, C=4, N=1))
        x = _layout(x, layout)
        leaves = [t.clone().requires_grad_(True) for t in (x, w, sc, sh)]
        y = fastdw.dwconv_bn_act(*leaves, stride=s, padding=pads, dilation=d, act="hardswish", backend="triton")
        g = torch.randn(y.shape)
        want_y, want = _grads(x, w, sc, sh, s, pads, d, "hardswish", g)
        assert y.shape == want_y.shape and _rel(y, want_y) < 2e-5
        got = torch.autograd.grad(y, leaves, g)
        for name, a, b in zip(("dx", "dweight", "dscale", "dshift"), got, want):
            assert _rel(a, b) < 2e-5, (layout, name, _rel(a, b))
        y, mean, var = fastdw.dwconv_bn_act_train(x, w, None, sc, sh, stride=s, padding=pads, dilation=d,
                                                  act="relu6", backend="triton")
        ry, rm, rv = dwconv_bn_act_train_ref(x, w, None, sc, sh, s, pads, d, 1e-5, "relu6")
        assert _rel(y, ry) < 2e-5 and _rel(mean, rm) < 2e-5 and _rel(var, rv) < 2e-5


# ------------------------------------------------------------------------------------------
# The public function, the fake kernel, the compiled graph, errors


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_public_padding_forms():
    x, w, sc, sh = (t.float() for t in _inputs((3, 2, 1, None, 10, 9), "contiguous"))
    ref = dwconv_bn_act_ref(x, w, sc, sh, 2, (0, 1, 1, 1), 1, "relu")  # SAME: H 10 -> (0, 1), W 9 -> (1, 1)
    same = fastdw.dwconv_bn_act(x, w, sc, sh, stride=2, padding="same", act="relu")
    assert same.shape == (2, 5, 5, 5)
    torch.testing.assert_close(same, ref)
    torch.testing.assert_close(fastdw.dwconv_bn_act(x, w, sc, sh, stride=2, padding="valid", act="relu"),
                               dwconv_bn_act_ref(x, w, sc, sh, 2, 0, 1, "relu"))
    # a symmetric 4-tuple is the pair; a list works like a tuple
    torch.testing.assert_close(fastdw.dwconv_bn_act(x, w, sc, sh, padding=[1, 2, 1, 2]),
                               fastdw.dwconv_bn_act(x, w, sc, sh, padding=(1, 2)))
    # stride 1 "same" is PyTorch's padding="same" (even kernels too)
    w4 = torch.randn(5, 1, 4, 4)
    torch.testing.assert_close(fastdw.dwconv_bn_act(x, w4, padding="same", act="none"),
                               F.conv2d(x, w4, padding="same", groups=5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding,exc,match", [
    ((1, 2, 3), ValueError, r"padding must have 2 elements \(h, w\) or 4 \(top, left, bottom, right\)"),
    ((0, 0, -1, 0), ValueError, r"padding must be >= 0"),
    ("full", ValueError, r"padding must be an int, an \(h, w\) pair, \(top, left, bottom, right\), 'same' or "
                         r"'valid'; got 'full'"),
    ((1.0, 1, 1, 1), ValueError, r"padding must have 2 elements"),
])
def test_padding_errors(padding, exc, match):
    x, w = torch.randn(1, 2, 6, 6), torch.randn(2, 1, 3, 3)
    with pytest.raises(exc, match="^fastdw: " + match):
        fastdw.dwconv_bn_act(x, w, padding=padding)


def test_raw_op_padding_errors():
    """The ops themselves (CPU kernels, fake kernels) check the pads with the same words."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w = torch.randn(1, 2, 6, 6), torch.randn(2, 1, 3, 3)
    for padding, match in (([1, 1, 1], r"padding must have 2 elements \(h, w\) or 4"),
                           ([0, 0, 0, -1], r"padding must be >= 0"),
                           ([0, 0, 0, 0], None)):
        for mode in (None, FakeTensorMode()):
            a = (x, w) if mode is None else (mode.from_tensor(x), mode.from_tensor(w))
            if match is None:
                with (mode or torch.no_grad()):
                    assert OP(*a, None, None, [2, 2], padding, [1, 1], "none").shape == (1, 2, 2, 2)
                continue
            with pytest.raises(ValueError, match="^fastdw: " + match):
                with (mode or torch.no_grad()):
                    OP(*a, None, None, [1, 1], padding, [1, 1], "none")
    # the kernel against the padded extent: bottom / right pads count
    with pytest.raises(ValueError, match=r"kernel larger than the padded input.*5x5.*4x5"):
        OP(torch.randn(1, 2, 3, 3), torch.randn(2, 1, 5, 5), None, None, [1, 1], [0, 1, 1, 1], [1, 1], "none")


def test_opcheck_asymmetric():
    x, w, sc, sh = (t.float() for t in _inputs((3, 2, 1, None, 8, 7), "channels_last", C=3))
    for t in (x, w, sc, sh):
        t.requires_grad_(True)
    result = torch.library.opcheck(OP, (x, w, sc, sh, [2, 2], [0, 1, 1, 0], [1, 1], "hardswish"))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_compile_dynamic_same_padding():
    """A "same" layer under torch.compile with dynamic shapes: the pads are worked out from the
    input's sizes in the graph, right for odd and even inputs alike."""
    layer = DWConvBNAct2d(4, 3, stride=2, padding="same", act="relu6").eval()
    with torch.no_grad():
        layer.bn.running_mean.uniform_(-1, 1)
        layer.bn.running_var.uniform_(0.5, 2)
    compiled = torch.compile(layer, dynamic=True, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for H, W in ((10, 12), (9, 13), (16, 7)):
            x = torch.randn(2, 4, H, W)
            torch.testing.assert_close(compiled(x), layer(x))


# ------------------------------------------------------------------------------------------
# Modules and conversion


def _timm_conv2d_same():
    timm_layers = pytest.importorskip("timm.layers")
    return timm_layers.Conv2dSame


def test_conv_config_padding():
    assert conv_config(nn.Conv2d(4, 4, 4, padding="same", groups=4))["padding"] == (1, 1, 2, 2)
    assert conv_config(nn.Conv2d(4, 4, (3, 4), padding="same", groups=4))["padding"] == (1, 1, 1, 2)
    assert conv_config(nn.Conv2d(4, 4, (3, 4), padding="same", dilation=(1, 2), groups=4))["padding"] == (1, 3)
    assert conv_config(nn.Conv2d(4, 4, 3, padding="same", groups=4))["padding"] == (1, 1)
    assert conv_config(nn.Conv2d(4, 4, 3, padding="valid", groups=4))["padding"] == (0, 0)
    Conv2dSame = _timm_conv2d_same()
    assert conv_config(Conv2dSame(4, 4, 3, stride=2, groups=4))["padding"] == "same"

    class MyConv(nn.Conv2d):
        pass

    assert conv_config(MyConv(4, 4, 3, groups=4)) == "MyConv is not exactly nn.Conv2d"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv2d_same_block_converts(layout):
    """timm's Conv2dSame + BatchNorm + act (a tf_ model's stride-2 depthwise layer) and a bare
    Conv2dSame: fused, stock outputs in eval and training, every input size, revert exact."""
    Conv2dSame = _timm_conv2d_same()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6()),
        nn.Sequential(Conv2dSame(8, 8, 5, stride=2, groups=8, bias=True), nn.Identity()),
    )
    with torch.no_grad():
        model[0][1].running_mean.uniform_(-1, 1)
        model[0][1].running_var.uniform_(0.5, 2)
    stock = copy.deepcopy(model)
    fastdw.convert(model)
    rep = fastdw.conversion_report(model)
    assert len(rep.fused) == 1 and len(rep.bare) == 1 and not rep.left, str(rep)
    assert "padding 'same'" in rep.fused[0][1]
    for H, W in ((16, 16), (15, 17), (9, 8)):
        x = _layout(torch.randn(2, 8, H, W), layout)
        model.eval(), stock.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), stock(x), rtol=1e-5, atol=1e-5)
        model.train(), stock.train()
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = model(xa), stock(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, [xa] + list(model.parameters()), g)
        gb = torch.autograd.grad(yb, [xb] + list(stock.parameters()), g)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[0][1].running_var, stock[0][1].running_var)
    fastdw.revert(model)
    assert type(model[0][0]) is Conv2dSame and type(model[1][0]) is Conv2dSame


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_even_kernel_same_fuses():
    """nn.Conv2d(padding="same") with an even kernel (asymmetric: one more at the bottom / right)
    + BatchNorm + ReLU: fused, stock outputs, revert exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 4, padding="same", groups=8), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(1, 8, 9, 10)
    with torch.no_grad():
        ref = model(x)
        fastdw.convert(model)
        assert isinstance(model[0], DWConvBNAct2d) and model[0].padding == (1, 1, 2, 2)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        fastdw.revert(model)
        assert torch.equal(model(x), ref)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_dwconv2d_even_kernel_same():
    conv = nn.Conv2d(6, 6, 4, padding="same", groups=6)
    dw = DWConv2d.from_conv(conv, backend="cpu")
    assert dw.padding == (1, 1, 2, 2)
    x = torch.randn(2, 6, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(dw(x), conv(x), rtol=1e-5, atol=1e-5)


def test_module_padding_argument():
    layer = DWConvBNAct2d(4, 3, stride=2, padding=(0, 0, 1, 1), act="none", backend="cpu").eval()
    assert layer.padding == (0, 0, 1, 1)
    assert DWConvBNAct2d(4, 3, padding=(1, 1, 1, 1)).padding == (1, 1)
    assert DWConvBNAct2d(4, 3, stride=2, padding="same").padding == "same"
    assert "padding='same'" in repr(DWConvBNAct2d(4, 3, stride=2, padding="same"))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        ref = F.batch_norm(F.conv2d(F.pad(x, (0, 1, 0, 1)), layer.weight, None, 2, 0, 1, 4), layer.bn.running_mean,
                           layer.bn.running_var, layer.bn.weight, layer.bn.bias, False, 0.0, layer.bn.eps)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
