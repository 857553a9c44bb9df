#!/usr/bin/env bash
# One command on a GPU machine (torch, triton, pytest, pytest-benchmark preinstalled; no internet):
# builds fastdw in place against that torch, runs the whole test suite (CUDA and Triton cases
# included), compute-sanitizer memcheck and racecheck on a small selection, the quick benchmark
# sweep (python -m fastdw.bench --quick), and writes logs plus a results JSON to OUTDIR (at most
# 8 files), ending with the report tables.
#
#   bash scripts/gpu_check.sh OUTDIR [STAGE ...]     STAGE: build tests sanitizer bench (default: all)
#
# Stages can be run in separate calls on the same machine (the in-place build persists), e.g.
# "build tests sanitizer" in one and "bench" in the next, when one call has a time limit.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [build|tests|sanitizer|bench ...]}
shift
STAGES=${*:-build tests sanitizer bench}
want() { [[ " $STAGES " == *" $1 "* ]]; }
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS=${MAX_JOBS:-$(nproc)} NVCC_THREADS=${NVCC_THREADS:-4}
PY=${PYTHON:-python}
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }

{
  nvidia-smi
  $PY -c "import torch, sys; print('python', sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  git rev-parse HEAD; git status --short | head -20
} > "$OUT/env.log" 2>&1

rc_tests=0 rc_bench=0
if want build; then
  stamp "build (archs: the visible GPU's unless FASTDW_CUDA_ARCHS is set)"
  if ! FASTDW_PTXAS_VERBOSE=1 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -30 "$OUT/build.log"; stamp "BUILD FAILED"; exit 1
  fi
  $PY -c "import fastdw; print(fastdw.build_info())" | tee -a "$OUT/build.log"
  grep -E "bytes spill" "$OUT/build.log" | grep -v " 0 bytes spill stores, 0 bytes spill loads" | sort | uniq -c | tail -5
  # the Triton kernels through this Triton's ahead-of-time compiler: registers and spills
  $PY scripts/triton_compile_check.py --quick --archs "$($PY -c 'import torch; p=torch.cuda.get_device_capability(); print(p[0]*10+p[1])')" \
    >> "$OUT/build.log" 2>&1 || echo "triton_compile_check failed (see build.log)"
  tail -3 "$OUT/build.log"
fi

if want tests; then
stamp "tests"
# FASTDW_TRITON_AUTOTUNE=0: the Triton kernels use their first config (each autotune key would
# otherwise compile and time every config); test_every_config_gpu pins the others in turn.
FASTDW_TRITON_AUTOTUNE=0 $PY -m pytest tests -q -p no:cacheprovider -ra --durations=15 > "$OUT/tests.log" 2>&1
rc_tests=$?
tail -3 "$OUT/tests.log"
fi

if want sanitizer; then
stamp "compute-sanitizer memcheck + racecheck (small selection)"
# (test file, -k expression): the inference op, then the training op
SELS=("tests/test_dwconv_bn_act.py|cuda and ((forward_grid and fp16 and channels_last) or (backward_grid and fp32))"
      "tests/test_train.py|gpu_matches_reference and cuda and ((fp16 and channels_last) or (fp32 and contiguous))")
{
  for tool in memcheck racecheck; do
    for sel in "${SELS[@]}"; do
      echo "== $tool ${sel%%|*}"
      compute-sanitizer --tool "$tool" --error-exitcode 9 $PY -m pytest "${sel%%|*}" -q -p no:cacheprovider -x \
        -k "${sel#*|}" --maxfail=1 2>&1 | tail -15
      echo "rc=${PIPESTATUS[0]}"
    done
  done
} > "$OUT/sanitizer.log" 2>&1
grep -E "^== |^rc=|ERROR SUMMARY" "$OUT/sanitizer.log"
fi

if want bench; then
stamp "quick benchmark sweep"
# compile_max (max-autotune) stops being started after BENCH_BUDGET_S seconds
$PY -m fastdw.bench --quick --out "$OUT/results.json" --budget-s "${BENCH_BUDGET_S:-150}" > "$OUT/bench.log" 2>&1
rc_bench=$?
tail -25 "$OUT/bench.log"
$PY bench/report.py "$OUT/results.json" > "$OUT/summary.md" 2>&1
head -12 "$OUT/summary.md"
fi
stamp "done (stages: $STAGES; tests rc=$rc_tests, bench rc=$rc_bench)"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
