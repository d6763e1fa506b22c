# Set-up on a fresh machine is part of every target: a venv in .venv with mclx and its
# test/bench dependencies. torch/torchvision ranges admit the releases on local disk.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mclx-installed

.PHONY: install test demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m mclx.demo

bench: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,bench]"
	$(BIN)/python -m pytest --benchmark-only --benchmark-group-by=group

lint: $(STAMP)
	$(BIN)/ruff check toolkit export kernels tests bench
	$(BIN)/ruff format --check toolkit export kernels tests bench

clean:
	rm -rf $(VENV) demo_out .pytest_cache .benchmarks
