#!/usr/bin/env bash
# The GPU check, sized for the device budget (15 minutes a session, machine start included; at
# most 10 minutes a command). Two calls, each ending well inside its limit, every step under its
# own timeout and writing its file as it goes (at most 8 files come back from OUTDIR):
#
#   first (default; <= 8 min on a bare machine)    OUTDIR: env.log build.log check.json results.json
#                                                          bench.log profile.txt ncu.txt summary.md
#     1. environment; install the carried build (scripts/device_build.sh's build/device) when the
#        device's torch and the sources match it, else build here for sm_90 with all cores
#     2. correctness sweep of the CUDA and Triton backends (Triton configs pinned): every
#        MobileNetV2 layer at N=2 (fp16/bf16 channels_last, fp32 NCHW; forward, backward, train),
#        one N=128 layer, fallbacks (C % 8 != 0, offset view, dilation, 5x5), empty / 1-element
#     3. layer benchmark: MobileNetV2's 17 layers, N=128 fp16 channels_last; clone, fastdw_cuda,
#        fastdw_triton, eager, eager_folded; inference, backward, train (RESULTS format)
#     4. torch.profiler kernel table (two layers, every provider); 5. ncu on fastdw's kernels
#     6. summary.md: the correctness summary, the per-layer tables (ratios to clone and eager),
#        the static budget (scripts/sass_budget.py, when present) beside the measured times
#   full (the second call; <= 9 min)               OUTDIR: env.log tests.log sanitizer.log
#                                                          results_full.json bench_full.log summary_full.md
#     the GPU test suite (CUDA grids, then Triton grids, each under a timeout), compute-sanitizer
#     memcheck on a small forward + backward + training selection, the compile / compile_max and
#     whole-network rows
#
# The device calls (the carried build is made here first: `bash scripts/device_build.sh`):
#   run(command="bash scripts/gpu_check.sh $OUT first", carry=["build/device"], timeout_s=540)
#   run(command="bash scripts/gpu_check.sh $OUT full",  carry=["build/device"], timeout_s=570)
# then commit OUTDIR/results.json as bench/results/<date>-h200-<sha>.json and regenerate the README
# tables (python bench/report.py FILE --readme README.md).
#
# Without a GPU (or with DRY=1) every step still runs as a rehearsal, on the CPU, with small
# cases: GPU-only steps (ncu, compute-sanitizer) print a "[dry] skip" line, so a typo shows up
# here and not in the first GPU minutes. CI runs both modes that way.
#
#   bash scripts/gpu_check.sh OUTDIR [first|full]      PYTHON: the interpreter (default: the GPU
#                                                      machine's /opt/torch/.venv/bin/python3, else python3)
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [first|full]}
MODE=${2:-first}
case "$MODE" in first|full) ;; *) echo "usage: scripts/gpu_check.sh OUTDIR [first|full]" >&2; exit 2 ;; esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH" PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)} NVCC_THREADS=${NVCC_THREADS:-4}
export FASTDW_TRITON_AUTOTUNE=${FASTDW_TRITON_AUTOTUNE:-0}  # pinned configs: no tuning runs in the budget
if [ -z "${PYTHON:-}" ]; then
  if [ -x /opt/torch/.venv/bin/python3 ]; then PYTHON=/opt/torch/.venv/bin/python3; else PYTHON=python3; fi
fi
PY=$PYTHON
start=$(date +%s)
# The wall-clock limit of this mode: each step's timeout is cut to what is left of it.
LIMIT=$([ "$MODE" = first ] && echo "${FIRST_LIMIT_S:-480}" || echo "${FULL_LIMIT_S:-540}")
elapsed() { echo $(( $(date +%s) - start )); }
stamp() { echo "[$(elapsed)s] $*"; }
# step_timeout CAP: min(CAP, seconds left before LIMIT, keeping 15 s for the summary)
step_timeout() { local left=$(( LIMIT - $(elapsed) - 15 )); [ "$left" -lt "$1" ] && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
run_step() {  # run_step NAME CAP LOGFILE CMD...: the command under its timeout, output appended to LOGFILE
  local name=$1 cap=$2 log=$3; shift 3
  local t; t=$(step_timeout "$cap")
  stamp "$name (timeout ${t}s)"
  timeout --kill-after=10 "$t" "$@" >> "$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "  $name: stopped at its ${t}s timeout (partial output kept in $(basename "$log"))"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "  $name: exit $rc (see $(basename "$log"))"
  return $rc
}

DRY=${DRY:-0}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then DRY=1; fi
[ "$DRY" = 1 ] && stamp "[dry] no usable GPU here (or DRY=1): rehearsal on the CPU, small cases, GPU-only steps skipped"

# ---------------------------------------------------------------------------------------------
# 1. environment and the build
{
  echo "mode $MODE, dry $DRY, python $PY"
  nvidia-smi 2>&1 | head -20 || echo "nvidia-smi: not available"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'git', torch.version.git_version, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  "$PY" -c "import numpy; print('numpy', numpy.__version__)" 2>&1
  echo "commit $(git rev-parse HEAD 2>/dev/null)"; git status --short 2>/dev/null | head -20
  command -v ncu compute-sanitizer || true
} > "$OUT/env.log" 2>&1
stamp "environment -> env.log"; grep -E "^(torch|triton|numpy|python)" "$OUT/env.log" | tr '\n' ';'; echo

SRC_HASH=$(cat setup.py csrc/* | sha256sum | cut -c1-16)
installed=0
if [ -f build/device/manifest.txt ]; then
  want=$(awk '/^sources/{print $2}' build/device/manifest.txt)
  if [ "$want" != "$SRC_HASH" ]; then
    stamp "carried build is for other sources ($want, here $SRC_HASH): not used"
  else
    cp build/device/fastdw/* fastdw/
    if "$PY" -c "import fastdw, sys; i = fastdw.build_info(); print('build_info', i); sys.exit(0 if i['with_cuda'] else 1)" >> "$OUT/env.log" 2>&1; then
      installed=1; stamp "carried build installed ($(awk '/^commit/{print substr($2,1,10)}' build/device/manifest.txt))"
      echo "install: carried build $(tr '\n' ' ' < build/device/manifest.txt)" >> "$OUT/env.log"
    else
      tail -3 "$OUT/env.log"; stamp "carried build does not import under this torch: not used"
      rm -f fastdw/_C.cpython-*.so fastdw/_build_config.py
    fi
  fi
fi
if [ $installed = 0 ] && "$PY" -c "import fastdw, sys; sys.exit(0 if fastdw.build_info()['with_cuda'] else 1)" 2>/dev/null; then
  installed=1; stamp "an existing build imports with CUDA: using it"; echo "install: existing build" >> "$OUT/env.log"
fi
if [ $installed = 0 ]; then
  if [ "$DRY" = 1 ] && [ "${DRY_BUILD:-0}" != 1 ]; then
    stamp "[dry] skip: the sm_90 build (DRY_BUILD=1 runs it); using what imports here"
  else
    run_step "build for sm_90" 240 "$OUT/build.log" env FASTDW_CUDA_ARCHS=9.0 FASTDW_PTXAS_VERBOSE=1 \
      "$PY" setup.py build_ext --inplace || { tail -30 "$OUT/build.log"; stamp "BUILD FAILED"; exit 1; }
  fi
fi
"$PY" -c "import fastdw; print('fastdw', fastdw.build_info(), 'backends', fastdw.available_backends())" 2>&1 | tee -a "$OUT/env.log" | tail -1 | cut -c1-300

DRYFLAG=$([ "$DRY" = 1 ] && echo --dry || true)
rc=0

if [ "$MODE" = first ]; then
  # -------------------------------------------------------------------------------------------
  # 2. correctness sweep
  run_step "correctness sweep" 150 "$OUT/bench.log" "$PY" bench/gpu_correctness.py --out "$OUT/check.json" \
    --budget-s "$(( $(step_timeout 150) - 20 ))" $DRYFLAG || rc=1
  grep -E "^correctness|^FAIL" "$OUT/bench.log" | tail -12

  # 3. layer benchmark (quick sweep, no torch.compile providers: those are in `full`)
  run_step "layer benchmark" 170 "$OUT/bench.log" "$PY" -m fastdw.bench --quick --no-models \
    --provider clone,fastdw_cuda,fastdw_triton,eager,eager_folded --out "$OUT/results.json" $DRYFLAG || rc=1
  grep -E "^wrote|clone bandwidth" "$OUT/bench.log" | tail -2

  # 4. which kernels run
  run_step "profiler kernel table" 60 "$OUT/profile.txt" "$PY" bench/gpu_profile.py $DRYFLAG
  grep -E "^== " "$OUT/profile.txt" | cut -c1-160 | head -24

  # 5. counters of fastdw's kernels
  if [ "$DRY" = 1 ] || ! command -v ncu >/dev/null 2>&1; then
    echo "[dry] skip: ncu (needs a GPU and Nsight Compute)" | tee "$OUT/ncu.txt"
  else
    run_step "ncu (fastdw kernels)" 75 "$OUT/ncu.txt" ncu --clock-control none --target-processes all \
      --kernel-name "regex:body_kernel|_dwconv" --launch-count 16 --section SpeedOfLight --section Occupancy \
      --section LaunchStats "$PY" bench/gpu_profile.py --ncu
    grep -E "body_kernel|_dwconv|DRAM Throughput|Achieved Occupancy|Duration" "$OUT/ncu.txt" | head -40 | cut -c1-150
  fi

  # 6. the summary
  {
    echo "# gpu_check first: $(date -u +%F) commit $(git rev-parse --short HEAD 2>/dev/null)$([ "$DRY" = 1 ] && echo ' (DRY RUN: CPU rehearsal, not GPU numbers)')"
    echo
    "$PY" - "$OUT/check.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    print(f"correctness: no results ({e})"); sys.exit(0)
print("## Correctness\n\n| backend | passed | run |\n|---|---|---|")
for b, s in r.get("summary", {}).items():
    print(f"| {b} | {s['passed']} | {s['run']} |")
bad = [c for c in r.get("cases", []) if not c["ok"]]
for c in bad[:40]:
    print(f"- FAIL {c['backend']} {c['case']} {c['dtype']} {c['layout']} {c['mode']}: "
          f"{ {k: round(v, 5) for k, v in c['errs'].items()} } {c['note']}")
if r.get("not_run"):
    print(f"- not run (budget): {len(r['not_run'])} cases")
PY
    echo
    [ -f "$OUT/results.json" ] && "$PY" bench/report.py "$OUT/results.json"
    if [ -f scripts/sass_budget.py ]; then
      echo; echo "## Static budget (scripts/sass_budget.py)"; echo
      "$PY" scripts/sass_budget.py 2>&1 | tail -60
    fi
  } > "$OUT/summary.md" 2>&1
  stamp "summary -> summary.md"; grep -A4 "^## Correctness" "$OUT/summary.md"; grep -A6 "Per network" "$OUT/summary.md" | head -8
else
  # -------------------------------------------------------------------------------------------
  # full: the GPU test suite, compute-sanitizer, the compile and whole-network rows
  : > "$OUT/tests.log"
  run_step "GPU tests: CUDA grids" 200 "$OUT/tests.log" "$PY" -m pytest tests -q -p no:cacheprovider -m gpu \
    -k "not triton" -ra --durations=10 || rc=1
  tail -3 "$OUT/tests.log"
  run_step "GPU tests: Triton grids" 150 "$OUT/tests.log" "$PY" -m pytest tests -q -p no:cacheprovider -m gpu \
    -k "triton" -ra --durations=10 || rc=1
  tail -3 "$OUT/tests.log"

  if [ "$DRY" = 1 ] || ! command -v compute-sanitizer >/dev/null 2>&1; then
    echo "[dry] skip: compute-sanitizer (needs a GPU)" | tee "$OUT/sanitizer.log"
  else
    for sel in "tests/test_dwconv_bn_act.py|cuda and ((forward_grid and fp16 and channels_last) or (backward_grid and fp32))" \
               "tests/test_train.py|gpu_matches_reference and cuda and ((fp16 and channels_last) or (fp32 and contiguous))"; do
      echo "== memcheck ${sel%%|*}: ${sel#*|}" >> "$OUT/sanitizer.log"
      run_step "compute-sanitizer memcheck ${sel%%|*}" 60 "$OUT/sanitizer.log" compute-sanitizer --tool memcheck \
        --error-exitcode 9 "$PY" -m pytest "${sel%%|*}" -q -p no:cacheprovider -x -k "${sel#*|}" || rc=1
    done
    grep -E "^== |ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -8
  fi

  run_step "compile rows and whole networks" 170 "$OUT/bench_full.log" "$PY" -m fastdw.bench --quick \
    --provider clone,fastdw_cuda,eager,compile,compile_max --budget-s 90 --out "$OUT/results_full.json" $DRYFLAG || rc=1
  grep -E "^wrote" "$OUT/bench_full.log" | tail -1
  [ -f "$OUT/results_full.json" ] && "$PY" bench/report.py "$OUT/results_full.json" > "$OUT/summary_full.md" 2>&1
fi
stamp "done ($MODE$([ "$DRY" = 1 ] && echo ', dry run'); rc=$rc; files: $(ls "$OUT" | tr '\n' ' '))"
exit $rc
