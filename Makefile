# fastdw: set-up and run targets. `make demo` and `make test` each work on a fresh machine:
# they create .venv, install torch 2.14.1 (CUDA 13 build) and everything else, build fastdw
# (with its CUDA code where nvcc is present) and run.
#
#   make demo    # the main job: MobileNetV2 stock vs fastdw (GPU: vs cuDNN; CPU-only: CPU path)
#   make test    # the test suite, then the benchmark suites in smoke mode
#
# On a machine that already has torch (e.g. a GPU box), skip the venv:
#   pip install --no-build-isolation --no-deps -e . && python -m pytest tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TEST_DEPS := pytest pytest-benchmark timm expecttest matplotlib onnx onnxscript onnxruntime nvidia-cuda-cuobjdump==13.2.78
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda),/usr/local/cuda,)
export MAX_JOBS ?= 2

.PHONY: demo test build clean bench-cpu bench-host

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q setuptools wheel ninja numpy
	$(PIP) install -q $(TORCH_SPEC)
	touch $@

$(VENV)/.testdeps: $(VENV)/.torch
	$(PIP) install -q $(TEST_DEPS)
	touch $@

# Build against the venv's torch (never an isolated second copy).
build: $(VENV)/.torch
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PIP) install --no-build-isolation --no-deps -e .

demo: build
	$(PY) -m fastdw

test: $(VENV)/.testdeps build
	$(PY) -m pytest tests -q -p no:cacheprovider
	$(PY) -m pytest $(wildcard bench/bench_*.py) -q -p no:cacheprovider --benchmark-disable

bench-cpu: $(VENV)/.testdeps build
	$(PY) bench/cpu_compare.py --out cpu.json

bench-host: $(VENV)/.testdeps build
	$(PY) bench/host_overhead.py

clean:
	rm -rf build $(VENV) fastdw/_C*.so *.egg-info
