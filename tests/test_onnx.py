"""ONNX export of converted models (fastdw/onnx.py): the fastdw ops become standard ONNX
operators (Conv with group=C, Mul, Add, the activation), and onnxruntime gives stock's outputs."""
import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastdw
from fastdw.bench import randomize_bn

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
torchvision = pytest.importorskip("torchvision")


def _run(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


ACT_MODULES = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}


@pytest.mark.parametrize("act", list(ACT_MODULES))
@pytest.mark.parametrize("k, stride, dilation", [(3, 1, 1), (3, 2, 1), (5, 2, 1), (3, 1, 2)])
def test_plain_torch_onnx_export_of_a_converted_block(act, k, stride, dilation):
    """torch.onnx.export(..., dynamo=True) after import fastdw, no extra argument."""
    torch.manual_seed(0)
    pad = dilation * (k - 1) // 2
    stock = nn.Sequential(nn.Conv2d(12, 12, k, stride, pad, dilation=dilation, groups=12, bias=act == "silu"),
                          nn.BatchNorm2d(12), ACT_MODULES[act]())
    stock = randomize_bn(stock, 1, spread=0.3).eval()
    fused = fastdw.convert(copy.deepcopy(stock))
    assert isinstance(fused[0], fastdw.DWConvBNAct2d)
    x = torch.randn(2, 12, 11, 10)
    prog = torch.onnx.export(fused, (x,), dynamo=True, verbose=False)
    assert fastdw.onnx.registered()
    ops = {n.op_type for n in prog.model_proto.graph.node}
    assert "Conv" in ops and not any("fastdw" in n.domain for n in prog.model_proto.graph.node), ops
    with torch.no_grad():
        want = stock(x)
    assert _rel(_run(prog.model_proto, x), want) < 1e-5


def test_onnx_export_function_and_functional_op():
    """fastdw.onnx_export (the public custom_translation_table path) on the functional op, with
    scale / shift absent and a float32 weight."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 1, 3, 3))

        def forward(self, x):
            return fastdw.dwconv_bn_act(x, self.w, None, None, stride=2, padding=1, act="hardswish")

    m = M().eval()
    x = torch.randn(1, 6, 9, 9)
    prog = fastdw.onnx_export(m, (x,), verbose=False)
    with torch.no_grad():
        want = nn.functional.hardswish(nn.functional.conv2d(x, m.w, None, 2, 1, 1, 6))
    assert _rel(_run(prog.model_proto, x), want) < 1e-5
    with pytest.raises(ValueError, match="dynamo=True"):
        fastdw.onnx_export(m, (x,), dynamo=False)


def test_conv2d_same_block_exports():
    """timm's Conv2dSame (TF "same": pads (0, 0, 1, 1) at stride 2 on an even input) through
    the fused op, exported as one ONNX Conv with asymmetric pads."""
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    stock = nn.Sequential(timm_layers.Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU6())
    stock = randomize_bn(stock, 1, spread=0.3).eval()
    fused = fastdw.convert(copy.deepcopy(stock))
    assert isinstance(fused[0], fastdw.DWConvBNAct2d) and fused[0].padding == "same"
    x = torch.randn(1, 8, 12, 10)
    prog = torch.onnx.export(fused, (x,), dynamo=True, verbose=False)
    convs = [n for n in prog.model_proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1 and [list(a.ints) for a in convs[0].attribute if a.name == "pads"] == [[0, 0, 1, 1]]
    with torch.no_grad():
        want = stock(x)
    assert _rel(_run(prog.model_proto, x), want) < 1e-5


def test_converted_mobilenet_v2_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    stock = randomize_bn(torchvision.models.mobilenet_v2(weights=None), 2, spread=0.2).eval()
    fused = fastdw.convert(copy.deepcopy(stock))
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "mbv2.onnx"
    torch.onnx.export(fused, (x,), str(path), dynamo=True, verbose=False)
    import onnx

    model = onnx.load(str(path))
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 52  # 17 of them depthwise, fused
    with torch.no_grad():
        want = stock(x)
    assert _rel(_run(model, x), want) < 1e-4


def test_registration_is_lazy():
    """import fastdw does not load torch.onnx's exporter (about a second with onnxscript); the
    translations join its table when an export first asks for it."""
    code = ("import sys, fastdw\n"
            "print('torch.onnx._internal.exporter._torchlib._torchlib_registry' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]
