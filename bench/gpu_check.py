"""The GPU check, one prepared run: see fedlora.bench.gpu_check (sections, time boxes, outputs) and
bench/gpu_prepare.sh (what the device needs carried, and the exact call).

    python bench/gpu_check.py --out DIR          # on the device
    python bench/gpu_check.py --tiny --out DIR   # seconds on a CPU
    python bench/gpu_check.py --render DIR/gpu_check.json --into docs/benchmarks.md
"""

import sys

from fedlora.bench.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
