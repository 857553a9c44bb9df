#!/usr/bin/env bash
# Build a binary wheel of fastdw for a GPU fleet, against the torch of the active Python:
#   SASS for sm_80, sm_86, sm_89 and sm_90 plus PTX of compute_90 (forward compatibility: newer
#   GPUs JIT the PTX), and a version that names what it was built against, e.g.
#   fastdw-0.1.0+cu130torch2.14-cp312-cp312-linux_x86_64.whl. It only imports under that torch
#   major.minor (else a clear ImportError); on a GPU whose arch the wheel lacks, backend="auto"
#   warns and uses the Triton kernels.
#
#   bash scripts/build_wheel.sh [OUTDIR=dist]      (FASTDW_CUDA_ARCHS overrides the arch list)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-dist}
PY=${PYTHON:-python}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export FASTDW_CUDA_ARCHS=${FASTDW_CUDA_ARCHS:-8.0;8.6;8.9;9.0+PTX}
export FASTDW_LOCAL_VERSION=1
export MAX_JOBS=${MAX_JOBS:-2}
mkdir -p "$OUT"
# --no-build-isolation: build against this torch, never a second one pip would download
$PY -m pip wheel --no-build-isolation --no-deps -w "$OUT" .
ls -l "$OUT"/fastdw-*.whl
