"""ONNX export of the fastdw ops: each translated to standard ONNX operators.

    fastdw::dwconv_bn_act(x, w, scale, shift, stride, padding, dilation, act)
      -> Conv(group=C) -> Mul(scale) -> Add(shift) -> Relu / Clip(0, 6) / HardSwish / x*Sigmoid(x)

so a converted network exported to ONNX runs in any ONNX runtime (onnxruntime, TensorRT, ...)
with stock operators. Export a model in eval mode (the training op, batch-statistics BatchNorm,
has no ONNX form here).

`torch.onnx.export(model, args, path, dynamo=True)` works after `import fastdw`: the translation
is added to the exporter's operator table when the exporter loads it (a private table of torch;
`fastdw.onnx.registered()` says whether that worked). `fastdw.onnx_export(model, args, path,
**kwargs)` passes the table through the exporter's public `custom_translation_table` argument
instead, and works whatever torch does with its private table.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any, Callable, Dict

import torch

from ._utils import padding_ends

__all__ = ["onnx_export", "translation_table", "registered"]

_TORCHLIB_REGISTRY = "torch.onnx._internal.exporter._torchlib._torchlib_registry"
_registered = False


def _dwconv_bn_act(x, weight, scale, shift, stride, padding, dilation, act: str):
    """The inference op in ONNX Script (trace mode: the ints and `act` are Python values)."""
    from onnxscript import opset18 as op

    C = weight.shape[0]
    if not isinstance(C, int):
        raise ValueError("fastdw ONNX export: the channel count must be static")
    w = op.CastLike(weight, x)  # an fp32 weight with fp16 x (autocast)
    y = op.Conv(x, w, strides=list(stride), pads=list(padding_ends(padding)),  # ONNX's order: the op's 4-tuple
                dilations=list(dilation), group=C)
    per_channel = op.Constant(value_ints=[1, C, 1, 1])
    if scale is not None:
        y = op.Mul(y, op.Reshape(op.CastLike(scale, x), per_channel))
    if shift is not None:
        y = op.Add(y, op.Reshape(op.CastLike(shift, x), per_channel))
    if act == "relu":
        return op.Relu(y)
    if act == "relu6":
        return op.Clip(y, op.CastLike(0.0, y), op.CastLike(6.0, y))
    if act == "hardswish":
        return op.HardSwish(y)
    if act == "silu":
        return op.Mul(y, op.Sigmoid(y))
    if act == "none":
        return op.Identity(y)
    raise ValueError(f"fastdw ONNX export: unknown activation {act!r}")


def translation_table() -> Dict[Callable, Callable]:
    """{fastdw op: its ONNX Script translation}, for torch.onnx.export's custom_translation_table."""
    return {torch.ops.fastdw.dwconv_bn_act.default: _dwconv_bn_act}


def onnx_export(model: torch.nn.Module, args: Any, f=None, **kwargs):
    """torch.onnx.export(model, args, f, dynamo=True, **kwargs) with fastdw's translations (merged
    with any custom_translation_table given). Returns the exporter's ONNXProgram."""
    table = dict(translation_table())
    table.update(kwargs.pop("custom_translation_table", None) or {})
    kwargs.setdefault("dynamo", True)
    if not kwargs["dynamo"]:
        raise ValueError("fastdw.onnx_export: the fastdw translations need the dynamo exporter (dynamo=True)")
    return torch.onnx.export(model, args, f, custom_translation_table=table, **kwargs)


def registered() -> bool:
    """Whether the translations are in torch.onnx's own operator table (plain torch.onnx.export)."""
    return _registered


def _register(registry_module) -> None:
    global _registered
    try:
        for target, fn in translation_table().items():
            registry_module.onnx_impl(target, trace_only=True)(fn)
        _registered = True
    except Exception:  # a torch whose private table changed: fastdw.onnx_export still works
        _registered = False


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Adds the translations to torch.onnx's table right after torch loads it (importing it here,
    with onnxscript, would cost about a second on every `import fastdw`)."""

    def find_spec(self, name, path=None, target=None):
        if name != _TORCHLIB_REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            # Not yet: this import runs inside torch's own circular import of the exporter's
            # registration module, which is half-initialised here. Register when the exporter
            # first asks the table for its ops.
            get_ops = module.get_torchlib_ops

            def get_torchlib_ops():
                if not _registered:
                    _register(module)
                return get_ops()

            module.get_torchlib_ops = get_torchlib_ops

        loader.exec_module = exec_and_register
        return spec


def install() -> None:
    """Called by `import fastdw`: register now if torch.onnx's table is loaded, else when it is."""
    if _TORCHLIB_REGISTRY in sys.modules:
        _register(sys.modules[_TORCHLIB_REGISTRY])
    elif not any(isinstance(h, _RegisterOnImport) for h in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
