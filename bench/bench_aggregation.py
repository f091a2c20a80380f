"""Server-side aggregation speed: factored vs dense FlexLoRA SVD, and every method as clients and rank grow.

    python bench/bench_aggregation.py [--quick] [--json PATH]

A thin wrapper: the measurements live in `fedlora.bench.aggregation` (`measure_flexlora_svd(...) -> dict`,
`measure_aggregation_times(...) -> list[dict]`), which the `fedlora bench speed` suite also plots.

Run as a script it pins BLAS to one thread unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS are already set: on a
shared 2-core machine a multi-threaded OpenBLAS thrashes (a 1024x320 QR measured 10x slower with 2 threads
under load), which would make the medians meaningless.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # must happen before numpy loads BLAS
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
from typing import Sequence  # noqa: E402

from fedlora.bench.aggregation import (  # noqa: E402,F401  (re-exported for older imports of this script)
    measure_aggregation_times,
    measure_flexlora_svd,
    median_time,
    median_times,
    print_aggregation_table,
    print_svd_table,
    random_updates,
)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid and few repeats (about 10 s)")
    parser.add_argument("--json", help="also write every measured row to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        svd = measure_flexlora_svd(repeats=3)
        rows = measure_aggregation_times(clients=(5, 20), ranks=(4, 16), repeats=1)
    else:
        svd = measure_flexlora_svd(repeats=9)
        rows = measure_aggregation_times(repeats=3)
    print_svd_table(svd)
    print_aggregation_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"flexlora_svd": svd, "aggregation": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
