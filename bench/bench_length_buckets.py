"""federation.batching: random batches vs length-bucketed ones, on the default experiment, several seeds.

    python bench/bench_length_buckets.py                     # default config at 3 rounds, 3 seeds, 2 runs at once
    python bench/bench_length_buckets.py --seeds 0 1 2 3 4 federation.rounds=6 federation.batched_clients=false

Each run is `fedlora run` in its own process (one torch thread each when two run at once). Prints, per way of
batching, the final held-out accuracy (mean ± std over seeds and the paired difference), the clients' training
samples/s (median over seeds) and the padding share of the training tokens, counted from each round's batches
as the clients draw them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

WAYS = ("random", "length-buckets")


def run_one(way: str, seed: int, overrides: list[str], out: Path, threads: int) -> dict:
    cmd = [sys.executable, "-m", "fedlora.cli", "run", f"federation.batching={way}", f"seed={seed}", *overrides,
           "output.save_adapter=false", "--out", str(out), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"bench_length_buckets: {way} seed {seed} failed: {done.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"acc": summary["final_accuracy"], "sps": summary.get("train_samples_per_s") or 0.0}


def padding_share(way: str, overrides: list[str]) -> float:
    """Padded share of the tokens in the batches the clients draw over the whole run (seed 0)."""
    from fedlora.client import round_batches
    from fedlora.config import load_config
    from fedlora.experiment import prepare_data
    from fedlora.models import load_tokenizer

    cfg = load_config(None, [f"federation.batching={way}", *overrides])
    data = prepare_data(cfg, load_tokenizer(cfg.model.name))
    padded = real = 0
    for rnd in range(1, cfg.federation.rounds + 1):
        for c, d in enumerate(data.clients):
            for b in round_batches(d, cfg, np.random.default_rng([cfg.seed, rnd, c])):
                lengths = [len(d.input_ids[i]) for i in b]
                padded, real = padded + len(b) * max(lengths), real + sum(lengths)
    return 1 - real / padded


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    overrides = args.overrides or ["federation.rounds=3"]
    threads = 1 if args.jobs > 1 else (os.cpu_count() or 1)
    res: dict[str, dict[int, dict]] = {w: {} for w in WAYS}
    with tempfile.TemporaryDirectory(prefix="bench-buckets-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        futures = {(w, s): pool.submit(run_one, w, s, overrides, Path(tmp) / f"{w}-{s}", threads)
                   for s in args.seeds for w in WAYS}
        for (w, s), fut in futures.items():
            res[w][s] = fut.result()
            print(f"  {w} seed {s}: acc {res[w][s]['acc']:.4f}", file=sys.stderr, flush=True)
    print(f"{'batching':<16} {'final acc (mean ± std)':>24} {'train samples/s (median)':>25} {'padding share':>14}")
    for w in WAYS:
        accs = [r["acc"] for r in res[w].values()]
        sps = statistics.median(r["sps"] for r in res[w].values())
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{w:<16} {statistics.mean(accs):>15.4f} ± {std:.4f} {sps:>25.1f} {padding_share(w, overrides):>14.3f}")
    diffs = [res["length-buckets"][s]["acc"] - res["random"][s]["acc"] for s in args.seeds]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    print(f"length-buckets - random, paired by seed: {100 * statistics.mean(diffs):+.2f} ± {100 * spread:.2f} pts "
          f"({', '.join(f'{100 * d:+.2f}' for d in diffs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
