#!/usr/bin/env bash
# Build libfastdw and its C++ test with CMake against the torch of the active Python, then run
# ctest. Usage: bash scripts/build_cmake.sh [BUILD_DIR] [extra cmake args, e.g. -DFASTDW_WITH_CUDA=ON]
#
# A CUDA build of torch makes find_package(Torch) look for the CUDA toolkit (CUDA_HOME, default
# /usr/local/cuda) and for libnvrtc, which pip installs next to torch (nvidia/*/lib) rather than
# in the toolkit: both are passed here.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build/cmake}
shift || true
PY=${PYTHON:-python}
PREFIX=$($PY -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
ARGS=(-DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Release)
if [ "$($PY -c 'import torch; print(torch.version.cuda or "")')" != "" ]; then
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  ARGS+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DCUDAToolkit_ROOT="$CUDA_HOME")
  # torch's CMake config otherwise compiles and runs a probe for the local GPUs
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${FASTDW_CUDA_ARCHS:-8.0;9.0}}
  NVRTC=$($PY - <<'PY'
import glob, os, site
paths = site.getsitepackages() + [site.getusersitepackages()]
hits = [p for s in paths for p in sorted(glob.glob(os.path.join(s, "nvidia", "*", "lib", "libnvrtc.so*")))]
hits += sorted(glob.glob(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "lib64", "libnvrtc.so*")))
print(hits[0] if hits else "")
PY
)
  [ -n "$NVRTC" ] && ARGS+=(-DCUDA_nvrtc_LIBRARY="$NVRTC")
fi
cmake -S . -B "$BUILD" "${ARGS[@]}" "$@"
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure
