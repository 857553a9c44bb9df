"""Helpers shared by the public functions, the fake kernels and the Triton launchers."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import torch

ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "silu")
BACKENDS = ("auto", "cuda", "triton", "cpu")

IntOrPair = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], str]  # also (top, left, bottom, right), "same", "valid"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a clear usage error otherwise, never a silent default)."""
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    import argparse
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def pair(v: IntOrPair, name: str) -> Tuple[int, int]:
    """An int or a pair of ints as a (h, w) tuple of Python ints."""
    if isinstance(v, bool):
        raise TypeError(f"fastdw: {name} must be an int or a pair of ints; got {v!r}")
    if isinstance(v, int) or (isinstance(v, torch.SymInt)):
        return (v, v)
    try:
        t = tuple(v)
    except TypeError:
        raise TypeError(f"fastdw: {name} must be an int or a pair of ints; got {v!r}") from None
    if len(t) != 2 or not all(isinstance(i, (int, torch.SymInt)) and not isinstance(i, bool) for i in t):
        raise ValueError(f"fastdw: {name} must have 2 elements (h, w); got {v!r}")
    return t  # type: ignore[return-value]


def padding_arg(v) -> Tuple[int, ...]:
    """The op's padding from an int, an (h, w) pair or a (top, left, bottom, right) 4-tuple: (h, w)
    when the two sides agree (so symmetric calls keep one spelling), else the 4-tuple."""
    if isinstance(v, bool):
        raise TypeError(f"fastdw: padding must be an int, an (h, w) pair or (top, left, bottom, right); got {v!r}")
    if isinstance(v, (int, torch.SymInt)):
        return (v, v)
    try:
        t = tuple(v)
    except TypeError:
        raise TypeError("fastdw: padding must be an int, an (h, w) pair or (top, left, bottom, right); "
                        f"got {v!r}") from None
    if len(t) not in (2, 4) or not all(isinstance(i, (int, torch.SymInt)) and not isinstance(i, bool) for i in t):
        raise ValueError(f"fastdw: padding must have 2 elements (h, w) or 4 (top, left, bottom, right); got {v!r}")
    if len(t) == 4 and t[0] == t[2] and t[1] == t[3]:
        return t[:2]
    return t


def padding_ends(padding: Sequence[int]) -> Tuple[int, int, int, int]:
    """(top, left, bottom, right) of an op padding of 2 or 4 elements."""
    return (padding[0], padding[1], padding[0], padding[1]) if len(padding) == 2 else tuple(padding)


def same_padding(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                 dilation: Sequence[int]) -> Tuple[int, ...]:
    """TensorFlow's SAME padding of an (H, W) input, as an op padding: the output is ceil(size /
    stride) and the odd pixel goes to the bottom / right (timm's Conv2dSame, PyTorch's
    padding="same" at stride 1)."""
    ends = []
    for n, k, s, d in zip(size, kernel, stride, dilation):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        ends.append((total // 2, total - total // 2))
    (t, b), (l, r) = ends
    return padding_arg((t, l, b, r))


def resolve_padding(padding, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                    dilation: Sequence[int]) -> Tuple[int, ...]:
    """The op's padding for input x: (h, w), or (top, left, bottom, right) where asymmetric;
    "valid" is 0 and "same" TensorFlow's SAME for x's size (odd pixel at the bottom / right)."""
    if not isinstance(padding, str):
        return padding_arg(padding)
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if x.dim() != 4 or weight.dim() != 4:  # the op names what is wrong with the shapes
            return (0, 0)
        return same_padding(x.shape[2:], weight.shape[2:], stride, dilation)
    raise ValueError("fastdw: padding must be an int, an (h, w) pair, (top, left, bottom, right), 'same' or "
                     f"'valid'; got {padding!r}")


# Eager tensors (not fake, functional or other subclasses): their sizes are plain ints, and
# nothing but the op's own kernel needs to see a call on them.
EAGER_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout rule, mirrored from csrc/dwconv_bn_act_host.h (use_channels_last).

    channels_last when x is channels_last-contiguous and not also contiguous (C == 1 or
    H == W == 1 make both true: contiguous wins), else contiguous. Every output and input
    gradient of the op follows it.
    """
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def conv_out_size(size, k, s, p, d, p_end=None):
    """Output extent for padding p before and p_end (default p) after."""
    return (size + p + (p if p_end is None else p_end) - d * (k - 1) - 1) // s + 1


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    act: str,
) -> Tuple[int, int]:
    """Validate a dwconv_bn_act call exactly as the C++ host code does; return (OH, OW).

    Uses torch._check_* so that it also runs on fake tensors with symbolic sizes. The messages
    match csrc/dwconv_bn_act_host.h.
    """
    torch._check_value(
        act in ACTIVATIONS,
        lambda: f"fastdw: act must be one of 'none', 'relu', 'relu6', 'hardswish', 'silu'; got '{act}'",
    )
    torch._check_value(x.dim() == 4, lambda: f"fastdw: x must be a 4-D (N, C, H, W) tensor; got {x.dim()}-D "
                                           f"with shape {list(x.shape)}")
    torch._check_type(
        x.dtype in _FLOAT_DTYPES and (x.dtype != torch.float64 or x.device.type in ("cpu", "meta")),
        lambda: f"fastdw: x must be float32, float16 or bfloat16 (or float64 on the CPU); got {x.dtype}",
    )
    C = x.shape[1]
    torch._check_value(weight.dim() == 4, lambda: f"fastdw: weight must be (C, 1, kH, kW); got a {weight.dim()}-D "
                                                f"tensor of shape {list(weight.shape)}")
    torch._check_value(weight.shape[1] == 1, lambda: "fastdw: weight must be (C, 1, kH, kW) (depthwise: one input "
                                                   f"channel per group); got shape {list(weight.shape)}")
    wc = weight.shape[0]
    is_mult = C > 0 and wc > C and wc % C == 0
    torch._check_value(not is_mult, lambda: "fastdw: channel multiplier must be 1 (out_channels == in_channels == "
                                          f"groups); got weight with {wc} output channels for C = {C} "
                                          f"(multiplier {wc // C if is_mult else 1})")
    torch._check_value(wc == C, lambda: f"fastdw: weight must be (C, 1, kH, kW) with C == x.size(1) = {C}; "
                                      f"got shape {list(weight.shape)}")
    kh, kw = weight.shape[2], weight.shape[3]
    torch._check_value(kh >= 1 and kw >= 1, lambda: f"fastdw: kernel size must be >= 1; got weight shape "
                                                  f"{list(weight.shape)}")
    torch._check_type(weight.dtype in (x.dtype, torch.float32),
                      lambda: f"fastdw: weight must be float32 or x's dtype ({x.dtype}); got {weight.dtype}")
    torch._check_value(weight.device == x.device, lambda: f"fastdw: weight must be on the same device as x "
                                                        f"({x.device}); got {weight.device}")
    check_channel_vectors(x, scale=scale, shift=shift)
    for name, v, lo in (("stride", stride, 1), ("dilation", dilation, 1)):
        torch._check_value(len(v) == 2, lambda: f"fastdw: {name} must have 2 elements (h, w); got {list(v)}")
        torch._check_value(v[0] >= lo and v[1] >= lo, lambda: f"fastdw: {name} must be >= {lo}; got {list(v)}")
    torch._check_value(len(padding) in (2, 4), lambda: "fastdw: padding must have 2 elements (h, w) or 4 (top, "
                                                     f"left, bottom, right); got {list(padding)}")
    torch._check_value(all(e >= 0 for e in padding), lambda: f"fastdw: padding must be >= 0; got {list(padding)}")
    pt, pl, pb, pr = padding_ends(padding)
    H, W = x.shape[2], x.shape[3]
    ekh, ekw = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    torch._check_value(
        ekh <= H + pt + pb and ekw <= W + pl + pr,
        lambda: "fastdw: kernel larger than the padded input: effective kernel (dilation*(k-1)+1) is "
                f"{ekh}x{ekw} but the padded input (H + top + bottom padding, W + left + right padding) is "
                f"{H + pt + pb}x{W + pl + pr}",
    )
    return (conv_out_size(H, kh, stride[0], pt, dilation[0], pb),
            conv_out_size(W, kw, stride[1], pl, dilation[1], pr))


def check_channel_vectors(x: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """Per-channel tensors (scale, shift, bias, gamma, beta, ...): None, or (C,) in float32 or x's
    dtype on x's device. Messages match check_vector_param in csrc/dwconv_bn_act_host.h."""
    C = x.shape[1]
    for name, t in tensors.items():
        if t is None:
            continue
        torch._check_value(t.dim() == 1 and t.shape[0] == C,
                           lambda: f"fastdw: {name} must be a 1-D tensor of C = {C} elements (one per channel); "
                                   f"got shape {list(t.shape)}")
        torch._check_type(t.dtype in (torch.float32, x.dtype),
                          lambda: f"fastdw: {name} must be float32 or x's dtype ({x.dtype}); got {t.dtype}")
        torch._check_value(t.device == x.device, lambda: f"fastdw: {name} must be on the same device as x "
                                                       f"({x.device}); got {t.device}")


def check_train_args(x, weight, bias, gamma, beta, stride, padding, dilation, eps, act) -> Tuple[int, int]:
    """Validate a dwconv_bn_act_train call as csrc/dwconv_bn_act_host.h (check_train_and_fill) does;
    return (OH, OW)."""
    oh_ow = check_args(x, weight, None, None, stride, padding, dilation, act)
    check_channel_vectors(x, bias=bias, gamma=gamma, beta=beta)
    torch._check_value(eps >= 0, lambda: f"fastdw: eps must be >= 0; got {eps}")
    return oh_ow


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the batch mean / variance of the training op: float32 (float64 for float64 x)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def deterministic_requested() -> bool:
    return torch.are_deterministic_algorithms_enabled() or env_flag("FASTDW_DETERMINISTIC")
