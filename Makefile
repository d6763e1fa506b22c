# Set-up on a fresh machine is part of every target: a venv in .venv with mclx and its
# test/bench dependencies (EXTRAS, e.g. EXTRAS=cpu,dev,spatialdata), and OpenSeadragon for
# `mclx view`. torch/torchvision ranges admit the releases on local disk.
# ONNX Runtime comes from exactly one of the extras cpu (.venv) and gpu (.venv-gpu): both
# distributions install the same `onnxruntime` package, so they never share a venv.
PYTHON ?= python3
EXTRAS ?= cpu,dev
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mclx-installed
PIP    := -m pip install -q --disable-pip-version-check
GPU_VENV  := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.mclx-installed

.PHONY: install viewer-assets test demo bench lint gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python $(PIP) -e ".[$(EXTRAS)]"
	touch $(STAMP)

$(GPU_STAMP): pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python $(PIP) -e ".[gpu,dev]"
	touch $(GPU_STAMP)

# OpenSeadragon (pinned npm package) fetched with npm into toolkit/viewer/vendor/ (package
# data, git-ignored); a no-op once there. Without npm: a warning, and `mclx view` says how.
viewer-assets: $(STAMP)
	@$(BIN)/python -m mclx.viewer.openseadragon || \
		echo "make: warning: OpenSeadragon not fetched; mclx view needs it (see the line above)"

install: $(STAMP) viewer-assets

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python -m mclx.demo

bench: $(STAMP)
	$(BIN)/python $(PIP) -e ".[cpu,dev,bench]"
	$(BIN)/python -m pytest --benchmark-only --benchmark-group-by=group

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
	rm -rf $(VENV) $(GPU_VENV) demo_out .pytest_cache .benchmarks toolkit/viewer/vendor
