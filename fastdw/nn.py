"""Modules around the fused op: BatchNorm folding and the fused depthwise conv + BN + act layer.

`DWConvBNAct2d` computes `act(bn(conv2d(x, weight, groups=C)))`. With BatchNorm running
statistics (eval) the BN is folded into a per-channel (scale, shift) and the whole block is one
call to `fastdw.dwconv_bn_act`. With batch statistics (training, or no running statistics) it is
one call to `fastdw.dwconv_bn_act_train`, and the module updates the running statistics from the
returned batch mean and variance as `nn.BatchNorm2d` does (momentum, cumulative averaging with
momentum=None, unbiased variance, num_batches_tracked, track_running_stats=False).
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import _pair

from ._utils import conv_out_size, padding_arg, padding_ends, same_padding


def _tracing() -> bool:
    """Inside torch.compile / torch.export (dynamo) or torch.jit.trace: no cached tensors."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _not_scriptable(self):
    raise RuntimeError(
        f"fastdw: {type(self).__name__} cannot be compiled by torch.jit.script (TorchScript cannot "
        "compile its Python dispatch to the fastdw ops). Use torch.export.export (or "
        "torch.compile) for a graph, or torch.jit.trace, which records the fastdw ops and keeps the "
        "BatchNorm folding in the graph.")

__all__ = ["fold_bn", "activation_kind", "FoldedBatchNorm2d", "DWConvBNAct2d"]

# Activation kinds of the op, with the functional form used after batch-statistics BatchNorm.
_ACT_FN = {
    "none": None,
    "relu": F.relu,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
    "silu": F.silu,
}

_TIMM_BN_ACT = "timm.layers.norm_act.BatchNormAct2d"
_TIMM_CONV_SAME = "timm.layers.conv2d_same.Conv2dSame"


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def activation_kind(module: Optional[nn.Module]) -> Optional[str]:
    """The op's activation kind for an activation module, or None if it cannot be fused.

    `nn.ReLU` -> "relu", `nn.ReLU6` and `nn.Hardtanh(0, 6)` -> "relu6", `nn.Hardswish` ->
    "hardswish", `nn.SiLU` -> "silu", `nn.Identity` or None -> "none". Types are matched
    exactly: a subclass may override forward.
    """
    if module is None:
        return "none"
    t = type(module)
    if t is nn.Identity:
        return "none"
    if t is nn.ReLU:
        return "relu"
    if t is nn.ReLU6:
        return "relu6"
    if t is nn.Hardtanh and module.min_val == 0.0 and module.max_val == 6.0:
        return "relu6"
    if t is nn.Hardswish:
        return "hardswish"
    if t is nn.SiLU:
        return "silu"
    return None


def _check_act(act: str) -> str:
    if act not in _ACT_FN:
        raise ValueError(f"act must be one of {tuple(_ACT_FN)}; got {act!r}")
    return act


def fold_bn(bn: _BatchNorm, conv_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an inference BatchNorm (and the preceding conv's bias) into a per-channel affine.

    bn: a BatchNorm with running statistics; conv_bias: (C,) or None (treated as 0).
    Returns (scale, shift), each (C,) fp32 for fp32/fp16/bf16 modules (fp64 for an fp64 module):
    `scale = gamma / sqrt(running_var + eps)`, `shift = beta + (bias - running_mean) * scale`,
    with gamma = 1, beta = 0 when `bn.affine` is False. Differentiable in gamma, beta and bias.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot fold {type(bn).__name__}: it has no running statistics "
            "(track_running_stats=False), so it normalises with batch statistics"
        )
    # Never fold in half precision; keep fp64 exact for fp64 gradchecks.
    dt = torch.promote_types(torch.float32, bn.running_var.dtype)
    std = torch.sqrt(bn.running_var.to(dt) + bn.eps)
    scale = 1.0 / std if bn.weight is None else bn.weight.to(dt) / std
    mean = bn.running_mean.to(dt)
    shift = (-mean if conv_bias is None else conv_bias.to(dt) - mean) * scale
    if bn.bias is not None:
        shift = bn.bias.to(dt) + shift
    return scale, shift


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """Placeholder left in the slot of a BatchNorm fused into the preceding depthwise conv.

    Its forward is the identity: the fused `DWConvBNAct2d` reads the statistics and affine
    parameters from it. It holds the same Parameter and buffer objects as the BatchNorm it
    replaces, under the same names, so state_dict keys, loading, `.to()` and optimizers see
    the same state as before. Accepts `nn.BatchNorm2d` and timm's `BatchNormAct2d` (whose
    act/drop children have no state; the act is absorbed by the fused module).
    """

    def __init__(self, bn: nn.BatchNorm2d):
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"FoldedBatchNorm2d wraps an nn.BatchNorm2d; got {type(bn).__name__}")
        # Built on meta so nothing is allocated; the original's tensors replace the placeholders.
        super().__init__(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            device="meta",
        )
        self._parameters.clear()
        self._parameters.update(bn._parameters)
        self._buffers.clear()
        self._buffers.update(bn._buffers)
        self._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return super().extra_repr() + ", folded"


class DWConvBNAct2d(nn.Module):
    """Depthwise Conv2d (groups=C) + BatchNorm2d + activation, fused.

    x: (N, C, H, W), contiguous or channels_last; returns (N, C, H_out, W_out) in x's dtype and
    memory format. Parameters: `weight` (C, 1, kH, kW), optional `bias` (C,), and the BatchNorm
    `bn` (a child module when built standalone; an unregistered reference to the
    `FoldedBatchNorm2d` in the parent's BN slot when built by `fastdw.convert`).
    padding: None (k // 2 per side, dilation included), an int, (h, w), (top, left, bottom,
    right), "valid", or "same": TensorFlow's SAME worked out per input size (timm's Conv2dSame).
    act: one of "none", "relu", "relu6", "hardswish", "silu".
    backend: passed to `fastdw.dwconv_bn_act` ("auto", "cuda", "triton", "cpu").
    """

    __prepare_scriptable__ = _not_scriptable  # torch.jit.script: a clear error, not a parse failure

    def __init__(
        self,
        channels: int,
        kernel_size=3,
        stride=1,
        padding=None,
        dilation=1,
        bias: bool = False,
        act: str = "relu6",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        kernel_size, dilation = _pair(kernel_size), _pair(dilation)
        if padding is None:
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))
        self._configure(channels, kernel_size, stride, padding, dilation, act, backend)
        self.weight = nn.Parameter(torch.empty(channels, 1, *kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, **factory)
        self.reset_parameters()

    def _configure(self, channels, kernel_size, stride, padding, dilation, act, backend):
        self.channels = channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _module_padding(padding)
        self.dilation = _pair(dilation)
        self.act = _check_act(act)
        self.backend = backend
        self.__dict__["_fold_cache"] = None
        self.__dict__["_pack_cache"] = None
        self.__dict__["_fastdw_orig"] = None

    def reset_parameters(self) -> None:
        """Initialise weight and bias as `nn.Conv2d` does (fan_in = kH * kW)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_modules(
        cls,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        act="none",
        backend: str = "auto",
        bn_slot: Optional[FoldedBatchNorm2d] = None,
    ) -> "DWConvBNAct2d":
        """Build the fused layer around an existing depthwise conv and BatchNorm.

        conv: `nn.Conv2d` with groups == in_channels == out_channels, padding_mode "zeros";
        its `weight`/`bias` Parameters become this module's own `weight`/`bias` (same objects).
        bn: `nn.BatchNorm2d` with num_features == C. If `bn_slot` (a `FoldedBatchNorm2d` that
        lives in the BN's slot of the parent) is given, the BatchNorm state is read from it
        through an unregistered reference, so the parent's state_dict keys do not change;
        otherwise `bn` is registered as the child `bn`.
        act: an activation kind string (or a supported activation module).
        """
        config = conv_config(conv)
        if isinstance(config, str):
            raise ValueError(f"cannot fuse {conv}: {config}")
        if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != config["channels"]:
            raise ValueError(f"expected a BatchNorm2d with {config['channels']} features; got {bn}")
        if not isinstance(act, str):
            kind = activation_kind(act)
            if kind is None:
                raise ValueError(f"activation {act} cannot be fused")
            act = kind
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._configure(act=act, backend=backend, **config)
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)
        if bn_slot is not None:
            self.__dict__["bn"] = bn_slot
        else:
            self.bn = bn
        self.training = conv.training
        return self

    def _fold_key(self, bn):
        key = [id(bn), bn.eps]
        try:
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var, self.bias):
                key.append(None if t is None else (id(t), t._version, t.data_ptr(), t.device, t.dtype))
        except RuntimeError:  # inference tensors have no version counter: do not cache
            return None
        return tuple(key)

    def _cache_key(self, bn):
        """The fold cache's key, or None where nothing may be cached: inside autograd (a cached
        result would detach the BN parameters from the graph) and tracing (dynamo must see the
        folding as part of the graph, and torch.jit.trace would bake a cached result in as
        constants, stale after load_state_dict; traced, the parameters and buffers stay inputs
        of the graph), and for inference tensors."""
        if torch.is_grad_enabled() or _tracing():
            return None
        return self._fold_key(bn)

    def _folded(self, bn, key) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of the BatchNorm, cached under `key` (from _cache_key; None: no cache)."""
        if key is None:
            return fold_bn(bn, self.bias)
        cache = self._fold_cache
        if cache is not None and cache[0] == key:
            return cache[1], cache[2]
        scale, shift = fold_bn(bn, self.bias)
        self.__dict__["_fold_cache"] = (key, scale, shift)
        return scale, shift

    def _use_prepacked(self, x: torch.Tensor) -> bool:
        """Whether inference passes the packed parameters (fastdw.prepack_params), cached: on
        the CUDA backend, outside autograd and tracing, where it saves the pack launch."""
        from .ops import resolve_backend

        return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
                and not torch.is_grad_enabled() and not _tracing()
                and resolve_backend(self.backend, x.device) == "cuda")

    def _prepacked(self, key, scale, shift):
        """(weight, scale, shift) as views of one packed buffer, cached while the weight, the
        BatchNorm parameters and buffers and the conv bias are unchanged (the fold cache's key
        plus the weight's identity, version and storage)."""
        from .ops import prepack_params

        if key is not None:
            w = self.weight
            try:
                key = key + ((id(w), w._version, w.data_ptr(), w.device, w.dtype),)
            except RuntimeError:  # an inference tensor: no version counter
                key = None
        cache = self._pack_cache
        if key is not None and cache is not None and cache[0] == key:
            return cache[1]
        packed = prepack_params(self.weight, scale, shift)
        if key is not None:
            self.__dict__["_pack_cache"] = (key, packed)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .ops import dwconv_bn_act

        x = _autocast_input(x)
        bn = self.bn
        if bn.training or bn.running_mean is None or bn.running_var is None:
            return self._forward_batch_stats(x, bn)
        key = self._cache_key(bn)  # (one key for the fold and the pack caches)
        scale, shift = self._folded(bn, key)
        if scale.dtype != x.dtype and scale.dtype != torch.float32:  # fp64 BN, lower-precision x
            scale, shift = scale.float(), shift.float()
        weight = self.weight
        if self._use_prepacked(x):
            weight, scale, shift = self._prepacked(key, scale, shift)
        return dwconv_bn_act(
            x, weight, scale, shift,
            stride=self.stride, padding=_input_padding(self, x), dilation=self.dilation,
            act=self.act, backend=self.backend,
        )

    def _forward_batch_stats(self, x: torch.Tensor, bn: _BatchNorm) -> torch.Tensor:
        """BatchNorm with batch statistics through the fused training op, and the running
        statistics updated from its (mean, var) exactly as `_BatchNorm.forward` does."""
        from .ops import dwconv_bn_act_train

        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        update = bn.training and bn.track_running_stats and bn.running_mean is not None
        N, C = x.shape[0], x.shape[1]
        padding = _input_padding(self, x)
        pt, pl, pb, pr = padding_ends(padding)
        oh = conv_out_size(x.shape[2], self.kernel_size[0], self.stride[0], pt, self.dilation[0], pb)
        ow = conv_out_size(x.shape[3], self.kernel_size[1], self.stride[1], pl, self.dilation[1], pr)
        count = N * oh * ow
        if count == 1:  # what F.batch_norm says, about the BatchNorm's input (the conv output)
            raise ValueError("Expected more than 1 value per channel when training, got input size "
                             f"{torch.Size([N, C, oh, ow])}")
        gamma, beta, bias = bn.weight, bn.bias, self.bias
        lowp = (gamma, beta, bias)
        if any(t is not None and t.dtype not in (torch.float32, x.dtype) for t in lowp):  # fp64 BN, fp32 x
            gamma, beta, bias = (None if t is None else t.float() for t in lowp)
        y, mean, var = dwconv_bn_act_train(
            x, self.weight, bias, gamma, beta,
            stride=self.stride, padding=padding, dilation=self.dilation,
            eps=bn.eps, act=self.act, backend=self.backend,
        )
        if update and count > 0:
            with torch.no_grad():
                rm, rv = bn.running_mean, bn.running_var
                unbiased = var * (count / (count - 1))
                rm.copy_(factor * mean + (1.0 - factor) * rm)
                rv.copy_(factor * unbiased + (1.0 - factor) * rv)
        return y

    def extra_repr(self) -> str:
        s = (
            f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding!r}, dilation={self.dilation}, act={self.act!r}, backend={self.backend!r}"
        )
        if self.bias is not None:
            s += ", bias=True"
        if "bn" in self.__dict__:
            s += ", bn=<folded in parent slot>"
        return s


class DWConv2d(nn.Module):
    """A depthwise Conv2d (groups=C, channel multiplier 1) with no BatchNorm after it, through the
    fastdw op (act "none", the conv bias as the shift): what `fastdw.convert` puts in the place
    of a depthwise conv it cannot fuse with a BatchNorm (ConvNeXt, original Xception, the
    branches of timm's MixedConv2d, ...). It owns the conv's `weight` / `bias` Parameters (same
    objects, same state_dict keys); `fastdw.revert` puts the conv back.
    """

    __prepare_scriptable__ = _not_scriptable

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, backend: str = "auto") -> "DWConv2d":
        config = conv_config(conv)
        if isinstance(config, str):
            raise ValueError(f"cannot run {conv} through fastdw: {config}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.channels = config["channels"]
        self.kernel_size, self.stride = config["kernel_size"], config["stride"]
        self.padding, self.dilation = config["padding"], config["dilation"]
        self.backend = backend
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)
        self.training = conv.training
        self.__dict__["_fastdw_orig"] = None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .ops import dwconv_bn_act

        return dwconv_bn_act(_autocast_input(x), self.weight, None, self.bias, stride=self.stride,
                             padding=_input_padding(self, x), dilation=self.dilation, act="none",
                             backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}, "
                f"dilation={self.dilation}, bias={self.bias is not None}, backend={self.backend!r}")


def _module_padding(padding):
    """A layer's padding: "same" (TensorFlow's SAME, worked out per input size: timm's
    Conv2dSame), else the op's (h, w) or (top, left, bottom, right) tuple ("valid" is 0)."""
    if padding == "same":
        return "same"
    if padding == "valid":
        return (0, 0)
    return padding_arg(padding)


def _input_padding(layer: nn.Module, x: torch.Tensor):
    """The op's padding of `layer` for input x."""
    if layer.padding == "same":
        return same_padding(x.shape[2:], layer.kernel_size, layer.stride, layer.dilation)
    return layer.padding


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, a float32 input is cast to the autocast dtype, as autocast does for the
    conv2d this layer replaces (weight and BatchNorm parameters stay float32: the op takes them)."""
    dev = x.device.type
    if x.dtype == torch.float32 and dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return x.to(torch.get_autocast_dtype(dev))
    return x


def conv_config(conv: nn.Module):
    """Fusion parameters of a depthwise conv as a dict, or a string saying why it cannot be fused.

    Eligible: exactly `nn.Conv2d` (any padding: integers, "valid", "same", asymmetric for an even
    effective kernel) or timm's `Conv2dSame` (TensorFlow's SAME, worked out per input size; other
    subclasses may override forward), groups == in_channels == out_channels, padding_mode "zeros".
    """
    same_dynamic = _qualname(type(conv)) == _TIMM_CONV_SAME
    if type(conv) is not nn.Conv2d and not same_dynamic:
        return f"{type(conv).__name__} is not exactly nn.Conv2d"
    c = conv.in_channels
    if not (conv.groups == c == conv.out_channels):
        return (
            f"not depthwise with channel multiplier 1 (in_channels={c}, "
            f"out_channels={conv.out_channels}, groups={conv.groups})"
        )
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
    padding = conv.padding
    if same_dynamic:  # Conv2dSame pads for SAME in forward and hands F.conv2d (0, 0), whatever its padding
        padding = "same"
    elif padding == "valid":
        padding = (0, 0)
    elif padding == "same":  # stride 1 (nn.Conv2d's rule): the odd pixel at the bottom / right
        ends = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(conv.kernel_size, conv.dilation)]
        padding = padding_arg((ends[0][0], ends[1][0], ends[0][1], ends[1][1]))
    return {
        "channels": c,
        "kernel_size": tuple(conv.kernel_size),
        "stride": tuple(conv.stride),
        "padding": padding if padding == "same" else tuple(padding),
        "dilation": tuple(conv.dilation),
    }


def bn_activation(bn: nn.Module, channels: int) -> Optional[str]:
    """Activation kind carried inside an eligible BatchNorm ("none" for plain BatchNorm2d),
    or None if the module is not a BatchNorm that can be fused after a C-channel conv.

    Eligible: exactly `nn.BatchNorm2d`, or timm's `BatchNormAct2d` whose `drop` is Identity and
    whose `act` is a supported activation or Identity.
    """
    if type(bn) is nn.BatchNorm2d:
        kind = "none"
    elif _qualname(type(bn)) == _TIMM_BN_ACT:
        if set(bn._modules) - {"act", "drop"} or type(getattr(bn, "drop", None)) is not nn.Identity:
            return None
        kind = activation_kind(getattr(bn, "act", None))
    else:
        return None
    if bn.num_features != channels:
        return None
    return kind
