# The two commands (README.md): `make bench` sets up and runs the op benchmark,
# `make test` sets up and runs the test suite. Both create $(VENV) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Compile the CUDA sources too wherever a CUDA toolkit is installed (they compile and link
# without a GPU); on a machine without a GPU, `make FORCE_CUDA=0 ...` skips them.
CUDA_HOME ?= /usr/local/cuda
ifneq ($(wildcard $(CUDA_HOME)/bin/nvcc),)
FORCE_CUDA ?= 1
endif
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export CUDA_HOME FORCE_CUDA TORCH_CUDA_ARCH_LIST

.PHONY: test bench build lint clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

# Rebuild the extension only when its sources change (pip's editable build starts from
# scratch every time); the Python package is installed in place.
NATIVE_SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .

# ruff, the suite, then the whole-model float32 tests again with ATen and oneDNN limited to AVX2: their
# float32 rounding differs between AVX2 and AVX-512 hosts, and the tolerance must hold on both.
# With a CUDA toolkit: the CUDA kernels' ptxas resources (fails on spills or stack frames).
test: build lint
	SE_KERNELS_REQUIRE_EXT=1 $(PY) -m pytest -q tests
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 SE_KERNELS_REQUIRE_EXT=1 \
		$(PY) -m pytest -q -m float32_models tests/test_convert.py
	$(PY) -m pytest -q benchmarks/test_gpu_model.py
ifeq ($(FORCE_CUDA),1)
	$(PY) benchmarks/cuda_resources.py --device-only --check
endif

bench: build
	$(PY) benchmarks/bench_se.py $(BENCH_ARGS)

clean:
	rm -rf build se_kernels/_C*.so *.egg-info $(VENV)/.built
