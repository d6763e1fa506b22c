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

.PHONY: install viewer-assets test demo bench lint gpu-check gpu-wheels gpu-check-offline clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python $(PIP) -e ".[$(EXTRAS)]"
	$(BIN)/python -m mclx.kernels.warm  # compile the CPU retrieval kernels once, here
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

# The GPU path end to end, one JSON report (docs/gpu.md). Without an NVIDIA GPU it
# prints why in one JSON line and stops (exit 77 of the check; make says "Error 77")
# before installing the GPU stack. Needs PyPI (and pypi.nvidia.com for TensorRT).
gpu-check: $(STAMP)
	$(BIN)/python -m mclx.gpu_check --probe
	$(MAKE) $(GPU_STAMP)
	$(GPU_VENV)/bin/python -m mclx.gpu_check $(GPU_CHECK_ARGS)

# A bare CUDA machine with no network (docs/gpu.md, "Offline"): `make gpu-wheels` here
# downloads what it lacks (toolkit/gpu_check/wheels.txt, one pip call for Python 3.12
# manylinux x86_64, no dependencies followed) and builds mclx's own wheel into .whl/
# (git-ignored, < 16 MiB); carry .whl/ there and run `make gpu-check-offline`, which
# installs them with --no-index --no-deps --target and runs the check and `pytest -m gpu`
# with that machine's python3 (toolkit/gpu_check/offline.sh: exit 77 without a GPU).
WHEELS         := .whl
WHEEL_LIST     := toolkit/gpu_check/wheels.txt
GPU_PY_VERSION := 3.12
# every manylinux tag of an x86_64 glibc >= 2.28 (pip does not widen a tag by itself)
GPU_PLATFORMS  := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
                  manylinux_2_5_x86_64 manylinux1_x86_64
WHEELS_MAX_MIB := 16

gpu-wheels: $(STAMP)
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	$(BIN)/python -m pip download -q --disable-pip-version-check --no-deps \
		--only-binary=:all: --python-version $(GPU_PY_VERSION) --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -r $(WHEEL_LIST) -d $(WHEELS)
	$(BIN)/python -m pip wheel -q --disable-pip-version-check --no-deps -w $(WHEELS) .
	@$(BIN)/python -c "import pathlib, sys; w = sorted(pathlib.Path('$(WHEELS)').glob('*.whl')); \
		mib = sum(p.stat().st_size for p in w) / 2**20; \
		print(f'gpu-wheels: {len(w)} wheels, {mib:.1f} MiB in $(WHEELS)/ (limit $(WHEELS_MAX_MIB) MiB)'); \
		sys.exit(mib >= $(WHEELS_MAX_MIB))"

gpu-check-offline:
	GPU_CHECK_ARGS="$(GPU_CHECK_ARGS)" bash toolkit/gpu_check/offline.sh

clean:
	rm -rf $(VENV) $(GPU_VENV) $(WHEELS) demo_out .pytest_cache .benchmarks toolkit/viewer/vendor
