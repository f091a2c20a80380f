"""Wall time of the same experiment on engine=local (clients one by one, and batched) and engine=flower-sim.

    python bench/bench_engines.py                      # default config, small sizes (minutes on 2 cores)
    python bench/bench_engines.py --full               # the full default `fedlora run` (about 15 min on 2 cores)
    python bench/bench_engines.py federation.num_clients=8 federation.rounds=3

Each engine runs as `fedlora run` in a fresh process, so the times include everything a user waits for:
data preparation, model loading, and for flower-sim Ray's start and one model load per actor. The rounds
column is the sum of the per-round wall times (training + aggregation + central evaluation).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = [
    "federation.num_clients=4", "federation.rounds=2", "federation.local_steps=6", "federation.batch_size=16",
    "data.max_length=48", "data.max_eval_examples=400", "output.save_adapter=false",
]


# (label, overrides): the in-process engine with `federation.batched_clients` off and at its default (auto), and
# Flower's simulation (which always trains its clients one by one, each in its node).
VARIANTS = [
    ("local 1-by-1", ["engine=local", "federation.batched_clients=false"]),
    ("local batched", ["engine=local"]),
    ("flower-sim", ["engine=flower-sim"]),
]


def run_engine(variant: list[str], overrides: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "fedlora.cli", "run", *variant, *overrides,
           "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"bench_engines: {' '.join(variant)} failed: {done.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"wall": wall, "rounds": sum(r["wall_s"] for r in rows), "acc": summary["final_accuracy"],
            "sps": summary.get("train_samples_per_s") or 0.0, "accs": [r["eval_accuracy"] for r in rows]}


def main(argv: list[str]) -> int:
    full = "--full" in argv
    overrides = [a for a in argv if a != "--full"] if full else [*SMALL, *argv]
    res = {}
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        for i, (label, variant) in enumerate(VARIANTS):
            res[label] = run_engine(variant, overrides, Path(tmp) / str(i))
            print(f"  {label}: {res[label]['wall']:.1f} s", file=sys.stderr, flush=True)
    base = res["local batched"]["wall"]
    print(f"{'engine':<14} {'wall s':>8} {'x batched':>10} {'rounds s':>9} {'train samples/s':>16} {'final acc':>10}")
    for label, r in res.items():
        print(f"{label:<14} {r['wall']:>8.1f} {r['wall'] / base:>10.2f} {r['rounds']:>9.1f} {r['sps']:>16.1f} "
              f"{r['acc']:>10.4f}")
    ref = res["local 1-by-1"]["accs"]
    for label in ("local batched", "flower-sim"):
        gap = max(abs(a - b) for a, b in zip(ref, res[label]["accs"]))
        print(f"{label}: largest per-round accuracy difference from local 1-by-1: {gap:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
