"""Server-side aggregation speed: factored vs dense FlexLoRA SVD, and every method as clients and rank grow.

Plain functions returning rows (dicts): `measure_flexlora_svd(...) -> dict`,
`measure_aggregation_times(...) -> list[dict]`; `bench/bench_aggregation.py` prints them as tables and the
`speed` suite plots them.

BLAS threads: on a shared 2-core machine a multi-threaded OpenBLAS thrashes (a 1024x320 QR measured 10x slower
with 2 threads under load), which makes medians meaningless. The thread count is fixed when numpy loads, so
callers that want one thread pin it before importing numpy: the script does, and `python -m
fedlora.bench.aggregation PARAMS.json OUT.json` (what the `speed` suite runs) does it here.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # must happen before numpy loads BLAS
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable, Iterable, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from fedlora.strategies import LoraFactors, available_strategies, get_strategy  # noqa: E402
from fedlora.strategies.flexlora import dense_svd, factored_svd, right_svd_of_stack, stacked_factors  # noqa: E402

# The query/value projections of the embedded MiniLM: 6 layers, 384 wide.
MINILM_SHAPES: dict[str, tuple[int, int]] = {f"layer.{i}.{t}": (384, 384) for i in range(6) for t in ("query", "value")}


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time in seconds of each `fn()` over `repeats` calls, after one untimed warm-up call each.

    The functions run round-robin, so that load from other processes hits all of them alike and their ratios
    stay meaningful on a shared machine.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` in seconds over `repeats` calls (after one untimed warm-up call)."""
    return median_times({"fn": fn}, repeats)["fn"]


def random_updates(
    clients: int, rank: int, shapes: dict[str, tuple[int, int]], seed: int = 0, shared_A: bool = False,
    alpha: float = 16.0,
) -> list[dict[str, LoraFactors]]:
    """`clients` updates of one rank; with `shared_A` every client holds the same A (what FFA requires)."""
    rng = np.random.default_rng(seed)
    A_common = {m: rng.normal(size=(rank, d_in)) / np.sqrt(d_in) for m, (_, d_in) in shapes.items()}
    return [
        {
            m: LoraFactors(
                A=A_common[m] if shared_A else rng.normal(size=(rank, d_in)) / np.sqrt(d_in),
                B=rng.normal(size=(d_out, rank)) * 0.01,
                scale=alpha / rank,
            )
            for m, (d_out, d_in) in shapes.items()
        }
        for _ in range(clients)
    ]


def measure_flexlora_svd(d: int = 1024, clients: int = 20, rank: int = 16, repeats: int = 5,
                         seed: int = 0) -> dict:
    """FlexLoRA's server SVD three ways, on the same updates:

    - `server_s`: what the strategy runs: stack the factors, R-only QR of B_cat, QR of A_catᵀ, SVD of the
      Σr_k-square core -> (σ, V); clients' B = ΔW V_r / s_r is later computed from the factors.
    - `factored_s`: the full factored SVD (U, σ, V), both Q factors formed.
    - `dense_s`: the anchor: form ΔW_g = Σ p_k s_k B_k A_k (d x d) and take its thin SVD.
    `max_sv_rel_diff` is max_i |σ_i(server) − σ_i(dense)| / σ_1.
    """
    updates = random_updates(clients, rank, {"m": (d, d)}, seed=seed)
    factors = [u["m"] for u in updates]
    p = np.random.default_rng(seed + 1).uniform(1, 5, size=clients)
    p /= p.sum()
    t = median_times({
        "server": lambda: right_svd_of_stack(*stacked_factors(factors, p)),
        "factored": lambda: factored_svd(factors, p),
        "dense": lambda: dense_svd(factors, p),
    }, repeats)
    s_f, _ = right_svd_of_stack(*stacked_factors(factors, p))
    _, s_full, _ = factored_svd(factors, p)
    _, s_d, _ = dense_svd(factors, p)
    k = s_f.size
    return {
        "d": d, "clients": clients, "rank": rank, "core": k, "repeats": repeats,
        "server_s": t["server"], "factored_s": t["factored"], "dense_s": t["dense"],
        "speedup": t["dense"] / t["server"], "speedup_full": t["dense"] / t["factored"],
        "max_sv_rel_diff": float(max(np.max(np.abs(s_f - s_d[:k])), np.max(np.abs(s_full - s_d[:k]))) / s_d[0]),
        "dense_tail_rel": float(np.max(s_d[k:]) / s_d[0]) if s_d.size > k else 0.0,
    }


def measure_aggregation_times(
    methods: Sequence[str] | None = None,
    clients: Iterable[int] = (5, 10, 20, 50),
    ranks: Iterable[int] = (4, 8, 16, 32),
    shapes: dict[str, tuple[int, int]] | None = None,
    repeats: int = 3,
    seed: int = 0,
) -> list[dict]:
    """Median `strategy.aggregate(updates, weights)` time per (method, clients, rank), validation included.

    Default modules: the query/value projections of a 6-layer, 384-wide encoder (the embedded MiniLM).
    One row per point: {method, clients, rank, modules, d_out, d_in, median_s}.
    """
    methods = list(methods or available_strategies())
    shapes = shapes or MINILM_SHAPES
    rows = []
    for K in clients:
        weights = list(np.random.default_rng(seed).uniform(1, 5, size=K))
        for r in ranks:
            plain = random_updates(K, r, shapes, seed=seed)
            shared = random_updates(K, r, shapes, seed=seed, shared_A=True)
            fns = {name: _aggregate_call(name, shared if not get_strategy(name).trains_A else plain, weights)
                   for name in methods}
            d_out, d_in = next(iter(shapes.values()))
            for name, t in median_times(fns, repeats).items():
                rows.append({"method": name, "clients": K, "rank": r, "modules": len(shapes),
                             "d_out": d_out, "d_in": d_in, "median_s": t})
    return rows


def _aggregate_call(name: str, updates, weights) -> Callable[[], object]:
    # a fresh strategy per call: stateful methods (slot memory, FFA's shared A) must not carry over
    return lambda: get_strategy(name).aggregate(updates, weights)


def print_svd_table(row: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"FlexLoRA SVD: d={row['d']}, {row['clients']} clients, rank {row['rank']} "
                        f"(core {row['core']}x{row['core']}), median of {row['repeats']}, "
                        f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}")
    for col in ("server path σ,V (ms)", "full factored U,σ,V (ms)", "dense (ms)", "speed-up server / full",
                "max |Δσ| / σ₁"):
        table.add_column(col, justify="right")
    table.add_row(f"{row['server_s'] * 1e3:.1f}", f"{row['factored_s'] * 1e3:.1f}", f"{row['dense_s'] * 1e3:.1f}",
                  f"{row['speedup']:.1f}x / {row['speedup_full']:.1f}x", f"{row['max_sv_rel_diff']:.1e}")
    console = Console()
    console.width = max(console.width, 150)
    console.print(table)


def print_aggregation_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    points = sorted({(r["clients"], r["rank"]) for r in rows})
    methods = sorted({r["method"] for r in rows})
    t = {(r["method"], r["clients"], r["rank"]): r["median_s"] for r in rows}
    first = rows[0]
    table = Table(title=f"aggregate() median ms: {first['modules']} modules of {first['d_out']}x{first['d_in']}")
    table.add_column("clients", justify="right")
    table.add_column("rank", justify="right")
    for m in methods:
        table.add_column(m, justify="right")
    for K, r in points:
        table.add_row(str(K), str(r), *(f"{t[(m, K, r)] * 1e3:.1f}" for m in methods))
    console = Console()
    console.width = max(console.width, 150)  # piped output defaults to 80 columns and truncates method names
    console.print(table)


def _main_json(params_path: str, out_path: str) -> None:
    """Measure with one BLAS thread in a fresh process: {"svd": kwargs, "aggregation": kwargs} -> rows."""
    params = json.loads(open(params_path).read())
    agg = dict(params["aggregation"])
    if "shapes" in agg:
        agg["shapes"] = {k: tuple(v) for k, v in agg["shapes"].items()}
    result = {
        "flexlora_svd": measure_flexlora_svd(**params["svd"]),
        "aggregation": measure_aggregation_times(**agg),
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
    }
    with open(out_path, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    _main_json(*sys.argv[1:3])
