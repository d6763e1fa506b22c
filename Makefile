# Set-up on a fresh machine is part of every target: a venv in .venv with mclx and its
# test/bench dependencies (EXTRAS, e.g. EXTRAS=dev,spatialdata), and OpenSeadragon for
# `mclx view`. torch/torchvision ranges admit the releases on local disk.
PYTHON ?= python3
EXTRAS ?= dev
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mclx-installed

.PHONY: install viewer-assets test demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $(STAMP)

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
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,bench]"
	$(BIN)/python -m pytest --benchmark-only --benchmark-group-by=group

lint: $(STAMP)
	$(BIN)/ruff check toolkit export kernels tests bench
	$(BIN)/ruff format --check toolkit export kernels tests bench

clean:
	rm -rf $(VENV) demo_out .pytest_cache .benchmarks toolkit/viewer/vendor
