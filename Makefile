# omnistream: `make demo` and `make test` each set up .venv on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (a plain `torch` requirement could pull a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	bash tools/system-deps.sh
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m omnistream demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The development loop: no subprocess/browser tests, nothing marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not process" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/encoders.py --json

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
