#!/usr/bin/env bash
# The GPU machine's build, made here: fastdw._C for the GPU machine's versions (CPython 3.12,
# torch 2.11.0+cu130, triton 3.6.0, torchvision 0.26.0), SASS for sm_90 only, stripped, with its
# build-config file (torch version and git commit, which `import fastdw` checks), into
# OUTDIR/fastdw/, plus OUTDIR/manifest.txt (the source commit and a hash of csrc/ + setup.py).
# A session with a GPU carries OUTDIR and scripts/gpu_check.sh installs it there when the
# device's torch matches and the sources are the same, instead of spending 2-2.5 of its 15
# device minutes compiling. CI runs this script and the CPU test suite on its output (.ci/run).
#
#   bash scripts/device_build.sh [OUTDIR] [--test]     OUTDIR: default build/device
#
# --test: then runs the CPU test suite with that venv on a copy of the tree holding the build.
# The venv (.venv-device, created when missing; VENV overrides) holds the pinned versions and
# numpy < 2.4 (Triton 3.6's interpreter breaks with numpy >= 2.4). The build happens in a copy of
# the source tree (build/device-src), so the developer's own in-place build is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=build/device
RUN_TESTS=0
for a in "$@"; do
  case "$a" in
    --test) RUN_TESTS=1 ;;
    -*) echo "usage: scripts/device_build.sh [OUTDIR] [--test]" >&2; exit 2 ;;
    *) OUT=$a ;;
  esac
done
VENV=${VENV:-.venv-device}
PIN_TORCH="torch==2.11.0 triton==3.6.0 torchvision==0.26.0 numpy<2.4"
# (no onnx / onnxruntime: the GPU machine has none either, and tests/test_onnx.py runs in the main venv)
TEST_DEPS="pytest pytest-benchmark expecttest timm nvidia-cuda-cuobjdump==13.2.78"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
start=$(date +%s)
stamp() { echo "[device_build $(( $(date +%s) - start ))s] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  stamp "creating $VENV (Python 3.12, $PIN_TORCH)"
  PY312=${PY312:-python3.12}
  if command -v pyenv >/dev/null 2>&1 && [ -z "${PYENV_VERSION:-}" ]; then export PYENV_VERSION=3.12.1; fi
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel ninja
fi
if [ ! -f "$VENV/.pinned" ] || [ "$(cat "$VENV/.pinned")" != "$PIN_TORCH $TEST_DEPS" ]; then
  stamp "installing $PIN_TORCH $TEST_DEPS"
  printf '%s\n' $PIN_TORCH > "$VENV/constraints.txt"  # the test deps must not move the pins
  "$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" $PIN_TORCH $TEST_DEPS
  echo "$PIN_TORCH $TEST_DEPS" > "$VENV/.pinned"
fi
PY="$ROOT/$VENV/bin/python"
"$PY" - <<'PY'
import sys, torch, triton, numpy
print(f"device venv: python {sys.version.split()[0]}, torch {torch.__version__} (git {torch.version.git_version[:12]}), "
      f"CUDA {torch.version.cuda}, triton {triton.__version__}, numpy {numpy.__version__}")
assert sys.version_info[:2] == (3, 12), "the GPU machine runs Python 3.12"
assert torch.__version__ == "2.11.0+cu130", f"the GPU machine runs torch 2.11.0+cu130, not {torch.__version__}"
PY

# A copy of the tracked and untracked-but-not-ignored files (mtimes kept, so ninja rebuilds only
# what changed since the last run).
SRC=build/device-src
mkdir -p "$SRC"
git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf - | tar -xf - -C "$SRC"
stamp "building for sm_90 in $SRC"
(cd "$SRC" && FASTDW_CUDA_ARCHS=9.0 PATH="$ROOT/$VENV/bin:$PATH" "$PY" setup.py build_ext --inplace > build.log 2>&1) || {
  tail -40 "$SRC/build.log"; stamp "BUILD FAILED"; exit 1; }
SO=$(cd "$SRC/fastdw" && ls _C.cpython-312-*.so)
rm -rf "$OUT" && mkdir -p "$OUT/fastdw"
strip --strip-debug -o "$OUT/fastdw/$SO" "$SRC/fastdw/$SO"
cp "$SRC/fastdw/_build_config.py" "$OUT/fastdw/"
cp "$OUT/fastdw/$SO" "$SRC/fastdw/$SO"  # the tests below run the very file that travels
# What the binary was built from: gpu_check.sh rebuilds on the device when this differs there.
SRC_HASH=$(cd "$SRC" && cat setup.py csrc/* | sha256sum | cut -c1-16)
cat > "$OUT/manifest.txt" <<EOF
commit $(git rev-parse HEAD)
sources $SRC_HASH
python 3.12
torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.git_version)')
archs 9.0
EOF
stamp "$OUT: $(du -sh "$OUT" | cut -f1) ($SO, _build_config.py, manifest.txt); sources $SRC_HASH"
(cd "$SRC" && "$PY" -c "import fastdw; i = fastdw.build_info(); print('import ok:', i); assert i['with_cuda'] and i['cuda_archs'] == ['9.0']")

if [ "$RUN_TESTS" = 1 ]; then
  stamp "CPU test suite under the device venv"
  (cd "$SRC" && "$PY" -m pytest tests -q -p no:cacheprovider)
fi
stamp "done"
