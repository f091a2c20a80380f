"""Wall time of the same small experiment on engine=local and engine=flower-sim, side by side.

    python bench/bench_engines.py                      # default config, small sizes (minutes on 2 cores)
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


def run_engine(engine: str, overrides: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "fedlora.cli", "run", f"engine={engine}", *SMALL, *overrides,
           "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"bench_engines: engine={engine} failed: {done.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"wall": wall, "rounds": sum(r["wall_s"] for r in rows), "acc": summary["final_accuracy"],
            "sps": summary.get("train_samples_per_s") or 0.0, "accs": [r["eval_accuracy"] for r in rows]}


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        res = {e: run_engine(e, argv, Path(tmp) / e) for e in ("local", "flower-sim")}
    print(f"{'engine':<11} {'wall s':>8} {'rounds s':>9} {'train samples/s':>16} {'final acc':>10}")
    for e, r in res.items():
        print(f"{e:<11} {r['wall']:>8.1f} {r['rounds']:>9.1f} {r['sps']:>16.1f} {r['acc']:>10.4f}")
    ratio = res["flower-sim"]["wall"] / res["local"]["wall"]
    same = all(abs(a - b) <= 1e-3 for a, b in zip(res["local"]["accs"], res["flower-sim"]["accs"]))
    print(f"flower-sim / local wall time: {ratio:.2f}x   per-round accuracy equal to 1e-3: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
