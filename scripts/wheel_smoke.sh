#!/usr/bin/env bash
# Install a fastdw wheel into a fresh venv (no source tree on the path), run a CPU smoke test of
# the installed package, and check the archs compiled into it with cuobjdump.
#
#   bash scripts/wheel_smoke.sh dist/fastdw-*.whl
# TORCH_SPEC (default: the torch of $PYTHON, e.g. torch==2.14.1) is what the venv gets.
set -euo pipefail
WHEEL=$(readlink -f "${1:?usage: scripts/wheel_smoke.sh WHEEL}")
PY=${PYTHON:-python}
TORCH_SPEC=${TORCH_SPEC:-torch==$($PY -c 'import torch; print(torch.__version__.split("+")[0])')}
# resolve paths before leaving the current directory
CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || true)}
[ -n "$CUOBJDUMP" ] && CUOBJDUMP=$(readlink -f "$CUOBJDUMP")
# one scratch directory for the venv (about 6 GB with torch) and the run, removed on any exit
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
VENV=$WORK/venv
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" numpy
"$VENV/bin/python" -m pip install -q --no-deps "$WHEEL"
mkdir "$WORK/run" && cd "$WORK/run"   # nothing of the source tree importable from here
"$VENV/bin/python" - "$WHEEL" <<'PY'
import sys
import torch
import fastdw
from fastdw.reference import dwconv_bn_act_ref

wheel = sys.argv[1]
assert "site-packages" in fastdw.__file__, f"imported {fastdw.__file__}, not the installed wheel"
info = fastdw.build_info()
print("installed:", fastdw.__file__)
print("build_info:", info)
ver = wheel.split("/")[-1].split("-")[1]
mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
assert ver.endswith(f"torch{mm}"), f"wheel version {ver} does not name torch {mm}"
for layout in (torch.contiguous_format, torch.channels_last):
    x = torch.randn(2, 16, 9, 11).contiguous(memory_format=layout).requires_grad_(True)
    w = torch.randn(16, 1, 3, 3, requires_grad=True)
    s, b = torch.rand(16) + 0.5, torch.randn(16)
    y = fastdw.dwconv_bn_act(x, w, s, b, stride=2, padding=1, act="hardswish")
    ref = dwconv_bn_act_ref(x.detach(), w.detach(), s, b, 2, 1, 1, "hardswish")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None
print("wheel smoke test: ok")
PY
# archs in the binary (needs cuobjdump: the CUDA toolkit's, or the nvidia-cuda-cuobjdump wheel's)
SO=$(ls "$VENV"/lib/python*/site-packages/fastdw/_C*.so)
if [ -n "$CUOBJDUMP" ] && "$VENV/bin/python" -c "import fastdw, sys; sys.exit(0 if fastdw.build_info()['with_cuda'] else 1)"; then
  ELF=$("$CUOBJDUMP" --list-elf "$SO" | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ')
  PTX=$("$CUOBJDUMP" --list-ptx "$SO" | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ')
  echo "SASS: $ELF  PTX: $PTX"
  for a in ${EXPECT_SASS:-sm_80 sm_86 sm_89 sm_90}; do
    [[ " $ELF " == *" $a "* ]] || { echo "missing SASS $a in $SO"; exit 1; }
  done
  [[ " $PTX " == *" ${EXPECT_PTX:-sm_90} "* ]] || { echo "missing PTX ${EXPECT_PTX:-sm_90} in $SO"; exit 1; }
else
  echo "(no cuobjdump or a CPU-only wheel: arch check skipped)"
fi
echo "wheel_smoke: ok"
