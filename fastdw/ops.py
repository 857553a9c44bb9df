"""The functional contract: `fastdw.dwconv_bn_act` and the backend that serves it.

The schemas live in csrc/fastdw.cpp (TORCH_LIBRARY(fastdw)); the CPU kernel registers in
csrc/dwconv_bn_act_cpu.cpp, the CUDA kernels in csrc/*.cu, the Triton kernels in
fastdw/triton/. This file registers for the C++ ops what their C++ side does not (the fake
kernels and autograd of fastdw/_autograd.py, shared with the Triton ops) and holds the public
functions that pick a backend.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import List, Optional, Tuple

import torch

from ._utils import ACTIVATIONS, BACKENDS, EAGER_TENSOR_TYPES as _PLAIN, IntOrPair, Padding, pair, resolve_padding
from ._autograd import (  # noqa: F401 -- re-exported: fastdw.ops.fake_forward etc. stay importable
    double_backward,
    fake_backward,
    fake_forward,
    fake_train_backward,
    fake_train_forward,
    make_backward,
    make_train_backward,
    no_setup_context,
    setup_context,
    setup_train_context,
)

__all__ = ["dwconv_bn_act", "dwconv_bn_act_train", "available_backends", "resolve_backend"]


def _has_ops() -> bool:
    try:
        torch.ops.fastdw.dwconv_bn_act
        return True
    except (AttributeError, RuntimeError):
        return False


HAS_OPS = _has_ops()


if HAS_OPS:
    _fwd_op = torch.ops.fastdw.dwconv_bn_act.default
    _bwd_op = torch.ops.fastdw._dwconv_bn_act_backward.default
    torch.library.register_fake("fastdw::dwconv_bn_act", fake_forward)
    torch.library.register_fake("fastdw::_dwconv_bn_act_backward", fake_backward)
    # the backward op is looked up at call time, so tests can wrap it (fastdw.ops._bwd_op)
    torch.library.register_autograd("fastdw::dwconv_bn_act", make_backward(lambda *a: _bwd_op(*a)),
                                    setup_context=setup_context)
    torch.library.register_autograd("fastdw::_dwconv_bn_act_backward", double_backward,
                                    setup_context=no_setup_context)
    _train_op = torch.ops.fastdw.dwconv_bn_act_train.default
    _train_bwd_op = torch.ops.fastdw._dwconv_bn_act_train_backward.default
    torch.library.register_fake("fastdw::dwconv_bn_act_train", fake_train_forward)
    torch.library.register_fake("fastdw::_dwconv_bn_act_train_backward", fake_train_backward)
    torch.library.register_autograd("fastdw::dwconv_bn_act_train",
                                    make_train_backward(lambda *a: _train_bwd_op(*a)),
                                    setup_context=setup_train_context)
    torch.library.register_autograd("fastdw::_dwconv_bn_act_train_backward", double_backward,
                                    setup_context=no_setup_context)


# ------------------------------------------------------------------------------------------
# Backend selection

@functools.lru_cache(maxsize=None)
def _has_kernel(key: str) -> bool:
    if not HAS_OPS:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastdw::dwconv_bn_act", key)


def _binary_archs() -> List[str]:
    try:
        from . import _C  # noqa: PLC0415

        return list(_C.build_info().get("cuda_archs", []))
    except ImportError:
        return []


def arch_runs(archs: List[str], cap) -> bool:
    """Whether a binary with these archs ("8.0", "9.0+PTX", ...) runs on compute capability cap
    (major, minor): SASS of the same major and a minor <= the device's, or PTX of any arch <= it
    (the driver JIT-compiles PTX forward)."""
    for a in archs:
        ptx = a.endswith("+PTX")
        major, minor = (int(v) for v in a.replace("+PTX", "").split("."))
        if (major, minor) <= tuple(cap) and (ptx or major == cap[0]):
            return True
    return False


_ARCH_OK: dict = {}


@torch._dynamo.assume_constant_result
def _cuda_arch_ok(index: int) -> bool:
    """The CUDA kernels of this build run on GPU `index` (else: warn once, use Triton)."""
    if index not in _ARCH_OK:
        cap = torch.cuda.get_device_capability(index)
        archs = _binary_archs()
        ok = arch_runs(archs, cap)
        _ARCH_OK[index] = ok
        if not ok:
            import warnings  # noqa: PLC0415

            warnings.warn(f"fastdw: this build's CUDA kernels are compiled for {archs}, which cannot run on "
                          f"GPU {index} (sm_{cap[0]}{cap[1]}, {torch.cuda.get_device_name(index)}); "
                          "backend='auto' uses the Triton kernels there. Rebuild with FASTDW_CUDA_ARCHS including "
                          f"{cap[0]}.{cap[1]} for the CUDA kernels.", RuntimeWarning, stacklevel=3)
    return _ARCH_OK[index]


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


_TRITON_IMPORT_ERROR: Optional[str] = None
_TRITON_MODULE: list = []  # [module or None] once looked up


def _triton_module():
    """fastdw.triton.dwconv_bn_act when Triton and the kernels are importable, else None. Imported
    on first use (it pulls in Triton and parts of Inductor: seconds), then cached."""
    global _TRITON_IMPORT_ERROR
    if not _TRITON_MODULE:
        try:
            _TRITON_MODULE.append(importlib.import_module("fastdw.triton.dwconv_bn_act"))
        except Exception as e:  # noqa: BLE001 -- no triton, or a triton that cannot load: no backend
            _TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"
            _TRITON_MODULE.append(None)
    return _TRITON_MODULE[0]


# torch.compile: these run at trace time and enter the graph as constants (Dynamo cannot trace an
# import); the op itself is then called through torch.ops.
@torch._dynamo.assume_constant_result
def _triton_available() -> bool:
    return _triton_module() is not None


@torch._dynamo.assume_constant_result
def _triton_interpret() -> bool:
    mod = _triton_module()
    return mod is not None and bool(mod.INTERPRET)


def available_backends() -> List[str]:
    """Backends usable in this process: 'cpu' (compiled CPU kernels), 'cuda' (compiled CUDA
    kernels and a visible GPU), 'triton' (Triton kernels importable and a GPU, or the Triton
    interpreter enabled with TRITON_INTERPRET=1)."""
    out = []
    if _has_kernel("CPU"):
        out.append("cpu")
    if _has_kernel("CUDA") and torch.cuda.is_available():
        out.append("cuda")
    if _triton_available() and (torch.cuda.is_available() or _triton_interpret()):
        out.append("triton")
    return out


def _missing_ext_error() -> RuntimeError:
    from . import _C_IMPORT_ERROR  # noqa: PLC0415

    return RuntimeError(f"fastdw: the compiled extension fastdw._C is not available ({_C_IMPORT_ERROR}); "
                        "build it with `pip install --no-build-isolation -e .`")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map backend='auto' (or FASTDW_BACKEND) to a concrete backend for a tensor on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"fastdw: backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("FASTDW_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"fastdw: FASTDW_BACKEND must be one of {BACKENDS}; got {backend!r}")
    dev = device.type
    if backend == "auto":
        if dev == "cuda":
            if _has_kernel("CUDA") and _cuda_arch_ok(_device_index(device)):
                return "cuda"
            if _triton_available():
                return "triton"
            raise RuntimeError("fastdw: no GPU backend for CUDA tensors: this build has no CUDA kernels "
                               f"(fastdw.build_info() = {_build_info_or_none()}) and the Triton kernels "
                               "are not importable")
        return "cpu" if dev == "cpu" else "op"
    if backend == "cpu" and dev not in ("cpu", "meta"):
        raise ValueError(f"fastdw: backend='cpu' needs CPU tensors; x is on {device}")
    if backend == "cuda":
        if dev not in ("cuda", "meta"):
            raise ValueError(f"fastdw: backend='cuda' needs CUDA tensors; x is on {device}")
        if dev == "cuda" and _has_kernel("CUDA") and not _cuda_arch_ok(_device_index(device)):
            raise RuntimeError(f"fastdw: backend='cuda' requested but this build's CUDA kernels "
                               f"({_binary_archs()}) cannot run on {torch.cuda.get_device_name(device)} "
                               f"(sm_{''.join(map(str, torch.cuda.get_device_capability(device)))}); use "
                               "backend='triton' or rebuild with FASTDW_CUDA_ARCHS set for it")
        if not _has_kernel("CUDA"):
            raise RuntimeError("fastdw: backend='cuda' requested but this build has no CUDA kernels "
                               f"(fastdw.build_info() = {_build_info_or_none()}); rebuild on a machine "
                               "with nvcc and a CUDA build of torch, or use backend='triton'")
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("fastdw: backend='triton' requested but the Triton kernels are not available "
                               f"(import of fastdw.triton.dwconv_bn_act failed: {_TRITON_IMPORT_ERROR})")
        if dev not in ("cuda", "meta") and not (dev == "cpu" and _triton_interpret()):
            raise ValueError(f"fastdw: backend='triton' needs CUDA tensors (x is on {device}); CPU tensors "
                             "run through the Triton interpreter only when TRITON_INTERPRET=1 is set before "
                             "fastdw.triton is imported")
    return backend


def _build_info_or_none():
    try:
        from . import _C  # noqa: PLC0415

        return _C.build_info()
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------
# Public function

def dwconv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: Padding = 1,
    dilation: IntOrPair = 1,
    act: str = "relu6",
    backend: str = "auto",
) -> torch.Tensor:
    """Fused depthwise conv + folded BatchNorm + activation.

    y = act(conv2d(x, weight, stride, padding, dilation, groups=C) * scale[c] + shift[c])

    Args:
        x: (N, C, H, W), contiguous or channels_last (other strides are made contiguous);
            float32, float16, bfloat16 (float64 on the CPU).
        weight: (C, 1, kH, kW), x's dtype or float32 (what nn.Conv2d(C, C, k, groups=C) holds).
        scale, shift: optional (C,) float32 (or x's dtype): folded BatchNorm, see fastdw.fold_bn.
            None means scale 1, shift 0.
        stride, dilation: int or (h, w) pair.
        padding: int, (h, w) pair (both sides), (top, left, bottom, right), "valid" (0) or
            "same": TensorFlow's SAME for x's size at any stride (output ceil(H / stride), the
            odd pixel padded at the bottom / right; PyTorch's padding="same" at stride 1).
        act: 'none', 'relu', 'relu6', 'hardswish' or 'silu'.
        backend: 'auto' (cuda where built, else triton on a GPU, cpu on the CPU; FASTDW_BACKEND
            overrides it), 'cuda', 'triton' or 'cpu'.

    Returns:
        (N, C, OH, OW) in x's dtype, channels_last when x is channels_last (else contiguous),
        accumulated in fp32. Differentiable in x, weight, scale and shift.
    """
    stride, padding, dilation, b, x = _prepare(x, weight, act, stride, padding, dilation, backend,
                                               weight=weight, scale=scale, shift=shift)
    if b == "triton":
        direct = _eager_direct(x, weight, scale, shift)
        if direct:
            args = (x, weight, scale, shift, list(stride), list(padding), list(dilation), act)
            return _TRITON_MODULE[0].dwconv_bn_act_fwd(*args) if direct == 1 else _TritonEager.apply(*args)
        return torch.ops.fastdw.dwconv_bn_act_triton(x, weight, scale, shift, list(stride), list(padding),
                                                     list(dilation), act)
    if not HAS_OPS:
        raise _missing_ext_error()
    return _fwd_op(x, weight, scale, shift, stride, padding, dilation, act)


def _eager_direct(x, *tensors) -> int:
    """Whether a Triton forward may skip the op dispatch around its launcher (which costs more
    host time than the launcher itself): 0 no; 1 call the launcher (no autograd graph to record);
    2 call it through _TritonEager (an autograd.Function: the same autograd as the op's, for a
    fraction of its host time). Only for an eager call on plain, non-meta tensors with no
    tracing, dispatch or function mode, functorch transform or profiler active: nothing that the
    op's registration (fake kernel, the op's name in a trace or profile) would serve. The launcher
    is what the op runs: the results are the same tensors."""
    if not _nothing_watches():
        return 0
    # (inference mode drops the Autograd key: no graph there even under enable_grad, as for the op)
    grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    out = 1
    for t in (x, *tensors):
        if t is not None:
            if type(t) not in _PLAIN:
                return 0
            if grad and t.requires_grad:
                out = 2
    return 0 if x.is_meta else out


def _nothing_watches() -> bool:
    """No compile or jit tracing, dispatch or function mode, functorch transform or profiler that
    must see the op itself."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() != 0
                or torch._C._is_torch_function_mode_enabled()
                or torch._C._functorch.peek_interpreter_stack() is not None or torch.autograd._profiler_enabled())


def _triton_bwd_eager(grad, *args):
    """The backward of _TritonEager: the launcher under the same conditions as the forward's direct
    path, re-checked now (compiled autograd, a mode or a profiler may have started since the
    forward); else the backward op, whose own autograd also refuses a double backward
    (create_graph=True)."""
    T = _TRITON_MODULE[0]
    if torch.is_grad_enabled() or type(grad) not in _PLAIN or not _nothing_watches():
        return T.BWD_OP(grad, *args)
    return T.dwconv_bn_act_bwd(grad, *args)


class _TritonEager(torch.autograd.Function):
    """The Triton forward op's autograd (setup_context and make_backward of fastdw/_autograd.py)
    around its launchers, for eager calls that record a graph (see _eager_direct)."""

    @staticmethod
    def forward(ctx, *inputs):  # (the ctx-first form: a separate setup_context costs ~12 us more per call)
        y = _TRITON_MODULE[0].dwconv_bn_act_fwd(*inputs)
        setup_context(ctx, inputs, y)
        return y

    backward = staticmethod(make_backward(_triton_bwd_eager))


def prepack_params(
    weight: torch.Tensor, scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-channel parameters of `dwconv_bn_act` packed once, for repeated inference calls.

    Returns (weight, scale, shift) as float32 views of one (kH*kW + 2, C) buffer in the layout the
    CUDA kernels read (weight tap-major, then scale, then shift; 16-byte aligned). Passed to
    `dwconv_bn_act` in place of the originals they give the same result on every backend, and
    the CUDA backend reads them in place instead of packing them at every call (one kernel launch
    less per call). They are detached copies: pack again after the parameters change, and use
    the originals where gradients for them are wanted. `DWConvBNAct2d` (and so every converted
    model) does this itself in inference, cached until a parameter or BatchNorm buffer changes.
    None for scale / shift means 1 / 0, as in `dwconv_bn_act`.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError("fastdw: prepack_params: weight must be a (C, 1, kH, kW) tensor; got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    C, _, KH, KW = weight.shape
    T = KH * KW
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != C):
            raise ValueError(f"fastdw: prepack_params: {name} must be a ({C},) tensor like the weight's channels; "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t is not None and t.device != weight.device:
            raise ValueError(f"fastdw: prepack_params: {name} must be on the weight's device ({weight.device}); "
                             f"got {t.device}")
    with torch.no_grad():
        buf = torch.empty((T + 2, C), dtype=torch.float32, device=weight.device)
        buf[:T].copy_(weight.detach().reshape(C, T).t())
        buf[T].copy_(scale.detach()) if scale is not None else buf[T].fill_(1.0)
        buf[T + 1].copy_(shift.detach()) if shift is not None else buf[T + 1].fill_(0.0)
    return buf[:T].t().view(C, 1, KH, KW), buf[T], buf[T + 1]


def _prepare(x, w, act, stride, padding, dilation, backend, **tensors):
    """What both public functions do before calling an op: type and device checks the ops cannot
    make (they dispatch on x), (h, w) pairs, the backend, and x made contiguous when it is in
    neither supported layout."""
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise TypeError("fastdw: x and weight must be tensors")
    if act not in ACTIVATIONS:
        raise ValueError(f"fastdw: act must be one of 'none', 'relu', 'relu6', 'hardswish', 'silu'; got {act!r}")
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    padding = resolve_padding(padding, x, w, stride, dilation)
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"fastdw: {name} must be on the same device as x ({x.device}); got {t.device}")
    if not torch.compiler.is_compiling():
        _refuse_forward_ad(x, tensors)
    b = resolve_backend(backend, x.device)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    return stride, padding, dilation, b, x


def _refuse_forward_ad(x, tensors) -> None:
    """The fused ops have no forward-mode derivative: under torch.func.jvp, or with a tangent on an
    input under torch.autograd.forward_ad, they would return a zero tangent. Refuse instead."""
    jvp = False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters  # noqa: PLC0415

        jvp = any(i.key() == torch._C._functorch.TransformType.Jvp for i in retrieve_all_functorch_interpreters())
    if not jvp and torch.autograd.forward_ad._current_level >= 0:
        jvp = any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None
                  for t in (x, *tensors.values()))
    if jvp:
        raise NotImplementedError(
            "fastdw: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported by the fused "
            "ops: they have no forward derivative and would return a zero tangent. Use reverse mode "
            "(backward, torch.func.grad / vjp / jacrev), or the unfused layers for jvp")


def dwconv_bn_act_train(
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
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused depthwise conv + training-mode (batch-statistics) BatchNorm + activation.

    z = conv2d(x, weight, stride, padding, dilation, groups=C)
    y = act((z - mean[c]) / sqrt(var[c] + eps) * gamma[c] + beta[c])
    with mean and var the batch mean and biased variance of z over (N, OH, OW).

    Args:
        x, weight, stride, padding, dilation, act, backend: as in `dwconv_bn_act`.
        bias: optional (C,) conv bias. It cancels in y and only shifts the returned mean.
        gamma, beta: optional (C,) BatchNorm affine parameters, float32 or x's dtype (None: 1, 0).
        eps: BatchNorm's eps (>= 0).

    Returns:
        (y, mean, var): y as in `dwconv_bn_act` (x's dtype and layout); mean = batch mean of
        conv(x) + bias and var = biased batch variance, each (C,) float32 (float64 for float64 x);
        NaN when the batch is empty. The running statistics are not touched: `DWConvBNAct2d`
        updates them from (mean, var) exactly as `nn.BatchNorm2d` does. Differentiable in x,
        weight, bias, gamma, beta through all three outputs.
    """
    stride, padding, dilation, b, x = _prepare(x, weight, act, stride, padding, dilation, backend,
                                               weight=weight, bias=bias, gamma=gamma, beta=beta)
    eps = float(eps)
    if b == "triton":
        return torch.ops.fastdw.dwconv_bn_act_train_triton(x, weight, bias, gamma, beta, list(stride),
                                                           list(padding), list(dilation), eps, act)
    if not HAS_OPS:
        raise _missing_ext_error()
    return _train_op(x, weight, bias, gamma, beta, stride, padding, dilation, eps, act)
