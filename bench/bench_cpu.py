"""CPU benchmark: fastdw's C++ CPU kernels vs PyTorch's own CPU block on MobileNetV2's 17
depthwise layers (Conv2d(groups=C) + eval BatchNorm2d + ReLU6, and its backward).

    pytest bench/bench_cpu.py --benchmark-columns=median,iqr --benchmark-group-by=param:layer
    FASTDW_BENCH_N=32 pytest bench/bench_cpu.py -k "inference and channels_last"

Each provider's output (or gradients) is checked against the stock block before it is timed.
"""
import os

import pytest
import torch

import fastdw
from fastdw.layers import MOBILENET_V2

from cpu_compare import stock_block  # bench/ is on sys.path when pytest collects this file

N = int(os.environ.get("FASTDW_BENCH_N", "8"))
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("provider", ["torch", "fastdw"])
@pytest.mark.parametrize("layer", MOBILENET_V2, ids=lambda L: f"L{L.index:02d}")
def test_inference(benchmark, smoke, layer, provider, layout):
    L, mf = layer, LAYOUTS[layout]
    n = 1 if smoke else N
    blk = stock_block(L, mf)
    x = torch.randn(n, L.C, L.H, L.W).to(memory_format=mf)
    scale, shift = fastdw.fold_bn(blk[1])
    w = blk[0].weight.detach()
    if provider == "torch":
        fn = lambda: blk(x)  # noqa: E731
    else:
        fn = lambda: fastdw.dwconv_bn_act(x, w, scale, shift, L.stride, L.padding, 1, "relu6", backend="cpu")  # noqa: E731
    benchmark.group = f"inference-{layout}-L{L.index:02d}"
    benchmark.extra_info.update(C=L.C, H=L.H, W=L.W, stride=L.stride, N=n)
    with torch.no_grad():
        torch.testing.assert_close(fn(), blk(x), rtol=1e-5, atol=1e-5)
        benchmark.pedantic(fn, rounds=1 if smoke else 10, warmup_rounds=0 if smoke else 2, iterations=1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("provider", ["torch", "fastdw"])
@pytest.mark.parametrize("layer", MOBILENET_V2[::4], ids=lambda L: f"L{L.index:02d}")
def test_backward(benchmark, smoke, layer, provider, layout):
    """dx, dweight, dgamma, dbeta of the eval-mode block (BN folded for fastdw), given dy."""
    L, mf = layer, LAYOUTS[layout]
    n = 1 if smoke else N
    blk = stock_block(L, mf)
    x = torch.randn(n, L.C, L.H, L.W).to(memory_format=mf).requires_grad_(True)
    params = [x, blk[0].weight, blk[1].weight, blk[1].bias]

    def fwd():
        if provider == "torch":
            return blk(x)
        scale, shift = fastdw.fold_bn(blk[1])
        return fastdw.dwconv_bn_act(x, blk[0].weight, scale, shift, L.stride, L.padding, 1, "relu6", backend="cpu")

    y = fwd()
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, dy)
    ref = torch.autograd.grad(blk(x), params, dy)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # sums over N*H*W terms
    y = fwd()
    benchmark.group = f"backward-{layout}-L{L.index:02d}"
    benchmark.extra_info.update(C=L.C, H=L.H, W=L.W, stride=L.stride, N=n)
    benchmark.pedantic(lambda: torch.autograd.grad(y, params, dy, retain_graph=True),
                       rounds=1 if smoke else 10, warmup_rounds=0 if smoke else 2, iterations=1)
