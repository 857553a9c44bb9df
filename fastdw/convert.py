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

from .nn import DWConv2d, DWConvBNAct2d, FoldedBatchNorm2d, _qualname, activation_kind, bn_activation, conv_config

__all__ = ["convert", "revert", "register_pattern", "conversion_report", "ConversionReport"]

# Block classes whose forward runs `<conv attr>` straight into `<bn attr>`, keyed by
# `module.qualname` of the class (exact type: a subclass may change the forward).
_PATTERNS: Dict[str, List[Tuple[str, str, Optional[str]]]] = {}


def register_pattern(cls_qualname: Union[str, type], conv_attr: str, bn_attr: str,
                     act_attr: Optional[str] = None) -> None:
    """Declare that blocks of class `cls_qualname` feed child `conv_attr` directly into `bn_attr`
    (and that straight into the activation module `act_attr`, when given), so that `convert`
    fuses them there.

    cls_qualname: `type(m).__module__ + "." + type(m).__qualname__` (or the class itself).
    Only exact instances of that class are searched; a block may have several patterns. Declare
    only what the block's forward really does: `convert` trusts it.
    """
    if isinstance(cls_qualname, type):
        cls_qualname = _qualname(cls_qualname)
    pairs = _PATTERNS.setdefault(cls_qualname, [])
    if (conv_attr, bn_attr, act_attr) not in pairs:
        pairs.append((conv_attr, bn_attr, act_attr))


# timm (checked against timm 1.0): the BN is a BatchNormAct2d carrying the activation.
register_pattern("timm.models._efficientnet_blocks.DepthwiseSeparableConv", "conv_dw", "bn1")
register_pattern("timm.models._efficientnet_blocks.InvertedResidual", "conv_dw", "bn2")
register_pattern("timm.models._efficientnet_blocks.ConvBnAct", "conv", "bn1")
# ConvNormAct holds the depthwise convs of MobileNetV4's UniversalInvertedResidual.
register_pattern("timm.layers.conv_bn_act.ConvNormAct", "conv", "bn")
# Aligned Xception (xception41/65/71): conv_dw -> bn_dw -> act_dw -> conv_pw ...
register_pattern("timm.models.xception_aligned.SeparableConv2d", "conv_dw", "bn_dw", "act_dw")
# EfficientViT (MIT): dropout -> conv -> norm -> act (the norm may be Identity: then not fused)
register_pattern("timm.models.efficientvit_mit.ConvNormAct", "conv", "norm", "act")
# GhostNet: conv_dw -> bn_dw (stride-2 blocks), then the squeeze-excite
register_pattern("timm.models.ghostnet.GhostBottleneck", "conv_dw", "bn_dw")


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
        for conv_name, bn_name, act_name in _PATTERNS.get(_qualname(type(parent)), ()):
            add(_match(parent, conv_name, bn_name, act_name))
    return found


def convert(model: nn.Module, backend: str = "auto", verbose: bool = False, bare: bool = True) -> nn.Module:
    """Fuse every eligible depthwise Conv2d + BatchNorm2d (+ activation) of `model` in place.

    Searched: consecutive children [conv, bn, optional activation] of every `nn.Sequential`
    (torchvision MobileNetV2/V3, EfficientNet, MNASNet), and the attribute patterns of
    `register_pattern` (timm EfficientNet/MobileNet blocks). Eligible conv: exactly
    `nn.Conv2d` (any zero padding, asymmetric "same" included) or timm's `Conv2dSame` (TF's SAME,
    per input size), groups == in_channels == out_channels, padding_mode "zeros".
    Eligible BN: exactly `nn.BatchNorm2d`, or timm's `BatchNormAct2d` with a supported
    activation (absorbed) and no drop. Modules with hooks are left alone, as is everything else.
    state_dict keys and parameter names are unchanged; already fused parts are skipped.
    bare: every other eligible depthwise conv (no BatchNorm right after it, e.g. ConvNeXt, the
    original Xception, MixedConv2d branches) becomes a `DWConv2d` (the op with act "none" and the
    conv bias as its shift), so every eligible depthwise conv runs through fastdw.
    verbose: print `conversion_report(model)` afterwards (what was fused, what was left and why).
    Returns `model`.
    """
    # Bare layers of an earlier convert go back to their convs first, so that a pattern
    # registered since can fuse them; those still unfused get the same DWConv2d back.
    bare_before = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, DWConv2d) and child.__dict__.get("_fastdw_orig") is not None:
                bare_before[id(_restore_bare(parent, name, child))] = child
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
    if bare:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if _is_depthwise(child) and not isinstance(conv_config(child), str) and not _has_hooks(child):
                    dw = bare_before.get(id(child)) or DWConv2d.from_conv(child, backend=backend)
                    dw.__dict__["_fastdw_orig"] = child
                    parent._modules[name] = dw
    if verbose:
        print(conversion_report(model))
    return model


class ConversionReport(NamedTuple):
    """What `convert` made of a model: `fused` (module name, what the fused layer computes),
    `left` (module name of a depthwise conv still running as stock, and why) and `bare` (depthwise
    convs through the op without a BatchNorm: `DWConv2d`). str() is a table."""

    fused: List[Tuple[str, str]]
    left: List[Tuple[str, str]]
    bare: List[Tuple[str, str]] = []

    def __str__(self) -> str:
        total = len(self.fused) + len(self.bare) + len(self.left)
        lines = [f"fastdw: {len(self.fused) + len(self.bare)} of {total} depthwise convolutions through fastdw "
                 f"({len(self.fused)} fused with their BatchNorm, {len(self.bare)} bare)"]
        lines += [f"  fused  {name}: {what}" for name, what in self.fused]
        lines += [f"  bare   {name}: {what}" for name, what in self.bare]
        lines += [f"  left   {name}: {why}" for name, why in self.left]
        return "\n".join(lines)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def _why_left(parent: Optional[nn.Module], slot: Optional[str], conv: nn.Module) -> str:
    config = conv_config(conv)
    if isinstance(config, str):
        return config
    if _has_hooks(conv):
        return "it has hooks (a fused module would not run them)"
    if parent is None:
        return "it is the model itself (no BatchNorm after it)"
    nexts = []
    if isinstance(parent, nn.Sequential):
        names = list(parent._modules)
        i = names.index(slot)
        if i + 1 < len(names):
            nexts.append(parent._modules[names[i + 1]])
    for conv_attr, bn_attr, _ in _PATTERNS.get(_qualname(type(parent)), ()):
        if conv_attr == slot and parent._modules.get(bn_attr) is not None:
            nexts.append(parent._modules[bn_attr])
    if not nexts:
        if isinstance(parent, nn.Sequential):
            return "last module of its nn.Sequential: no BatchNorm2d after it"
        return (f"inside {_qualname(type(parent))}, whose forward fastdw does not know: if it feeds "
                f"'{slot}' straight into a BatchNorm2d, declare that with fastdw.register_pattern")
    bn = nexts[0]
    if bn_activation(bn, config["channels"]) is None:
        return (f"followed by {type(bn).__name__}, not a BatchNorm2d (or timm BatchNormAct2d) of "
                f"{config['channels']} channels that can be fused")
    if _has_hooks(bn):
        return "its BatchNorm has hooks (a fused module would not run them)"
    return "not matched"


def conversion_report(model: nn.Module) -> ConversionReport:
    """Every depthwise convolution of `model` (converted or not): the fused layers, and each conv
    that still runs as stock with the reason (e.g. a channel multiplier, a padding mode, a
    subclass of nn.Conv2d fastdw does not know, no BatchNorm right after it, an unknown parent block)."""
    fused, left, bare = [], [], []
    parents = {}
    for pname, parent in model.named_modules():
        for slot, child in parent._modules.items():
            if child is not None:
                parents[id(child)] = (parent, slot)
    def geometry(m):
        kh, kw = m.kernel_size
        pad = "'same'" if m.padding == "same" else tuple(m.padding)
        return f"{kh}x{kw} stride {tuple(m.stride)} padding {pad} dilation {tuple(m.dilation)}"

    for name, m in model.named_modules():
        if isinstance(m, DWConvBNAct2d):
            fused.append((name, f"{geometry(m)}, BatchNorm + {m.act}"))
        elif isinstance(m, DWConv2d):
            bare.append((name, f"{geometry(m)}, {'bias' if m.bias is not None else 'no bias'}, no BatchNorm"))
        elif _is_depthwise(m):
            parent, slot = parents.get(id(m), (None, None))
            left.append((name, _why_left(parent, slot, m)))
    return ConversionReport(fused, left, bare)


def _hand_back_conv(conv: nn.Conv2d, layer: nn.Module) -> nn.Conv2d:
    """The original conv, pointed at the layer's current weight / bias and training flag: the
    model may have been moved, cast or loaded since convert, which replaces buffers (and, with
    some settings, Parameters)."""
    conv._parameters["weight"] = layer._parameters["weight"]
    conv._parameters["bias"] = layer._parameters["bias"]
    conv.train(layer.training)
    return conv


def _restore(parent: nn.Module, name: str, fused: DWConvBNAct2d) -> None:
    orig: _Original = fused._fastdw_orig
    folded = fused.bn
    # the originals get the current tensors (see _hand_back_conv)
    conv = _hand_back_conv(orig.conv, fused)
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
            elif isinstance(child, DWConv2d) and child.__dict__.get("_fastdw_orig") is not None:
                _restore_bare(parent, name, child)
    return model


def _restore_bare(parent: nn.Module, name: str, dw: DWConv2d) -> nn.Module:
    conv = _hand_back_conv(dw._fastdw_orig, dw)
    parent._modules[name] = conv
    dw.__dict__["_fastdw_orig"] = None
    return conv
