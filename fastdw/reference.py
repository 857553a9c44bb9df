"""Pure-PyTorch references for fastdw's ops: the truth that tests and benchmarks compare against.

`dwconv_bn_act_ref` computes `act(conv2d(x, weight, groups=C) * scale + shift)` with stock
PyTorch ops. By default it computes in fp32 from the given (possibly low-precision) inputs and
returns fp32 (`compute_dtype=torch.float32`); pass `compute_dtype=x.dtype` for what stock
PyTorch itself produces in that dtype (the error yardstick of the tests).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._utils import IntOrPair, Padding, pair, resolve_padding


def _conv(x, weight, bias, stride, padding, dilation):
    """Depthwise F.conv2d under the op's padding rules (2 or 4 pads, "same", "valid"); asymmetric
    pads as an explicit F.pad, as timm's Conv2dSame does."""
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    padding = resolve_padding(padding, x, weight, stride, dilation)
    if len(padding) == 4:
        top, left, bottom, right = padding
        x, padding = F.pad(x, (left, right, top, bottom)), (0, 0)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])

_ACT_FNS = {
    "none": lambda u: u,
    "relu": F.relu,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
    "silu": F.silu,
}


def activation(u: torch.Tensor, act: str) -> torch.Tensor:
    try:
        return _ACT_FNS[act](u)
    except KeyError:
        raise ValueError(f"fastdw: act must be one of {tuple(_ACT_FNS)}; got {act!r}") from None


def dwconv_bn_act_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: Padding = 1,
    dilation: IntOrPair = 1,
    act: str = "relu6",
    compute_dtype: Optional[torch.dtype] = torch.float32,
) -> torch.Tensor:
    """Reference forward. x: (N, C, H, W); weight: (C, 1, kH, kW); scale, shift: (C,) or None.

    Returns the result in `compute_dtype` (fp32 by default; fp64 inputs stay fp64), or in
    x.dtype when `compute_dtype` is None or x.dtype.
    """
    cd = x.dtype if compute_dtype is None else compute_dtype
    if x.dtype == torch.float64:
        cd = torch.float64
    C = x.shape[1]
    z = _conv(x.to(cd), weight.to(cd), None, stride, padding, dilation)
    if scale is not None:
        z = z * scale.to(cd).view(1, C, 1, 1)
    if shift is not None:
        z = z + shift.to(cd).view(1, C, 1, 1)
    return activation(z, act)


def fold_bn_ref(running_mean, running_var, gamma, beta, eps, conv_bias=None):
    """(scale, shift) in fp32 from BatchNorm statistics: the formulas of DESIGN.md."""
    scale = (gamma.float() if gamma is not None else 1.0) / torch.sqrt(running_var.float() + eps)
    b = conv_bias.float() if conv_bias is not None else 0.0
    shift = (beta.float() if beta is not None else 0.0) + (b - running_mean.float()) * scale
    return scale, shift


def dwconv_bn_act_train_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    gamma: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: Padding = 1,
    dilation: IntOrPair = 1,
    eps: float = 1e-5,
    act: str = "relu6",
    compute_dtype: Optional[torch.dtype] = torch.float32,
):
    """Reference of the training op: (y, mean, var) with y = act(batch_norm(conv2d(x, w) + bias))
    using the batch mean and biased variance over (N, OH, OW), all in `compute_dtype` (fp32 by
    default; fp64 inputs stay fp64). Differentiable through all three outputs."""
    cd = x.dtype if compute_dtype is None else compute_dtype
    if x.dtype == torch.float64:
        cd = torch.float64
    C = x.shape[1]
    z = _conv(x.to(cd), weight.to(cd), None if bias is None else bias.to(cd), stride, padding, dilation)
    mean = z.mean(dim=(0, 2, 3))
    var = z.var(dim=(0, 2, 3), unbiased=False)
    u = (z - mean.view(1, C, 1, 1)) * torch.rsqrt(var + eps).view(1, C, 1, 1)
    if gamma is not None:
        u = u * gamma.to(cd).view(1, C, 1, 1)
    if beta is not None:
        u = u + beta.to(cd).view(1, C, 1, 1)
    return activation(u, act), mean, var
