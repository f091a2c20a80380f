#!/usr/bin/env bash
# Builds .gpu-carry/ (the wheels the GPU machine lacks, MiniLM in float16, the Rotten Tomatoes file; git-ignored)
# in this checkout and prints the device tool's exact `run` call: command, carry list, timeout_s.
# Run it in the checkout the device tool sends (the session's own), with fedlora's environment.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m fedlora.bench.gpu_carry
