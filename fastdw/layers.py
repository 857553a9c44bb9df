"""Real depthwise layers: the shapes benchmarks and tests use (never inline constants).

Each entry is a `DWLayer(net, index, C, H, W, k, stride, act)` for a 224x224 input; `H`, `W` are
the layer's input size. `extract_dw_layers(model, input_size)` reads the same facts off a live
model with forward hooks; tests check that the tables below equal what it finds in torchvision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn


@dataclass(frozen=True)
class DWLayer:
    net: str
    index: int  # 1-based, in forward order
    C: int
    H: int
    W: int
    k: int
    stride: int
    act: str

    @property
    def padding(self) -> int:
        return (self.k - 1) // 2

    def out_hw(self):
        oh = (self.H + 2 * self.padding - self.k) // self.stride + 1
        ow = (self.W + 2 * self.padding - self.k) // self.stride + 1
        return oh, ow

    @property
    def name(self) -> str:
        return f"{self.net}.{self.index:02d}-c{self.C}-{self.H}x{self.W}-k{self.k}s{self.stride}"


def _table(net: str, act: str, rows) -> List[DWLayer]:
    return [DWLayer(net, i + 1, r[0], r[1], r[1], r[2], r[3], r[4] if len(r) > 4 else act)
            for i, r in enumerate(rows)]


# (C, H=W at the layer input, k, stride[, act])
MOBILENET_V2 = _table("mobilenet_v2", "relu6", [
    (32, 112, 3, 1), (96, 112, 3, 2), (144, 56, 3, 1), (144, 56, 3, 2), (192, 28, 3, 1),
    (192, 28, 3, 1), (192, 28, 3, 2), (384, 14, 3, 1), (384, 14, 3, 1), (384, 14, 3, 1),
    (384, 14, 3, 1), (576, 14, 3, 1), (576, 14, 3, 1), (576, 14, 3, 2), (960, 7, 3, 1),
    (960, 7, 3, 1), (960, 7, 3, 1),
])

MOBILENET_V3_LARGE = _table("mobilenet_v3_large", "relu", [
    (16, 112, 3, 1), (64, 112, 3, 2), (72, 56, 3, 1), (72, 56, 5, 2), (120, 28, 5, 1),
    (120, 28, 5, 1), (240, 28, 3, 2, "hardswish"), (200, 14, 3, 1, "hardswish"),
    (184, 14, 3, 1, "hardswish"), (184, 14, 3, 1, "hardswish"), (480, 14, 3, 1, "hardswish"),
    (672, 14, 3, 1, "hardswish"), (672, 14, 5, 2, "hardswish"), (960, 7, 5, 1, "hardswish"),
    (960, 7, 5, 1, "hardswish"),
])

EFFICIENTNET_B0 = _table("efficientnet_b0", "silu", [
    (32, 112, 3, 1), (96, 112, 3, 2), (144, 56, 3, 1), (144, 56, 5, 2), (240, 28, 5, 1),
    (240, 28, 3, 2), (480, 14, 3, 1), (480, 14, 3, 1), (480, 14, 5, 1), (672, 14, 5, 1),
    (672, 14, 5, 1), (672, 14, 5, 2), (1152, 7, 5, 1), (1152, 7, 5, 1), (1152, 7, 5, 1),
    (1152, 7, 3, 1),
])

# Xception (Chollet 2017; timm's legacy_xception) at its 299x299 input: separable convs, the
# depthwise conv feeds the pointwise conv directly (no BN or activation in between: act "none").
# Entry flow 6, middle flow 8 blocks x 3 at 728 channels and 19x19, exit flow 4.
XCEPTION = _table("xception", "none", [
    (64, 147, 3, 1), (128, 147, 3, 1), (128, 74, 3, 1), (256, 74, 3, 1), (256, 37, 3, 1), (728, 37, 3, 1),
    *[(728, 19, 3, 1)] * 24,
    (728, 19, 3, 1), (728, 19, 3, 1), (1024, 10, 3, 1), (1536, 10, 3, 1),
])

NETWORKS: Dict[str, List[DWLayer]] = {
    "mobilenet_v2": MOBILENET_V2,
    "mobilenet_v3_large": MOBILENET_V3_LARGE,
    "efficientnet_b0": EFFICIENTNET_B0,
    "xception": XCEPTION,
}

INPUT_SIZE = {"mobilenet_v2": 224, "mobilenet_v3_large": 224, "efficientnet_b0": 224, "xception": 299}


def unique_layers(layers: List[DWLayer]) -> List[DWLayer]:
    """The first layer of each distinct (C, H, W, k, stride, act): what a sweep needs to time
    (Xception's middle flow is one shape 24 times)."""
    seen, out = set(), []
    for L in layers:
        key = (L.C, L.H, L.W, L.k, L.stride, L.act)
        if key not in seen:
            seen.add(key)
            out.append(L)
    return out

_ACT_KIND = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu"}


def extract_dw_layers(model: nn.Module, net: str = "model", input_size: int = 224) -> List[DWLayer]:
    """Depthwise Conv2d layers of `model` in forward order, with their input sizes, read with hooks.

    The activation is the one that directly follows the conv's BatchNorm in the same
    nn.Sequential (torchvision's Conv2dNormActivation), else 'none'.
    """
    acts = {}
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            kids = list(seq)
            for i, m in enumerate(kids):
                if isinstance(m, nn.Conv2d):
                    nxt = kids[i + 2] if i + 2 < len(kids) else None
                    acts[id(m)] = _ACT_KIND.get(type(nxt), "none")
    found = []
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1:
            def hook(mod, inp, out, m=m):
                x = inp[0]
                found.append((m.in_channels, x.shape[2], x.shape[3], m.kernel_size[0], m.stride[0],
                              acts.get(id(m), "none")))
            hooks.append(m.register_forward_hook(hook))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return [DWLayer(net, i + 1, c, h, w, k, s, a) for i, (c, h, w, k, s, a) in enumerate(found)]
