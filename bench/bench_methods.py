"""Every aggregation method on the embedded default, clients of ranks [4, 8, 16], one table side by side.

    python bench/bench_methods.py                          # the 6 mixed-rank methods, full default run each
    python bench/bench_methods.py --methods rbla,fedit     # a subset; fedit, fedex, lora-fair run at rank 8
    python bench/bench_methods.py federation.rounds=3      # any `fedlora run` override applies to every run
    python bench/bench_methods.py --jobs 2                 # two runs at once, one torch thread each

Each method runs as `fedlora run` in a fresh process on the default config with `federation.ranks=[4, 8, 16]`
(cycled over the 5 clients: ranks 4, 8, 16, 4, 8). `fedit`, `fedex` and `lora-fair` average A and B
element-wise and are refused with mixed ranks, so they run at the uniform rank 8 and the table says so.
Finished runs are kept in --out and reused, so an interrupted bench picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MIXED = ["rbla", "zeropad", "hetlora", "flora", "flexlora", "ffa"]
UNIFORM_ONLY = ["fedit", "fedex", "lora-fair"]
MIXED_RANKS = "[4,8,16]"


def run_method(method: str, overrides: list[str], out: Path, threads: int | None = None) -> dict:
    ranks = MIXED_RANKS if method in MIXED else "[8]"
    run_dir = out / method
    if not (run_dir / "summary.json").exists():
        cmd = [sys.executable, "-m", "fedlora.cli", "run", f"strategy.name={method}", f"federation.ranks={ranks}",
               "output.save_adapter=false", *overrides, "--out", str(run_dir), "--quiet"]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"bench_methods: {method} failed: {done.stderr.strip().splitlines()[-1:]}")
        (run_dir / "process_wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {
        "method": method,
        "ranks": ranks,
        "initial": summary["accuracy_before"],
        "final": summary["final_accuracy"],
        "majority": summary["majority_accuracy"],  # of the run's own held-out split
        "best": max(r["eval_accuracy"] for r in rows),
        "up_per_round": rows[-1]["bytes_up"],
        "down_per_round": rows[-1]["bytes_down"],
        "wall": float((run_dir / "process_wall_s.txt").read_text()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(MIXED), help=f"comma list of {', '.join(MIXED + UNIFORM_ONLY)}")
    ap.add_argument("--out", type=Path, default=Path("bench-out/methods"))
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each with cores/jobs torch threads")
    args, overrides = ap.parse_known_args(argv)
    methods = args.methods.split(",")
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    print(f"{len(methods)} runs, {args.jobs} at a time -> {args.out}", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each run is its own process; threads only wait
        results = list(pool.map(lambda m: run_method(m, overrides, args.out, threads), methods))
    print(f"{'method':<10} {'ranks':<9} {'acc before':>10} {'final':>7} {'best':>7} {'final-majority':>14} "
          f"{'up B/round':>11} {'down B/round':>12} {'wall s':>7}")
    for r in results:
        print(f"{r['method']:<10} {r['ranks']:<9} {r['initial']:>10.4f} {r['final']:>7.4f} {r['best']:>7.4f} "
              f"{r['final'] - r['majority']:>+14.4f} {r['up_per_round']:>11,} {r['down_per_round']:>12,} {r['wall']:>7.1f}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
