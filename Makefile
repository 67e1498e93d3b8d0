# One-command entry points (see README):  make setup  |  make demo  |  make test  |  make bench
# Each creates the virtual environment and builds the extension first when needed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# The CUDA toolkit root (torch otherwise guesses it from `which nvcc`, wrongly when nvcc is a
# wrapper script), a bounded number of compile jobs, and the GPU arch when none is visible.
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2

CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: setup build demo test test-python test-cpp test-bench-smoke test-examples test-lesser-cpu bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/dev.txt pyproject.toml setup.py setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements/dev.txt
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@ $(VENV)/.built

# Recompiles only what changed in csrc/ since the last build.
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed $(CSRC)
	$(PY) setup.py -q build_ext --inplace
	touch $@

demo: build
	$(VENV)/bin/dfa demo

test: test-python test-cpp test-bench-smoke test-examples test-lesser-cpu

test-python: build
	$(PY) -m pytest python_tests

# Every microbenchmark called once, without timing (the compiled ones left out: minutes of
# compilation on the CPU), so that the benchmarks cannot rot.
test-bench-smoke: build
	$(PY) -m pytest bench --benchmark-disable -m "not compile" -q -p no:cacheprovider

# The examples (examples/README.md) at tiny sizes, so that they cannot rot: the own-loop one in each
# mode, the image-folder one on a synthetic folder it writes, the ops alone. A fresh output folder
# each time (the runs resume a folder they filled before).
EXAMPLES_OUT := build/examples
test-examples: build
	rm -rf $(EXAMPLES_OUT)
	$(PY) examples/own_networks_own_loop.py --epochs 2 --search-steps 4 --mode eager --out $(EXAMPLES_OUT)/own-loop-eager
	$(PY) examples/own_networks_own_loop.py --epochs 2 --search-steps 4 --mode compile --out $(EXAMPLES_OUT)/own-loop-compile
	$(PY) examples/own_networks_own_loop.py --epochs 2 --search-steps 4 --mode bf16 --out $(EXAMPLES_OUT)/own-loop-bf16
	$(PY) examples/torchvision_teacher_image_folder.py --make-tiny-folder $(EXAMPLES_OUT)/images \
		--teacher-epochs 2 --epochs 2 --search-steps 4 --out $(EXAMPLES_OUT)/image-folder
	$(PY) examples/ops_alone.py

# The tests whose float bounds are derived or calibrated (marker `rounding`, python_tests/rounding.py)
# once more with the kernels of a CPU without AVX2: oneDNN's SSE4.1 convolutions, ATen's and
# dfa_ext's baseline builds. Their bounds must hold on any CPU (CI may run on AVX-512 or on older
# ones); this keeps them so. Its own inductor cache: torch's does not key on ATEN_CPU_CAPABILITY and
# would hand the baseline build code compiled for AVX2.
test-lesser-cpu: build
	ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/build/inductor-lesser-cpu \
		$(PY) -m pytest python_tests -m rounding -q -p no:cacheprovider

test-cpp: build
	PYTHON=$(PY) bash cpp_tests/run.sh

# The microbenchmark tables (fused vs eager vs compiled reference; --benchmark-autosave keeps a run
# for --benchmark-compare), the same as one Markdown table, then the roofline table of the ops.
bench: build
	mkdir -p bench/out
	$(PY) -m pytest bench --benchmark-only --benchmark-autosave --benchmark-json=bench/out/ops.json -p no:cacheprovider
	$(PY) bench/report_benchmarks.py bench/out/ops.json --markdown bench/out/ops.md
	$(PY) bench/bench_ops.py

clean:
	rm -rf build dfa_ext/_C*.so *.egg-info
