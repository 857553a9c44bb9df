"""fastdw: fused depthwise convolution + BatchNorm + activation for PyTorch.

    y = fastdw.dwconv_bn_act(x, weight, scale, shift, stride=1, padding=1, act="relu6")
    fastdw.convert(model)   # fuse every depthwise Conv2d + BatchNorm2d + activation in place
    fastdw.revert(model)    # back to stock modules (state_dict keys never change)
"""
import torch as _torch  # loads libtorch/libc10 before the extension that links them

from .version import __version__


def _check_torch_abi() -> None:
    """A binary build links torch's C++ ABI, which only the very torch build it was compiled against
    is sure to have: under another torch, loading _C fails with an undefined symbol, or loads and
    misbehaves. Say what is wrong instead. The build records torch's version and git commit
    (_build_config.py, written by setup.py): another major.minor, or the same version number from
    another commit (a nightly, a local build), is refused."""
    try:
        from . import _build_config as bc
    except ImportError:  # a source tree that was never built: nothing to check
        return
    built, built_git = bc.TORCH_VERSION, getattr(bc, "TORCH_GIT_VERSION", None)
    running_git = getattr(_torch.version, "git_version", None)
    mm = lambda v: tuple(v.split("+")[0].split(".")[:2])  # noqa: E731
    fix = ("Install the fastdw wheel built for your torch, or rebuild: "
           "pip install --no-build-isolation --no-deps .")
    if mm(built) != mm(_torch.__version__):
        raise ImportError(
            f"fastdw {__version__} was built against torch {built}, but torch {_torch.__version__} is "
            f"installed; its compiled kernels only load under torch {'.'.join(mm(built))}.x. {fix}")
    if built_git and running_git and built_git != running_git:
        raise ImportError(
            f"fastdw {__version__} was built against torch {built} (git {built_git[:12]}), but the torch "
            f"installed is {_torch.__version__} (git {running_git[:12]}): another build of torch, whose C++ "
            f"ABI the compiled kernels may not match. {fix}")


_check_torch_abi()

try:  # registers the fastdw:: ops (TORCH_LIBRARY) with the dispatcher
    from . import _C  # noqa: F401

    HAS_EXT = True
    _C_IMPORT_ERROR = None
except ImportError as e:  # a source tree without a build, or a build for another torch
    _C = None
    HAS_EXT = False
    _C_IMPORT_ERROR = f"{e} (torch {_torch.__version__}: fastdw must be built against the torch it runs with)"

from ._utils import ACTIVATIONS, BACKENDS, output_memory_format
from .ops import available_backends, dwconv_bn_act, dwconv_bn_act_train, prepack_params, resolve_backend
from .nn import DWConv2d, DWConvBNAct2d, FoldedBatchNorm2d, fold_bn
from .convert import ConversionReport, conversion_report, convert, register_pattern, revert
from .onnx import onnx_export

if HAS_EXT:  # the ops exist: torch.onnx.export of a converted model translates them
    from .onnx import install as _install_onnx

    _install_onnx()


def _check_gpu_arch() -> None:
    """On a GPU this build has no kernels for: the warning now, at import (backend='auto' then
    uses the Triton kernels for that GPU)."""
    try:
        if HAS_EXT and _torch.cuda.is_available() and _C.build_info().get("with_cuda"):
            from .ops import _cuda_arch_ok

            _cuda_arch_ok(_torch.cuda.current_device())
    except RuntimeError:  # a broken driver is reported when a GPU op is first used
        pass


_check_gpu_arch()


def build_info() -> dict:
    """What was compiled in: version, with_cuda, cuda_version, cuda_archs, torch_version, backends,
    cpu_isas (the CPU kernels' ISA levels this processor runs; see set_cpu_isa)."""
    if _C is None:
        return {"version": __version__, "with_cuda": False, "cuda_version": None, "cuda_archs": [],
                "torch_version": None, "backends": [], "cpu_isas": [], "error": _C_IMPORT_ERROR}
    return _C.build_info()


def cpu_isa() -> str:
    """The ISA level the CPU kernels run at: 'default' (baseline), 'avx2' (x86-64-v3) or 'avx512'
    (x86-64-v4). The best this processor runs, unless FASTDW_CPU_ISA (read at the first CPU call)
    or set_cpu_isa() chose a lower one."""
    if _C is None:
        raise RuntimeError(f"fastdw: the compiled extension is not available: {_C_IMPORT_ERROR}")
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> str:
    """Forces the ISA level of the CPU kernels ('auto' for the best this processor runs,
    'default', 'avx2', 'avx512') and returns the previous level. Every level computes the same
    function; they differ in speed and rounding, which is what this knob lets a test compare on
    one machine. Raises ValueError for a level this build or processor cannot run."""
    if _C is None:
        raise RuntimeError(f"fastdw: the compiled extension is not available: {_C_IMPORT_ERROR}")
    return _C.set_cpu_isa(name)


__all__ = [
    "__version__", "ACTIVATIONS", "BACKENDS", "HAS_EXT", "dwconv_bn_act", "dwconv_bn_act_train", "prepack_params",
    "available_backends",
    "resolve_backend", "output_memory_format", "DWConvBNAct2d", "DWConv2d", "FoldedBatchNorm2d", "fold_bn",
    "convert", "revert", "register_pattern", "conversion_report", "ConversionReport", "build_info", "cpu_isa",
    "set_cpu_isa", "onnx_export",
]
