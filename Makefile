# Every target creates .venv on first use and installs pinned versions from constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo zoo bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision numpy safetensors pytest ruff hypothesis pillow onnx onnxruntime ultralytics
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check torchslim tests benchmarks
	$(VENV)/bin/ruff format --check torchslim tests benchmarks

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m torchslim.demo

zoo: $(STAMP)
	$(PY) -m pytest -q -m zoo --zoo-all

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt torch-pruning
	$(PY) benchmarks/zoo.py --markdown benchmarks/results/zoo.md

clean:
	rm -rf $(VENV) .pytest_cache
