"""Build fastdw._C: one extension with the CPU kernels and, where nvcc and a CUDA build of torch
are present, the CUDA kernels.

Knobs (all read here and printed at build start):
  FASTDW_SKIP_CUDA_BUILD=1   build the CPU-only extension even where CUDA is available
  FASTDW_CUDA_ARCHS          e.g. "8.0;9.0" or "80;86;89;90+PTX"; default: the visible GPUs'
                             archs, else 8.0;9.0 (TORCH_CUDA_ARCH_LIST is used when set and this
                             is not). Archs the installed nvcc cannot build are dropped with a note.
  FASTDW_PTXAS_VERBOSE=1     pass --ptxas-options=-v (register / spill report per kernel)
  NVCC_THREADS               nvcc --threads (default 2)
  MAX_JOBS                   parallel compile jobs (torch's ninja build)
  DEBUG=1                    -O0 -g host and device code (device debug info with -G is not on)
Build with the torch you already have: pip install --no-build-isolation -e .
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "fastdw" / "version.py").read_text()).group(1)

# torch.utils.cpp_extension reads CUDA_HOME when imported: pick the standard toolkit location
# first, or torch may guess one that is not there.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def nvcc_path():
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def nvcc_supported_archs(nvcc):
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {m.group(1) for m in re.finditer(r"compute_(\d+[a-z]?)", out)}


def requested_archs():
    spec = os.environ.get("FASTDW_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not spec:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            spec = ";".join(f"{a}.{b}" for a, b in caps)
        else:
            spec = "8.0;9.0"
    archs = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        ptx = tok.endswith("+PTX")
        num = tok.replace("+PTX", "").replace(".", "")
        if not re.fullmatch(r"\d+[a-z]?", num):
            sys.exit(f"fastdw setup: cannot parse CUDA arch {tok!r} in {spec!r}")
        archs.append((num, ptx))
    return archs


def gencode_flags(archs, supported):
    flags, kept = [], []
    for num, ptx in archs:
        if supported is not None and num not in supported:
            print(f"fastdw setup: nvcc cannot build sm_{num}; dropped")
            continue
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
        kept.append(f"{num[:-1]}.{num[-1]}" + ("+PTX" if ptx else ""))
    return flags, kept


skip_cuda = env_flag("FASTDW_SKIP_CUDA_BUILD")
nvcc = nvcc_path()
with_cuda = (not skip_cuda) and nvcc is not None and torch.version.cuda is not None
debug = env_flag("DEBUG")

# csrc/sources.txt: the one source list, shared with CMakeLists.txt (tests/test_build.py checks
# it names every csrc/*.cpp and *.cu).
def read_sources():
    out = []
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].split()
        if line:
            out.append(f"csrc/{line[0]}")
    return out


sources = read_sources()
cpp_sources = [s for s in sources if s.endswith(".cpp")]
cu_sources = [s for s in sources if s.endswith(".cu")]

# FASTDW_LOCAL_VERSION=1 (scripts/build_wheel.sh): the wheel's version names the torch and CUDA
# it was built against (PEP 440 local version, e.g. 0.1.0+cu130torch2.14): the binary links
# torch's C++ ABI, so it only works with that torch major.minor.
torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
local = (f"cu{torch.version.cuda.replace('.', '')}" if with_cuda else "cpu") + f"torch{torch_mm}"
version = f"{VERSION}+{local}" if env_flag("FASTDW_LOCAL_VERSION") else VERSION

opt = ["-O0", "-g"] if debug else ["-O3"]
defines = ["-DFASTDW_HAVE_BUILD_VERSION_H"]  # the strings: build/generated/fastdw_build_version.h
# at::parallel_for is header code (#pragma omp parallel): without -fopenmp it silently runs on one
# thread. Linking -fopenmp resolves to the libgomp.so.1 torch already loaded (same soname).
cxx_flags = opt + ["-Wall", "-fopenmp"] + defines
link_flags = ["-fopenmp"]

print("=" * 72)
print(f"fastdw {VERSION} build: torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
print(f"  CUDA_HOME={CUDA_HOME}  nvcc={nvcc}")
print(f"  FASTDW_SKIP_CUDA_BUILD={int(skip_cuda)}  DEBUG={int(debug)}  MAX_JOBS={os.environ.get('MAX_JOBS', '')}")

arch_str = ""
if with_cuda:
    archs, kept = gencode_flags(requested_archs(), nvcc_supported_archs(nvcc))
    if not kept:
        sys.exit("fastdw setup: no buildable CUDA arch left; set FASTDW_CUDA_ARCHS")
    arch_str = ";".join(kept)

# The version and arch strings reach the code through a generated header (build_info.h includes
# it), not through -D flags: the compile commands are then the same for an editable install and
# a wheel of the same torch and archs, and the wheel build reuses the editable build's objects
# (ninja rebuilds only what includes the header; the CPU objects never depend on the arch list).
# Rewritten only when its text changes.
GENERATED = ROOT / "build" / "generated"
GENERATED.mkdir(parents=True, exist_ok=True)
_version_h = ("// Generated by setup.py; not in version control.\n"
              f"#define FASTDW_VERSION_STR \"{version}\"\n"
              f"#define FASTDW_TORCH_VERSION_STR \"{torch.__version__}\"\n"
              f"#define FASTDW_CUDA_ARCHS_STR \"{arch_str}\"\n")
_version_path = GENERATED / "fastdw_build_version.h"
if not _version_path.exists() or _version_path.read_text() != _version_h:
    _version_path.write_text(_version_h)

if with_cuda:
    nvcc_flags = opt + defines + [
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "--use_fast_math" if env_flag("FASTDW_FAST_MATH") else "-DFASTDW_NO_FAST_MATH",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        f"--threads={os.environ.get('NVCC_THREADS', '2')}",
        "-DFASTDW_WITH_CUDA",
    ] + archs
    if debug:
        nvcc_flags.append("-g")
    if env_flag("FASTDW_PTXAS_VERBOSE"):
        nvcc_flags.append("--ptxas-options=-v")
    cxx_flags += ["-DFASTDW_WITH_CUDA"]
    print(f"  building CUDA extension for archs: {arch_str}  (FASTDW_CUDA_ARCHS="
          f"{os.environ.get('FASTDW_CUDA_ARCHS', '')!s})")
    ext = CUDAExtension(
        "fastdw._C",
        sources=cpp_sources + cu_sources,
        include_dirs=[str(GENERATED)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    why = "FASTDW_SKIP_CUDA_BUILD=1" if skip_cuda else (
        "torch is a CPU build" if torch.version.cuda is None else "nvcc not found")
    print(f"  building CPU-only extension ({why})")
    ext = CppExtension("fastdw._C", sources=cpp_sources, include_dirs=[str(GENERATED)], extra_compile_args={"cxx": cxx_flags},
                       extra_link_args=link_flags)
print(f"  version {version}")
print("=" * 72)

# What the binary was built against, read by fastdw/__init__.py before it loads _C (another torch
# build then gets a clear error instead of an undefined-symbol one, or a silent ABI mismatch).
(ROOT / "fastdw" / "_build_config.py").write_text(
    "# Generated by setup.py at build time; not in version control.\n"
    f"TORCH_VERSION = {torch.__version__!r}\n"
    f"TORCH_GIT_VERSION = {getattr(torch.version, 'git_version', None)!r}\n"
    f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
    f"CUDA_ARCHS = {(arch_str.split(';') if with_cuda else [])!r}\n"
    f"CUDA_ARCHS_REQUESTED = {(os.environ.get('FASTDW_CUDA_ARCHS') or os.environ.get('TORCH_CUDA_ARCH_LIST'))!r}\n"
    f"VERSION = {version!r}\n")


class FastdwBuildExt(BuildExtension):
    """torch's BuildExtension with one fixed object directory, build/temp.<platform>-<python>,
    whatever command drives it: `pip install -e .` (PEP 660 would otherwise compile into a fresh
    temporary directory every time), `pip wheel .` and `setup.py build_ext --inplace` then share
    one ninja tree and rebuild only what changed (ninja also rebuilds any object whose compile
    command differs, e.g. another arch list)."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = str(ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")


setup(
    name="fastdw",
    version=version,
    description="Fused depthwise conv + BatchNorm + activation kernels for PyTorch",
    packages=find_packages(include=["fastdw", "fastdw.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": FastdwBuildExt},
    python_requires=">=3.10",
    install_requires=[],
    # what the test suite and the benchmark tools need beyond torch (torchvision and timm for the
    # network tests and conversions, matplotlib for `bench/report.py --plot`)
    extras_require={
        "test": ["pytest", "pytest-benchmark", "expecttest", "torchvision", "timm", "onnx", "onnxscript", "onnxruntime"],
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
        "bench": ["pytest-benchmark", "torchvision", "matplotlib"],
    },
    zip_safe=False,
)
