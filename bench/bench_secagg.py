"""The cost of secure aggregation per round: flower-sim rounds with privacy.secure_aggregation off and on.

    python bench/bench_secagg.py                         # FFA, 3 and 5 clients, 6 rounds, 1 local step
    python bench/bench_secagg.py --clients 3 --rounds 2 strategy.name=fedit

For each federation size it runs the same config twice on Flower's simulation runtime (Ray, CPU), plain and with
SecAgg+, and prints per round (rounds after the first: the first loads the model in every actor) the wall time,
the bytes up and down (SecAgg: every message of the four stages, keys, encrypted shares, masked int64 vectors),
and SecAgg's four stage times (the collect stage includes local training). Training is kept to one local step
so that the protocol's share of the round shows; with real local training that share shrinks. Last, Flower's
SecAgg+ arithmetic alone (quantization, mask generation, unmasking) for the same upload, timed in this process:
wall times of the federated rounds are noisy on a shared machine, these are not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=1, help="local steps per client and round")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from fedlora.config import load_config
    from fedlora.engines.flower import FlowerSimEngine
    from fedlora.experiment import make_run_dir
    from fedlora.federated_run import Run
    from fedlora.metrics import read_metrics
    from fedlora.progress import RunProgress

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            result = {}
            for secure in (False, True):
                over = ["engine=flower-sim", "strategy.name=ffa", f"federation.num_clients={n}",
                        f"federation.rounds={args.rounds}", f"federation.local_steps={args.steps}",
                        "federation.partition=iid", "data.max_length=32", "data.max_eval_examples=100",
                        "output.save_adapter=false", "output.progress=false",
                        f"privacy.secure_aggregation={str(secure).lower()}", *args.overrides]
                cfg = load_config(None, over)
                run = Run(cfg, make_run_dir(cfg, str(Path(tmp) / f"n{n}-{secure}")), RunProgress(enabled=False))
                FlowerSimEngine(run).execute()
                result[secure] = read_metrics(run.run_dir)[1:]
                rows_shapes = [(d_out, r) for (d_out, _), r in
                               zip(run.server.dims.values(), [max(cfg.client_ranks())] * len(run.server.dims))]
            plain, sec = result[False], result[True]

            def med(rs, key):
                return statistics.median(r[key] for r in rs)

            stages = [statistics.median(r["secagg_stage_s"][i] for r in sec) for i in range(4)]
            rows.append((n, med(plain, "wall_s"), med(sec, "wall_s"), med(plain, "bytes_up"), med(sec, "bytes_up"),
                         med(plain, "bytes_down"), med(sec, "bytes_down"), stages))
    micro = [(n, *client_masking_s(rows_shapes, n)) for n in args.clients]
    print(f"FFA on flower-sim, {args.steps} local step(s); medians over rounds 2..{args.rounds}; torch "
          f"{torch.__version__}, 1 thread per process")
    print("| clients | round s, plain | round s, SecAgg | up, plain | up, SecAgg | down, plain | down, SecAgg | "
          "SecAgg stages s (setup / share keys / collect+train / unmask) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for n, wp, ws, up, us, dp, ds, st in rows:
        print(f"| {n} | {wp:.2f} | {ws:.2f} ({ws / wp:.2f}x) | {up / 1e3:.0f} kB | {us / 1e3:.0f} kB ({us / up:.2f}x) "
              f"| {dp / 1e3:.0f} kB | {ds / 1e3:.0f} kB ({ds / dp:.2f}x) | {' / '.join(f'{s:.2f}' for s in st)} |")
    print()
    print("Flower's SecAgg+ arithmetic alone, in this process (median of 5), for one client's FFA upload of "
          f"{sum(int(np.prod(x)) for x in rows_shapes)} values:")
    print("| clients | client: quantize + masks (s) | server: unmask, one dropout (s) |")
    print("|---:|---:|---:|")
    for n, client_s, server_s in micro:
        print(f"| {n} | {client_s:.3f} | {server_s:.3f} |")
    return 0


def client_masking_s(shapes: list[tuple[int, ...]], n: int) -> tuple[float, float]:
    """What SecAgg+ adds per round beyond messages, with Flower's own functions: a client quantizes its vector
    and adds its private mask and one pairwise mask per other client; the server regenerates every survivor's
    private mask and a dropped client's pairwise masks (one dropout)."""
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    rng = np.random.default_rng(0)
    x = [rng.normal(0, 0.01, size=s) for s in shapes]
    seeds = [rng.bytes(32) for _ in range(n)]

    def client() -> None:
        q = [a.astype(np.int64) for a in quantize(x, 8.0, 2**22)]
        for seed in seeds:  # its private mask, then n - 1 pairwise masks
            q = [a + m for a, m in zip(q, pseudo_rand_gen(seed, 2**32, shapes))]

    def server() -> None:
        total = [np.zeros(s, np.int64) for s in shapes]
        for seed in seeds[:-1] + seeds[:-1]:  # survivors' private masks, the dropped client's pairwise masks
            total = [a - m for a, m in zip(total, pseudo_rand_gen(seed, 2**32, shapes))]

    def med(fn) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return med(client), med(server)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
