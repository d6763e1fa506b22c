# Set-up on a fresh machine is part of every target: a venv in .venv with mclx and its
# test/bench dependencies. torch/torchvision ranges admit the releases on local disk.
# ONNX Runtime comes from exactly one of the extras cpu (.venv) and gpu (.venv-gpu): both
# distributions install the same `onnxruntime` package, so they never share a venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mclx-installed
PIP    := -m pip install -q --disable-pip-version-check
GPU_VENV  := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.mclx-installed

.PHONY: install test demo bench lint gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python $(PIP) -e ".[cpu,dev]"
	touch $(STAMP)

$(GPU_STAMP): pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python $(PIP) -e ".[gpu,dev]"
	touch $(GPU_STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m mclx.demo

bench: $(STAMP)
	$(BIN)/python $(PIP) -e ".[cpu,dev,bench]"
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-group-by=group

lint: $(STAMP)
	$(BIN)/ruff check toolkit export kernels tests bench
	$(BIN)/ruff format --check toolkit export kernels tests bench

# The GPU path end to end, one JSON report (README "GPU"). Without an NVIDIA GPU it
# prints why in one JSON line and exits 77 (skipped) before installing the GPU stack.
gpu-check: $(STAMP)
	$(BIN)/python -m mclx.gpu_check --probe
	$(MAKE) $(GPU_STAMP)
	$(GPU_VENV)/bin/python -m mclx.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(GPU_VENV) demo_out .pytest_cache .benchmarks
