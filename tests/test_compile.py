"""torch.compile / export of the fused op and of converted blocks: equal to eager."""
import copy
import shutil

import pytest
import torch
from torch import nn

import fastdw
from fastdw.bench import randomize_bn

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="Inductor's CPU backend needs a C++ compiler")

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and "cuda" in fastdw.available_backends()),
        reason="needs a GPU and fastdw's CUDA kernels")),
]


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_bn(model, seed, spread=0.2)


def _block(device, train: bool):
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    blk = _randomize_bn(InvertedResidual(16, 24, stride=2, expand_ratio=6)).to(device)
    blk.train(train)
    fused = fastdw.convert(copy.deepcopy(blk))
    assert sum(isinstance(m, fastdw.DWConvBNAct2d) for m in fused.modules()) == 1
    return blk, fused


def _fwd_bwd(model, x):
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    inner = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    grads = {n: p.grad.detach().clone() for n, p in inner.named_parameters()}
    return y.detach(), x.grad.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_fullgraph_inverted_residual(device, train):
    _, fused = _block(device, train)
    x = torch.randn(2, 16, 20, 20, device=device).to(memory_format=torch.channels_last)
    eager = copy.deepcopy(fused)
    compiled_model = copy.deepcopy(fused)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True)
    y_e, gx_e, g_e = _fwd_bwd(eager, x)
    y_c, gx_c, g_c = _fwd_bwd(compiled, x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-4, atol=1e-5)
    assert g_c.keys() == g_e.keys()
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-4, atol=1e-4, msg=name)
    if train:  # running statistics advanced identically
        for (n, b_e), (_, b_c) in zip(eager.named_buffers(), compiled_model.named_buffers()):
            torch.testing.assert_close(b_c, b_e, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_op_matches_eager_and_layout(device):
    torch.manual_seed(1)
    x = torch.randn(2, 8, 9, 11, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 3, 3, device=device)
    sc, sh = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)

    def f(x, w, sc, sh):
        return fastdw.dwconv_bn_act(x, w, sc, sh, stride=2, padding=1, act="hardswish") * 2 + 1

    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True)(x, w, sc, sh)
    ref = f(x, w, sc, sh)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_compile_dynamic_two_resolutions_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    _, fused = _block("cpu", train=False)
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fused, backend=cnt, fullgraph=True, dynamic=True)
    counts = []
    with torch.no_grad():
        for hw in (20, 28, 36):
            x = torch.randn(2, 16, hw, hw).to(memory_format=torch.channels_last)
            torch.testing.assert_close(compiled(x), fused(x), rtol=1e-5, atol=1e-5)
            counts.append(cnt.frame_count)
    assert counts[0] >= 1 and counts[1:] == counts[:1] * 2, f"recompiled for new resolutions: {counts}"


def test_export_roundtrip():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 1, 3, 3))
            self.register_buffer("sc", torch.rand(6) + 0.5)
            self.register_buffer("sh", torch.randn(6))

        def forward(self, x):
            return fastdw.dwconv_bn_act(x, self.w, self.sc, self.sh, 1, 1, 1, "relu6")

    m = M()
    x = torch.randn(1, 6, 8, 8)
    ep = torch.export.export(m, (x,))
    assert any(n.target is torch.ops.fastdw.dwconv_bn_act.default for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), m(x))


@pytest.mark.skipif(not (torch.cuda.is_available() and "cuda" in fastdw.available_backends()),
                    reason="needs a GPU and fastdw's CUDA kernels")
def test_compile_reduce_overhead_cuda_graphs():
    # CUDA graphs capture on a side stream: a kernel launched on the default stream would be
    # missed or race (the extension-cpp regression).
    _, fused = _block("cuda", train=False)
    fused = fused.half().to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 32, 32, device="cuda").half().to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        ref = fused(x)
        for _ in range(3):
            y = compiled(x)
    torch.testing.assert_close(y, ref, rtol=2e-3, atol=2e-3)


def test_jit_trace_keeps_batchnorm_folding_in_the_graph():
    """torch.jit.trace under no_grad of a converted block that has already run (its fold cache
    full): the folding is traced, so the traced module follows load_state_dict like eager does
    (it once baked the cached scale / shift in as constants: relative error ~1 after new stats)."""
    blk, fused = _block("cpu", train=False)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        fused(x)  # fills the eval fold cache
        traced = torch.jit.trace(fused, (x,), check_trace=False)
        assert any("fastdw::dwconv_bn_act" in str(n.kind()) for n in traced.inlined_graph.nodes())
        torch.testing.assert_close(traced(x), blk(x), rtol=1e-5, atol=1e-5)
        new = _randomize_bn(copy.deepcopy(blk), seed=5)
        blk.load_state_dict(new.state_dict())
        traced.load_state_dict(new.state_dict())
        torch.testing.assert_close(traced(x), blk(x), rtol=1e-5, atol=1e-5)


def test_jit_script_refuses_with_a_clear_message():
    _, fused = _block("cpu", train=False)
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script.*torch\.export"):
        torch.jit.script(fused)


def test_export_artifact_loads_in_a_fresh_process(tmp_path):
    """A torch.export of a converted block, saved, loads and runs in a new Python process after
    `import fastdw` (which registers the ops), with the eager outputs; the README says so."""
    import subprocess
    import sys

    blk, fused = _block("cpu", train=False)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        want = fused(x)
    ep = torch.export.export(fused, (x,))
    assert any(n.target is torch.ops.fastdw.dwconv_bn_act.default for n in ep.graph.nodes)
    torch.export.save(ep, tmp_path / "block.pt2")
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    code = (
        "import sys, torch, fastdw\n"
        f"ep = torch.export.load({str(tmp_path / 'block.pt2')!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    got = ep.module()(io['x'])\n"
        "torch.testing.assert_close(got, io['want'], rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
