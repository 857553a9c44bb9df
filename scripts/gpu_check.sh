#!/usr/bin/env bash
# One command on a GPU machine (torch, triton, pytest, pytest-benchmark preinstalled; no internet):
# builds fastdw in place against that torch, runs the whole test suite (CUDA cases included),
# compute-sanitizer memcheck and racecheck on a small selection, the quick benchmark sweep, and
# writes logs plus a results JSON to OUTDIR (at most 8 files), ending with a short table.
#
#   bash scripts/gpu_check.sh "$OUT"
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
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

stamp "build (archs: the visible GPU's unless FASTDW_CUDA_ARCHS is set)"
if ! FASTDW_PTXAS_VERBOSE=1 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; stamp "BUILD FAILED"; exit 1
fi
$PY -c "import fastdw; print(fastdw.build_info())" | tee -a "$OUT/build.log"
grep -E "bytes spill" "$OUT/build.log" | grep -v " 0 bytes spill stores, 0 bytes spill loads" | sort | uniq -c | tail -5

stamp "tests"
$PY -m pytest tests -q -p no:cacheprovider -ra > "$OUT/tests.log" 2>&1
rc_tests=$?
tail -3 "$OUT/tests.log"

stamp "compute-sanitizer memcheck + racecheck (small selection)"
SEL="tests/test_dwconv_bn_act.py"
KSEL="cuda and ((forward_grid and fp16 and channels_last) or (backward_grid and fp32))"
{
  for tool in memcheck racecheck; do
    echo "== $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 9 $PY -m pytest "$SEL" -q -p no:cacheprovider -x \
      -k "$KSEL" --maxfail=1 2>&1 | tail -15
    echo "rc=${PIPESTATUS[0]}"
  done
} > "$OUT/sanitizer.log" 2>&1
grep -E "^== |^rc=|ERROR SUMMARY" "$OUT/sanitizer.log"

stamp "quick benchmark sweep"
# keep the whole script inside 10 minutes: compile_max autotuning stops after ~3 minutes
$PY bench/gpu_quick.py --out "$OUT/results.json" --budget-s "${BENCH_BUDGET_S:-180}" > "$OUT/bench.log" 2>&1
rc_bench=$?
tail -20 "$OUT/bench.log"

stamp "summary"
$PY - "$OUT/results.json" > "$OUT/summary.txt" 2>&1 <<'PY'
import json, sys
from collections import defaultdict
r = json.load(open(sys.argv[1]))
print(f"{r['device']}  clone {r['clone_gbps']:.0f} GB/s  commit {r['commit'][:10]}")
t = defaultdict(dict)
for row in r["layers"]:
    t[(row["mode"], row["provider"])][row["layer"]] = row
for mode in ("inference", "backward"):
    base = t.get((mode, "fastdw_cuda"), {})
    for prov in ("fastdw_cuda", "eager", "eager_folded", "compile", "compile_max", "clone"):
        rows = t.get((mode, prov), {})
        ok = [v for v in rows.values() if v.get("median_us")]
        if not ok:
            continue
        tot = sum(v["median_us"] for v in ok)
        gbps = sum(v["bytes"] for v in ok) / (tot * 1e-6) / 1e9
        fast = sum(base[k]["median_us"] for k in rows if k in base and base[k].get("median_us") and rows[k].get("median_us"))
        print(f"{mode:9s} {prov:13s} layers {len(ok):2d}  sum {tot:9.1f} us  {gbps:7.0f} GB/s "
              f"({gbps / r['clone_gbps'] * 100:5.1f}% of clone)  fastdw speed-up {tot / fast if fast else float('nan'):.2f}x")
PY
cat "$OUT/summary.txt"
stamp "done (tests rc=$rc_tests, bench rc=$rc_bench)"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
