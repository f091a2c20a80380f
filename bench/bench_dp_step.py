"""Cost of one DP-SGD step against the non-private step on the embedded MiniLM + LoRA (r=8, query/value).

Real rotten-tomatoes sentences, batch 32, max_length 64 padded to the batch's longest. Non-private and DP
steps alternate batch by batch on the same model, so load on a shared machine hits both alike; the median
per-step time is reported, with the cost of entering + leaving ``private_training`` measured separately.

    python bench/bench_dp_step.py [--steps 12] [--threads N] [--json out.json]

A thin wrapper: ``measure_dp_step(...) -> list[dict]`` lives in ``fedlora.bench.dp_step`` (the ``speed`` suite
reports it too).
"""

from __future__ import annotations

import argparse
import json
import os

from fedlora.bench.dp_step import (  # noqa: F401  (re-exported for older imports of this script)
    MODES,
    build_model,
    format_table,
    load_sentences,
    measure_dp_step,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--modes", nargs="+", default=["ffa", "fedit"], choices=sorted(MODES))
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    rows = measure_dp_step(args.batch_size, args.max_length, args.steps, args.warmup, tuple(args.modes), args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"DP-SGD step vs non-private step (MiniLM-L6, LoRA r=8 q/v + head; cpus={os.cpu_count()}, load1={load:.1f})")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
