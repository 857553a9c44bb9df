"""Modules and model conversion: BN folding, DWConvBNAct2d, convert/revert on real networks (CPU, fp32)."""

import copy

import pytest
import torch
import torch.utils._python_dispatch
import torch.nn.functional as F
from torch import nn

import fastdw
from fastdw.convert import convert, register_pattern, revert
from fastdw.nn import _ACT_FN, DWConvBNAct2d, FoldedBatchNorm2d, activation_kind, fold_bn

ACT_MODULES = {
    "none": nn.Identity,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "silu": nn.SiLU,
}


def _rel_err(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _randomize_bn(model, seed=0):
    """Non-trivial BatchNorm state so that a wrong fold cannot pass as the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def _count_fused(model):
    return sum(isinstance(m, DWConvBNAct2d) for m in model.modules())


def _count_dw(model):
    """(all depthwise convs, those that are exactly nn.Conv2d or timm's Conv2dSame)."""
    dw = [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1
    ]
    same = "timm.layers.conv2d_same.Conv2dSame"
    return len(dw), sum(type(m) is nn.Conv2d or f"{type(m).__module__}.{type(m).__qualname__}" == same for m in dw)


def _assert_close(out, ref, what="", rtol=1e-5):
    err = _rel_err(out, ref)
    assert err < rtol, f"{what}: max|out - ref| / max|ref| = {err:.3g}"


def _close(actual, expected, what, rtol, atol):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# fold_bn / FoldedBatchNorm2d / activation mapping


def test_activations_match_op():
    assert set(_ACT_FN) == set(fastdw.ACTIVATIONS)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_bn_matches_eval_batchnorm(affine, with_bias):
    torch.manual_seed(0)
    c = 12
    bn = _randomize_bn(nn.BatchNorm2d(c, eps=1e-3, affine=affine)).eval()
    bias = torch.randn(c) if with_bias else None
    x = torch.randn(2, c, 5, 7)
    z = x if bias is None else x + bias.view(1, -1, 1, 1)
    scale, shift = fold_bn(bn, bias)
    assert scale.dtype == shift.dtype == torch.float32 and scale.shape == shift.shape == (c,)
    torch.testing.assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(z), rtol=1e-6, atol=1e-6)


def test_fold_bn_fp32_from_half_and_differentiable():
    bn = _randomize_bn(nn.BatchNorm2d(8)).half()
    scale, shift = fold_bn(bn, torch.randn(8, dtype=torch.half))
    assert scale.dtype == shift.dtype == torch.float32
    assert scale.requires_grad and shift.requires_grad
    (scale.sum() + shift.sum()).backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None


def test_fold_bn_without_running_stats_raises():
    with pytest.raises(ValueError, match="running statistics"):
        fold_bn(nn.BatchNorm2d(4, track_running_stats=False))


def test_folded_batchnorm_shares_state():
    bn = _randomize_bn(nn.BatchNorm2d(6)).eval()
    folded = FoldedBatchNorm2d(bn)
    for name, t in list(bn.named_parameters()) + list(bn.named_buffers()):
        assert getattr(folded, name) is t
    assert list(folded.state_dict()) == list(bn.state_dict())
    assert not folded.training
    x = torch.randn(1, 6, 3, 3)
    assert folded(x) is x
    folded.load_state_dict(_randomize_bn(nn.BatchNorm2d(6), seed=3).state_dict())
    torch.testing.assert_close(bn.running_var, folded.running_var)


def test_activation_kind():
    assert activation_kind(None) == "none"
    assert activation_kind(nn.Identity()) == "none"
    assert activation_kind(nn.ReLU(inplace=True)) == "relu"
    assert activation_kind(nn.ReLU6()) == "relu6"
    assert activation_kind(nn.Hardtanh(0.0, 6.0)) == "relu6"
    assert activation_kind(nn.Hardtanh(-1.0, 1.0)) is None
    assert activation_kind(nn.Hardswish()) == "hardswish"
    assert activation_kind(nn.SiLU()) == "silu"
    assert activation_kind(nn.GELU()) is None
    assert activation_kind(nn.Sigmoid()) is None


# --------------------------------------------------------------------------------------------
# Standalone DWConvBNAct2d vs nn.Sequential(Conv2d, BatchNorm2d, act)


def _standalone_pair(c, k, stride, bias, act, momentum=0.1):
    fused = DWConvBNAct2d(c, kernel_size=k, stride=stride, bias=bias, act=act, momentum=momentum)
    _randomize_bn(fused)
    ref = nn.Sequential(
        nn.Conv2d(c, c, k, stride=stride, padding=(k - 1) // 2, groups=c, bias=bias),
        nn.BatchNorm2d(c, momentum=momentum),
        ACT_MODULES[act](),
    )
    # fused keys: weight, bias, bn.* -> Sequential keys: 0.weight, 0.bias, 1.*
    ref.load_state_dict(
        {("1." + name[3:] if name.startswith("bn.") else "0." + name): t for name, t in fused.state_dict().items()}
    )
    return fused, ref


@pytest.mark.parametrize("act", list(ACT_MODULES))
@pytest.mark.parametrize("k,stride,bias", [(3, 1, False), (3, 2, True), (5, 1, True), (5, 2, False)])
def test_standalone_matches_sequential(act, k, stride, bias):
    torch.manual_seed(0)
    fused, ref = _standalone_pair(7, k, stride, bias, act)
    x = torch.randn(2, 7, 11, 10)

    fused.eval(), ref.eval()
    with torch.no_grad():
        _assert_close(fused(x), ref(x), "eval")

    fused.train(), ref.train()
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, out_r = fused(xf), ref(xr)
    _assert_close(out_f, out_r, "train")
    g = torch.randn_like(out_r)
    out_f.backward(g)
    out_r.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.bn.weight.grad, ref[1].weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.bn.running_mean, ref[1].running_mean)
    torch.testing.assert_close(fused.bn.running_var, ref[1].running_var)
    assert fused.bn.num_batches_tracked.item() == ref[1].num_batches_tracked.item() == 1


def test_standalone_defaults_and_repr():
    m = DWConvBNAct2d(16, kernel_size=5, stride=2, dilation=2)
    assert m.padding == (4, 4) and m.stride == (2, 2) and m.dilation == (2, 2) and m.kernel_size == (5, 5)
    assert m.weight.shape == (16, 1, 5, 5) and m.bias is None
    assert list(m.state_dict()) == [
        "weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"
    ]
    assert "act='relu6'" in repr(m) and "stride=(2, 2)" in repr(m)
    with pytest.raises(ValueError, match="act"):
        DWConvBNAct2d(4, act="gelu")


def test_from_modules_registers_bn_without_slot():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)
    bn = _randomize_bn(nn.BatchNorm2d(8))
    m = DWConvBNAct2d.from_modules(conv, bn, act=nn.ReLU6()).eval()
    assert m.weight is conv.weight and m.bias is conv.bias and m.bn is bn
    assert list(m.state_dict()) == ["weight", "bias"] + ["bn." + k for k in bn.state_dict()]
    ref = nn.Sequential(conv, bn, nn.ReLU6()).eval()
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        _assert_close(m(x), ref(x))
    with pytest.raises(ValueError, match="depthwise"):
        DWConvBNAct2d.from_modules(nn.Conv2d(8, 16, 3, groups=8), nn.BatchNorm2d(16))


def test_eval_cache_follows_parameter_updates():
    torch.manual_seed(0)
    fused, ref = _standalone_pair(6, 3, 1, True, "hardswish")
    fused.eval(), ref.eval()
    x = torch.randn(1, 6, 8, 8)
    with torch.no_grad():
        _assert_close(fused(x), ref(x))
        assert fused._fold_cache is not None
        new = _randomize_bn(copy.deepcopy(ref), seed=7)
        new[0].bias.add_(1.0)
        ref.load_state_dict(new.state_dict())
        fused.bn.load_state_dict(new[1].state_dict())
        fused.bias.copy_(new[0].bias)
        _assert_close(fused(x), ref(x), "after in-place updates")
    # with grad enabled nothing is cached and gradients reach the BN affine parameters
    fused(x).sum().backward()
    assert fused.bn.weight.grad is not None and fused.bias.grad is not None


def test_eval_passes_cached_packed_parameters(monkeypatch):
    """Inference on the CUDA backend passes fastdw.prepack_params views (the kernels then skip
    the pack launch), cached while nothing changes. The decision is forced on here so the CPU
    kernels run the same module code: same numbers, one pack per parameter state."""
    torch.manual_seed(1)
    fused, ref = _standalone_pair(6, 3, 2, True, "relu6")
    fused.eval(), ref.eval()
    x = torch.randn(2, 6, 9, 9)
    assert not fused._use_prepacked(x)  # a CPU tensor: never
    monkeypatch.setattr(DWConvBNAct2d, "_use_prepacked", lambda self, x: not torch.is_grad_enabled())
    with torch.no_grad():
        _assert_close(fused(x), ref(x), "prepacked")
        first = fused._pack_cache
        assert first is not None and first[1][0].dtype == torch.float32
        fused(x)
        assert fused._pack_cache is first  # a hit: nothing packed again
        fused.weight.mul_(-0.5)
        ref[0].weight.mul_(-0.5)
        _assert_close(fused(x), ref(x), "after a weight update")
        assert fused._pack_cache is not first
        second = fused._pack_cache
        fused.bn.running_var.add_(0.25)
        ref[1].running_var.add_(0.25)
        _assert_close(fused(x), ref(x), "after a BN buffer update")
        assert fused._pack_cache is not second
    # with grad enabled the parameters themselves go in, and gradients reach them
    fused(x).sum().backward()
    assert fused.weight.grad is not None and fused.bn.weight.grad is not None


# --------------------------------------------------------------------------------------------
# Whole networks


def _tv(name):
    tvm = pytest.importorskip("torchvision.models")
    return lambda: getattr(tvm, name)(weights=None)


def _timm(name):
    def build():
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False)
    return build


MODELS = {
    "tv_mobilenet_v2": _tv("mobilenet_v2"),
    "tv_mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "tv_mobilenet_v3_large": _tv("mobilenet_v3_large"),
    "tv_efficientnet_b0": _tv("efficientnet_b0"),
    "tv_mnasnet0_5": _tv("mnasnet0_5"),
    "timm_mobilenetv3_large_100": _timm("mobilenetv3_large_100"),
    "timm_efficientnet_b0": _timm("efficientnet_b0"),
    "timm_mobilenetv2_100": _timm("mobilenetv2_100"),
    "timm_tf_efficientnet_b0": _timm("tf_efficientnet_b0"),  # stride-2 dw convs are Conv2dSame
    "timm_tf_mobilenetv3_large_100": _timm("tf_mobilenetv3_large_100"),  # Conv2dSame, hard-swish
    "timm_mobilenetv4_conv_small": _timm("mobilenetv4_conv_small"),  # UIR blocks via ConvNormAct
    "timm_xception41": _timm("xception41"),  # aligned Xception: SeparableConv2d conv_dw -> bn_dw -> act_dw
    "timm_ghostnet_100": _timm("ghostnet_100"),  # GhostBottleneck conv_dw -> bn_dw
    "timm_efficientvit_b0": _timm("efficientvit_b0"),  # ConvNormAct conv -> norm -> act; 10 convs bare
    "tv_convnext_tiny": _tv("convnext_tiny"),  # 7x7 depthwise with bias, then LayerNorm: all bare
    "timm_legacy_xception": _timm("legacy_xception"),  # dw conv straight into the pointwise: all bare
    "timm_mixnet_s": _timm("mixnet_s"),  # the MixedConv2d branches bare
}
# The depthwise convs a network keeps as stock after convert, by the reason conversion_report gives.
LEFT_REASONS = {}  # (none today: timm's Conv2dSame of the tf_ models fuses with its "same" padding)
# The depthwise convs with no BatchNorm after them, through the op bare (DWConv2d).
BARE = {"timm_efficientvit_b0": 10, "tv_convnext_tiny": 18, "timm_legacy_xception": 34, "timm_mixnet_s": 40}


class _CountDepthwiseConvs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten.convolution calls with groups == C > 1 (depthwise) that reach the
    dispatcher, whatever module or function made them."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.convolution.default:
            x, groups = args[0], args[8]
            if groups > 1 and groups == x.shape[1]:
                self.calls += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_network(name):
    build = MODELS[name]
    torch.manual_seed(0)
    model = _randomize_bn(build()).eval()
    stock = build().eval()  # a fresh stock model: target for the converted state_dict
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), _CountDepthwiseConvs() as counter:
        ref = model(x)
    stock_sd = copy.deepcopy(model.state_dict())  # keeps _metadata (MNASNet checks its version)
    stock_keys = list(model.state_dict())
    stock_params = [n for n, _ in model.named_parameters()]
    stock_types = [(n, type(m)) for n, m in model.named_modules()]
    n_dw, n_eligible = _count_dw(model)
    assert counter.calls == n_dw  # the counter sees every depthwise conv of the stock model

    assert convert(model) is model
    n_fused = _count_fused(model)
    report = fastdw.conversion_report(model)
    n_bare = sum(isinstance(m, fastdw.DWConv2d) for m in model.modules())
    assert len(report.fused) == n_fused and len(report.bare) == n_bare == BARE.get(name, 0), str(report)
    assert n_fused + n_bare == n_eligible and len(report.left) == n_dw - n_eligible
    assert n_fused > 0 or name in ("tv_convnext_tiny", "timm_legacy_xception")
    if name in LEFT_REASONS:
        assert report.left and all(why.startswith(LEFT_REASONS[name]) for _, why in report.left), report.left
    else:
        assert n_eligible == n_dw, report.left
    # at the dispatcher, not by module names: the depthwise aten.convolution calls left
    with torch.no_grad(), _CountDepthwiseConvs() as counter:
        model(x)
    assert counter.calls == len(report.left), (counter.calls, report.left)
    with torch.no_grad():
        _assert_close(model(x), ref, "converted")

    assert list(model.state_dict()) == stock_keys
    assert [n for n, _ in model.named_parameters()] == stock_params
    model.load_state_dict(stock_sd)
    stock.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(stock(x), ref)

    # converting again is a no-op
    modules_before = list(model.modules())
    convert(model)
    assert list(model.modules()) == modules_before

    assert revert(model) is model
    assert [(n, type(m)) for n, m in model.named_modules()] == stock_types
    assert list(model.state_dict()) == stock_keys
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_convert_follows_load_to_and_deepcopy():
    """After convert the model keeps working through load_state_dict, .double() and deepcopy,
    and revert hands the current tensors back to the stock modules."""
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = tvm.mobilenet_v2(weights=None).features[:5].eval()  # stem + 4 blocks: 4 fused layers
    stock = _randomize_bn(copy.deepcopy(model), seed=1)
    x = torch.randn(2, 3, 32, 32)
    convert(model)
    assert _count_fused(model) == 4
    with torch.no_grad():
        model(x)  # fills the eval fold caches with the old statistics
        model.load_state_dict(stock.state_dict())
        _assert_close(model(x), stock(x), "after load_state_dict")

        clone = copy.deepcopy(model)
        for parent in clone.modules():
            for name, child in parent._modules.items():
                if isinstance(child, DWConvBNAct2d):
                    assert any(child.bn is m for m in clone.modules())
        _assert_close(clone(x), stock(x), "deepcopy")

        model.double(), stock.double()
        xd = x.double()
        ref = stock(xd)
        _assert_close(model(xd), ref, "double", rtol=1e-12)
        revert(model)
        assert all(p.dtype == torch.float64 for p in model.parameters())
        assert all(b.dtype == torch.float64 for b in model.buffers() if b.is_floating_point())
        assert torch.equal(model(xd), ref)


def _mv2_block():
    tv = pytest.importorskip("torchvision.models.mobilenetv2")
    return tv.InvertedResidual(16, 24, stride=2, expand_ratio=6)


def _timm_ir_block():
    blocks = pytest.importorskip("timm.models._efficientnet_blocks")
    return blocks.InvertedResidual(16, 24, dw_kernel_size=5, stride=2, exp_ratio=6, act_layer=nn.SiLU)


@pytest.mark.parametrize("block", [_mv2_block, _timm_ir_block], ids=["torchvision_mv2", "timm_ir"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_matches_stock(block, momentum):
    torch.manual_seed(0)
    stock = _randomize_bn(block())
    for m in stock.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    fused = convert(copy.deepcopy(stock))
    assert _count_fused(fused) == 1
    stock.train(), fused.train()
    truth = copy.deepcopy(stock).double()  # the stock block in fp64: the yardstick for the buffers
    opt_s = torch.optim.SGD(stock.parameters(), lr=0.1, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    opt_t = torch.optim.SGD(truth.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        x = torch.randn(4, 16, 12, 12)
        xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_s, out_f = stock(xs), fused(xf)
        out_t = truth(x.double())
        _assert_close(out_f, out_s, f"output, step {step}")
        g = torch.randn_like(out_s)
        out_s.backward(g)
        out_f.backward(g)
        out_t.backward(g.double())
        torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-4, atol=1e-5)
        for (ns, ps), (nf, pf) in zip(stock.named_parameters(), fused.named_parameters()):
            assert ns == nf
            _close(pf.grad, ps.grad, f"grad of {ns}", rtol=1e-4, atol=1e-4)
        # Buffers: those of the BatchNorms after the fused layer average values that carry the
        # previous step's rounding (lr 0.1), and stock fp32 itself is ~1e-5 off the fp64 truth
        # there; so each must be as close to the truth as the stock one (and within 1e-6 of it).
        for (ns, bs), (nf, bf), (_, bt) in zip(stock.named_buffers(), fused.named_buffers(), truth.named_buffers()):
            assert ns == nf
            if not bs.is_floating_point():
                assert torch.equal(bf, bs), ns
                continue
            err_f, err_s = (bf.double() - bt).abs().max().item(), (bs.double() - bt).abs().max().item()
            assert err_f <= 3 * err_s + 1e-6, (f"buffer {ns}, step {step}: {err_f:.3g} off the fp64 truth, the "
                                               f"stock block {err_s:.3g}")
        opt_s.step(), opt_f.step(), opt_t.step()
        opt_s.zero_grad(), opt_f.zero_grad(), opt_t.zero_grad()
        for (ns, ps), (_, pf) in zip(stock.named_parameters(), fused.named_parameters()):
            # SGD with momentum carries the fp32 rounding of the gradients (~1e-5 relative) along
            _close(pf, ps, f"param {ns} after step {step}", rtol=1e-4, atol=1e-5)
    stock.eval(), fused.eval()
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        _assert_close(fused(x), stock(x), "eval after training")


def test_frozen_batchnorm_in_training_model():
    """model.train() with BatchNorms put back in eval: the fused path with grads to gamma/beta."""
    torch.manual_seed(0)
    stock = _randomize_bn(_mv2_block()).train()
    fused = convert(copy.deepcopy(stock))
    for m in list(stock.modules()) + list(fused.modules()):
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    x = torch.randn(2, 16, 10, 10)
    out_s, out_f = stock(x), fused(x)
    _assert_close(out_f, out_s)
    out_s.square().sum().backward()
    out_f.square().sum().backward()
    for (n, ps), (_, pf) in zip(stock.named_parameters(), fused.named_parameters()):
        _close(pf.grad, ps.grad, f"grad of {n}", rtol=1e-4, atol=1e-4)
    for (n, bs), (_, bf) in zip(stock.named_buffers(), fused.named_buffers()):
        assert torch.equal(bs, bf), n


# --------------------------------------------------------------------------------------------
# What is left alone


def _seq(conv, norm, act):
    return _randomize_bn(nn.Sequential(conv, norm, act)).eval()


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: _seq(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()), id="dense"),
        pytest.param(lambda: _seq(nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16), nn.ReLU()),
                     id="multiplier2"),
        pytest.param(lambda: _seq(nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
                                  nn.BatchNorm2d(8), nn.ReLU()), id="reflect"),
        pytest.param(lambda: _seq(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.GroupNorm(2, 8), nn.ReLU()),
                     id="groupnorm"),
        pytest.param(lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.BatchNorm2d(8)),
                     id="act_before_bn"),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_unsupported_left_alone(model, request):
    """Nothing is fused; with bare=False nothing changes at all. With the default bare=True a
    plain depthwise conv that has no BatchNorm to fuse (GroupNorm after it, the activation
    first) runs through the op as a DWConv2d; the ineligible convs stay stock."""
    m = model().eval()
    types = [type(c) for c in m.modules()]
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        ref = m(x)
        convert(m, bare=False)
        assert [type(c) for c in m.modules()] == types
        assert torch.equal(m(x), ref)
        convert(m)
        assert _count_fused(m) == 0
        bare = request.node.callspec.id in ("groupnorm", "act_before_bn")
        assert isinstance(m[0], fastdw.DWConv2d) == bare
        _assert_close(m(x), ref)
        revert(m)
        assert [type(c) for c in m.modules()] == types
        assert torch.equal(m(x), ref)


def test_hooked_conv_left_alone():
    m = _seq(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
    m[0].register_forward_hook(lambda *args: None)
    convert(m)
    assert _count_fused(m) == 0


def test_unfusable_activation_kept():
    torch.manual_seed(0)
    m = _seq(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.GELU())
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        ref = m(x)
        convert(m)
        assert type(m[0]) is DWConvBNAct2d and m[0].act == "none"
        assert type(m[1]) is FoldedBatchNorm2d and type(m[2]) is nn.GELU
        _assert_close(m(x), ref)
        revert(m)
        assert [type(c) for c in m] == [nn.Conv2d, nn.BatchNorm2d, nn.GELU]


@pytest.mark.parametrize(
    "act,kind",
    [(nn.Hardtanh(0.0, 6.0), "relu6"), (nn.Hardtanh(-1.0, 1.0), "none"), (nn.Identity(), "none")],
)
def test_same_padding_and_activation_variants(act, kind):
    torch.manual_seed(0)
    m = _seq(nn.Conv2d(8, 8, 5, padding="same", dilation=2, groups=8, bias=True), nn.BatchNorm2d(8), act)
    x = torch.randn(1, 8, 13, 13)
    with torch.no_grad():
        ref = m(x)
        convert(m)
        assert type(m[0]) is DWConvBNAct2d and m[0].act == kind and m[0].padding == (4, 4)
        assert (type(m[2]) is nn.Identity) == (kind != "none" or type(act) is nn.Identity)
        _assert_close(m(x), ref)


class _CustomBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.norm(self.dw(x)))


def test_register_pattern():
    torch.manual_seed(0)
    m = _randomize_bn(_CustomBlock()).eval()
    x = torch.randn(1, 8, 7, 7)
    with torch.no_grad():
        ref = m(x)
        convert(m)
        assert _count_fused(m) == 0
        register_pattern(type(m).__module__ + "." + type(m).__qualname__, "dw", "norm")
        convert(m)
        assert type(m.dw) is DWConvBNAct2d and type(m.norm) is FoldedBatchNorm2d
        _assert_close(m(x), ref)


class _ActBlock(nn.Module):
    """conv -> bn -> act as attributes of a custom block (act_attr of register_pattern)."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.act = nn.Hardswish()

    def forward(self, x):
        return self.act(self.norm(self.dw(x)))


def test_register_pattern_with_activation_and_revert():
    torch.manual_seed(0)
    m = _randomize_bn(_ActBlock()).eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        ref = m(x)
        fastdw.register_pattern(_ActBlock, "dw", "norm", "act")
        convert(m)
        assert type(m.dw) is DWConvBNAct2d and m.dw.act == "hardswish" and type(m.act) is nn.Identity
        _assert_close(m(x), ref)
        revert(m)
        assert type(m.act) is nn.Hardswish and type(m.dw) is nn.Conv2d
        assert torch.equal(m(x), ref)


class _UnknownBlock(nn.Module):  # never registered: its conv -> bn is unknown to convert
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.norm = nn.BatchNorm2d(16)

    def forward(self, x):
        return self.norm(self.dw(x))


def test_conversion_report_reasons(capsys):
    """Every depthwise conv is either fused or listed with why not."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"), nn.BatchNorm2d(8)),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16)),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU()),
        nn.Sequential(nn.BatchNorm2d(16), nn.Conv2d(16, 16, 5, padding=2, groups=16)),
        _UnknownBlock(),
    ).eval()
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        ref = model(x)
    assert convert(model, verbose=True, bare=False) is model
    printed = capsys.readouterr().out
    rep = fastdw.conversion_report(model)
    assert rep.fused == [("0.0", "3x3 stride (1, 1) padding (1, 1) dilation (1, 1), BatchNorm + relu6")]
    why = dict(rep.left)
    assert why["1.0"] == "padding_mode='reflect' (only 'zeros' is supported)"
    assert why["2.0"].startswith("not depthwise with channel multiplier 1")
    assert why["3.0"].startswith("followed by ReLU, not a BatchNorm2d")
    assert why["4.1"] == "last module of its nn.Sequential: no BatchNorm2d after it"
    assert why["5.dw"].startswith("inside ") and "fastdw.register_pattern" in why["5.dw"]
    assert str(rep) == printed.rstrip("\n") and printed.startswith(
        "fastdw: 1 of 6 depthwise convolutions through fastdw (1 fused with their BatchNorm, 0 bare)")
    with torch.no_grad():
        _assert_close(model(x), ref)
    # bare=True (the default): the three with a plain nn.Conv2d config run through the op too
    convert(model)
    rep = fastdw.conversion_report(model)
    assert [n for n, _ in rep.bare] == ["3.0", "4.1", "5.dw"] and [n for n, _ in rep.left] == ["1.0", "2.0"]
    assert rep.bare[0][1] == "3x3 stride (1, 1) padding (1, 1) dilation (1, 1), bias, no BatchNorm"
    with torch.no_grad():
        _assert_close(model(x), ref)
    revert(model)
    assert not any(isinstance(m, (DWConvBNAct2d, fastdw.DWConv2d)) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bare_depthwise_conv_trains_like_stock(layout):
    """A depthwise conv with no BatchNorm after it (ConvNeXt's 7x7 with bias, then a norm that
    cannot be folded) runs bare through the op: forward and the gradients of x, weight and bias
    equal stock's."""
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    stock = nn.Sequential(nn.Conv2d(12, 12, 7, padding=3, groups=12), nn.GroupNorm(3, 12)).train()
    model = convert(copy.deepcopy(stock))
    assert isinstance(model[0], fastdw.DWConv2d) and list(model.state_dict()) == list(stock.state_dict())
    x = torch.randn(2, 12, 10, 9).to(memory_format=fmt)
    xs, xm = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    gy = torch.randn(2, 12, 10, 9)
    ys, ym = stock(xs), model(xm)
    _assert_close(ym, ys, "forward")
    ys.backward(gy), ym.backward(gy)
    _assert_close(xm.grad, xs.grad, "dx")
    for (n, ps), (_, pm) in zip(stock.named_parameters(), model.named_parameters()):
        _assert_close(pm.grad, ps.grad, f"d{n}")
