"""Model surgery: replace depthwise Conv2d + BatchNorm2d (+ activation) with `DWConvBNAct2d`.

The "slot" scheme keeps state_dict keys and parameter names unchanged. For a fused triple found
in a parent module:

    parent.<conv slot> = DWConvBNAct2d   owns conv.weight / conv.bias (same Parameter objects)
    parent.<bn slot>   = FoldedBatchNorm2d   holds the BN's Parameters and buffers, identity forward
    parent.<act slot>  = nn.Identity()   only when a separate activation module was absorbed

The original modules are kept (unregistered) on the fused module, so `revert` can put them back.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple, Union

from torch import nn

from .nn import DWConvBNAct2d, FoldedBatchNorm2d, _qualname, activation_kind, bn_activation, conv_config

__all__ = ["convert", "revert", "register_pattern"]

# Block classes whose forward runs `<conv attr>` straight into `<bn attr>`, keyed by
# `module.qualname` of the class (exact type: a subclass may change the forward).
_PATTERNS: Dict[str, List[Tuple[str, str]]] = {}


def register_pattern(cls_qualname: Union[str, type], conv_attr: str, bn_attr: str) -> None:
    """Declare that blocks of class `cls_qualname` feed child `conv_attr` directly into `bn_attr`.

    cls_qualname: `type(m).__module__ + "." + type(m).__qualname__` (or the class itself).
    Only exact instances of that class are searched; a block may have several patterns.
    """
    if isinstance(cls_qualname, type):
        cls_qualname = _qualname(cls_qualname)
    pairs = _PATTERNS.setdefault(cls_qualname, [])
    if (conv_attr, bn_attr) not in pairs:
        pairs.append((conv_attr, bn_attr))


# timm (checked against timm 1.0): the BN is a BatchNormAct2d carrying the activation.
register_pattern("timm.models._efficientnet_blocks.DepthwiseSeparableConv", "conv_dw", "bn1")
register_pattern("timm.models._efficientnet_blocks.InvertedResidual", "conv_dw", "bn2")
register_pattern("timm.models._efficientnet_blocks.ConvBnAct", "conv", "bn1")
# ConvNormAct holds the depthwise convs of MobileNetV4's UniversalInvertedResidual.
register_pattern("timm.layers.conv_bn_act.ConvNormAct", "conv", "bn")


class _Match(NamedTuple):
    parent: nn.Module
    conv_name: str
    bn_name: str
    act_name: Optional[str]  # slot of a separate activation module that is absorbed
    act: str


class _Original(NamedTuple):
    conv: nn.Module
    bn: nn.Module
    act: Optional[nn.Module]
    bn_name: str
    act_name: Optional[str]
    act_placeholder: Optional[nn.Module]


def _has_hooks(m: nn.Module) -> bool:
    # A fused module would silently stop running hooks registered on the modules it replaces.
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _match(parent: nn.Module, conv_name: str, bn_name: str, act_name: Optional[str]) -> Optional[_Match]:
    conv = parent._modules.get(conv_name)
    bn = parent._modules.get(bn_name)
    if conv is None or bn is None:
        return None
    config = conv_config(conv)
    if isinstance(config, str):
        return None
    kind = bn_activation(bn, config["channels"])
    if kind is None or _has_hooks(conv) or _has_hooks(bn):
        return None
    if kind == "none" and act_name is not None:
        act = parent._modules.get(act_name)
        act_kind = activation_kind(act) if act is not None else None
        if act_kind not in (None, "none") and not _has_hooks(act):
            return _Match(parent, conv_name, bn_name, act_name, act_kind)
    return _Match(parent, conv_name, bn_name, None, kind)


def _find(model: nn.Module) -> List[_Match]:
    found, seen = [], set()

    def add(m: Optional[_Match]) -> bool:
        if m is None or id(m.parent._modules[m.conv_name]) in seen:
            return False
        seen.add(id(m.parent._modules[m.conv_name]))
        found.append(m)
        return True

    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            i = 0
            while i + 1 < len(names):
                m = _match(parent, names[i], names[i + 1], names[i + 2] if i + 2 < len(names) else None)
                if add(m):
                    i += 2 if m.act_name is None else 3
                else:
                    i += 1
        for conv_name, bn_name in _PATTERNS.get(_qualname(type(parent)), ()):
            add(_match(parent, conv_name, bn_name, None))
    return found


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Fuse every eligible depthwise Conv2d + BatchNorm2d (+ activation) of `model` in place.

    Searched: consecutive children [conv, bn, optional activation] of every `nn.Sequential`
    (torchvision MobileNetV2/V3, EfficientNet, MNASNet), and the attribute patterns of
    `register_pattern` (timm EfficientNet/MobileNet blocks). Eligible conv: exactly
    `nn.Conv2d`, groups == in_channels == out_channels, padding_mode "zeros", symmetric padding.
    Eligible BN: exactly `nn.BatchNorm2d`, or timm's `BatchNormAct2d` with a supported
    activation (absorbed) and no drop. Modules with hooks are left alone, as is everything else.
    state_dict keys and parameter names are unchanged; already fused parts are skipped.
    Returns `model`.
    """
    for m in _find(model):
        conv = m.parent._modules[m.conv_name]
        bn = m.parent._modules[m.bn_name]
        folded = FoldedBatchNorm2d(bn)
        fused = DWConvBNAct2d.from_modules(conv, bn, act=m.act, backend=backend, bn_slot=folded)
        act, placeholder = None, None
        if m.act_name is not None:
            act = m.parent._modules[m.act_name]
            placeholder = nn.Identity()
            placeholder.train(act.training)
            m.parent._modules[m.act_name] = placeholder
        fused.__dict__["_fastdw_orig"] = _Original(conv, bn, act, m.bn_name, m.act_name, placeholder)
        m.parent._modules[m.conv_name] = fused
        m.parent._modules[m.bn_name] = folded
    return model


def _restore(parent: nn.Module, name: str, fused: DWConvBNAct2d) -> None:
    orig: _Original = fused._fastdw_orig
    folded = fused.bn
    # Point the originals at the current tensors: the model may have been moved, cast or
    # loaded since convert, which replaces buffers (and, with some settings, Parameters).
    conv = orig.conv
    conv._parameters["weight"] = fused._parameters["weight"]
    conv._parameters["bias"] = fused._parameters["bias"]
    conv.train(fused.training)
    bn = orig.bn
    for key in bn._parameters:
        bn._parameters[key] = folded._parameters[key]
    for key in bn._buffers:
        bn._buffers[key] = folded._buffers[key]
    bn.eps, bn.momentum = folded.eps, folded.momentum
    bn.train(folded.training)
    parent._modules[name] = conv
    parent._modules[orig.bn_name] = bn
    if orig.act_name is not None:
        placeholder = parent._modules.get(orig.act_name)
        if placeholder is not None:
            orig.act.train(placeholder.training)
        parent._modules[orig.act_name] = orig.act
    fused.__dict__["_fastdw_orig"] = None


def revert(model: nn.Module) -> nn.Module:
    """Undo `convert` in place: put the original Conv2d / BatchNorm / activation modules back.

    The originals get the model's current Parameters and buffers (after any `.to()`, `.half()`
    or `load_state_dict` since convert) and its current training flags. Returns `model`.
    """
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, DWConvBNAct2d) and child.__dict__.get("_fastdw_orig") is not None:
                _restore(parent, name, child)
    return model
