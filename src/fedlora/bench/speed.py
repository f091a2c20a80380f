"""Suite `speed`: client samples/s against a bare PEFT loop, DP step cost, server aggregation time per method as
clients and rank grow, and bytes per round per method.

Each measurement section is cached in `<out>/cache/<section>-<hash of its parameters>.json`, like the training
runs of the other suites: an interrupted bench picks up where it stopped, and a rerun into the same folder
reports the same numbers. Measure afresh with a new `--out` folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from rich.console import Console

from fedlora.bench import plots
from fedlora.bench.common import SuiteOutput
from fedlora.bench.tables import fmt_bytes, md_table

NAME = "speed"
ALPHA = 16.0


@dataclass(frozen=True)
class Size:
    throughput: dict
    dp_step: dict
    svd: dict
    aggregation: dict
    bytes_ranks: tuple[tuple[int, ...], ...] = ((8, 8, 8), (2, 4, 8, 16))
    estimate: str = ""


SIZES: dict[str, Size] = {
    "full": Size(
        throughput={"steps": 12, "batch_size": 32, "max_length": 64, "repeats": 3, "modes": ["fedit", "ffa"]},
        dp_step={"steps": 12, "warmup": 2, "batch_size": 32, "max_length": 64, "modes": ["ffa", "fedit"]},
        svd={"d": 1024, "clients": 20, "rank": 16, "repeats": 9},
        aggregation={"clients": [5, 10, 20, 50], "ranks": [4, 8, 16, 32], "repeats": 3},
        estimate="about 5-8 min on an idle 2-core CPU",
    ),
    "quick": Size(
        throughput={"steps": 6, "batch_size": 32, "max_length": 64, "repeats": 2, "modes": ["fedit", "ffa"]},
        dp_step={"steps": 4, "warmup": 1, "batch_size": 32, "max_length": 64, "modes": ["ffa", "fedit"]},
        svd={"d": 1024, "clients": 20, "rank": 16, "repeats": 3},
        aggregation={"clients": [5, 20], "ranks": [4, 16], "repeats": 1},
        estimate="about 1-2 min on an idle 2-core CPU",
    ),
    "smoke": Size(
        throughput={"steps": 2, "batch_size": 8, "max_length": 32, "repeats": 1, "modes": ["ffa"]},
        dp_step={"steps": 1, "warmup": 1, "batch_size": 8, "max_length": 32, "modes": ["ffa"]},
        svd={"d": 128, "clients": 4, "rank": 4, "repeats": 1},
        aggregation={"clients": [2, 4], "ranks": [2, 4], "repeats": 1, "methods": ["ffa", "rbla", "flexlora", "flora"]},
        bytes_ranks=((8, 8, 8), (2, 4, 8)),
        estimate="under a minute (tests only)",
    ),
}


class SectionCache:
    """One JSON file per (section, parameters); `log` says for each whether it was measured now or cached."""

    def __init__(self, root: Path, console: Console):
        self.root = Path(root) / "cache"
        self.console = console
        self.log: list[dict] = []

    def get(self, section: str, params: dict, measure: Callable[[], object]):
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        path = self.root / f"{section}-{key}.json"
        if path.exists():
            status, value = "cached", json.loads(path.read_text())["value"]
        else:
            status, value = "ran", measure()
            self.root.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"params": params, "value": value}, indent=1, allow_nan=False))
        colour = "dim" if status == "cached" else "green"
        self.console.print(f"[bold]{NAME}[/bold] {section:<12} [{colour}]{status}[/{colour}]  [dim]{path.relative_to(self.root.parent)}[/dim]")
        self.log.append({"spec": section, "path": str(path.relative_to(self.root.parent)), "status": status})
        return value


def measure_aggregation_pinned(params: dict) -> dict:
    """The aggregation grid in a fresh process with BLAS pinned to one thread (see fedlora.bench.aggregation)."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    with tempfile.TemporaryDirectory() as tmp:
        p_in, p_out = Path(tmp) / "params.json", Path(tmp) / "out.json"
        p_in.write_text(json.dumps(params))
        proc = subprocess.run([sys.executable, "-m", "fedlora.bench.aggregation", str(p_in), str(p_out)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"aggregation benchmark failed: {tail}")
        return json.loads(p_out.read_text())


def bytes_per_round(ranks: tuple[int, ...], methods: list[str] | None = None, seed: int = 0) -> list[dict]:
    """LoRA bytes up and down for one round of `len(ranks)` clients on the MiniLM q/v modules (float32).

    Taken from the strategies' own byte counts after one aggregation of random updates (steady state: FLoRA
    sends the stacked factors down, FedEx its residual factors too). The classifier head (770 values a client,
    each way) is not included. Methods that cannot aggregate mixed ranks get no row for mixed `ranks`.
    """
    from fedlora import lora
    from fedlora.bench.aggregation import MINILM_SHAPES
    from fedlora.strategies import LoraFactors, available_strategies, get_strategy

    r_max = max(ranks)
    init = lora.initial_factors(seed, MINILM_SHAPES, r_max, ALPHA / r_max)
    dims = {m: (f.B.shape[0], f.A.shape[1]) for m, f in init.items()}
    rng = np.random.default_rng(seed)
    rows = []
    for name in methods or available_strategies():
        strategy = get_strategy(name, scale_for_rank=lambda r: ALPHA / r, seed=seed, initial_factors=init)
        if len(set(ranks)) > 1 and not strategy.supports_mixed_ranks:
            continue
        # Each client moves only what the method trains in round 1 (FFA: B; Fed-SB: the core R), from the
        # method's own starting adapter, so strategies that check the fixed parts accept the updates.
        trained = strategy.roles(1).train
        updates = []
        for r in ranks:
            start = strategy.starting_factors(
                {m: LoraFactors(A=f.A[:r], B=f.B[:, :r], scale=ALPHA / r) for m, f in init.items()})
            updates.append({m: strategy.from_parts(m, {p: (rng.normal(size=a.shape) * 0.01).astype(np.float32)
                                                       for p, a in strategy.to_parts(m, f, trained).items()}, f)
                            for m, f in start.items()})
        result = strategy.aggregate(updates, [1.0] * len(ranks))
        rows.append({"method": name, "ranks": list(ranks),
                     "bytes_up": int(sum(strategy.uplink_nbytes(u) for u in updates)),
                     "bytes_down": int(sum(downlink_nbytes(strategy, result, r, dims) for r in ranks))})
    return rows


def downlink_nbytes(strategy, result, rank: int, dims) -> int:
    """Steady-state bytes down to one rank-`rank` client, as the server counts them: the parts the method
    sends down after round 1 (none for methods that start a fresh LoRA each round) plus new base deltas."""
    from fedlora.strategies.base import parts_nbytes

    factors = 0 if strategy.fresh_lora_each_round else parts_nbytes(strategy.roles(2).down, rank, dims)
    return factors + int(result.base_delta_nbytes())


def run(out: Path, size_name: str, console: Console, jobs: int = 1) -> SuiteOutput:
    del jobs  # timings are taken one measurement at a time, never beside another job
    from fedlora.bench.dp_step import measure_dp_step
    from fedlora.bench.throughput import measure_client_throughput

    import torch

    size = SIZES[size_name]
    cache = SectionCache(out, console)
    tp = cache.get("throughput", size.throughput, lambda: measure_client_throughput(
        **{**size.throughput, "modes": tuple(size.throughput["modes"])}))
    dp = cache.get("dp_step", size.dp_step, lambda: measure_dp_step(**{**size.dp_step, "modes": tuple(size.dp_step["modes"])}))
    agg_params = {"svd": size.svd, "aggregation": size.aggregation}
    agg = cache.get("aggregation", agg_params, lambda: measure_aggregation_pinned(agg_params))
    comm = {"-".join(map(str, r)): bytes_per_round(r) for r in size.bytes_ranks}

    tp_rows = [[r["mode"], r["lora_A"], f"{r['fedlora_samples_per_s']:.1f}", f"{r['fedlora_loop_samples_per_s']:.1f}",
                f"{r['bare_peft_samples_per_s']:.1f}", f"{r['ratio']:.2f}", f"{r['mean_seq_len']:.1f}"] for r in tp]
    dp_rows = [[r["mode"], r["lora_A"], str(r["trainable_params"]), f"{r['nonprivate_ms']:.1f}", f"{r['dp_ms']:.1f}",
                f"{r['ratio']:.2f}", f"{r['enter_exit_ms']:.2f}"] for r in dp]

    rows = agg["aggregation"]
    methods = sorted({r["method"] for r in rows})
    t = {(r["method"], r["clients"], r["rank"]): r["median_s"] for r in rows}
    points = sorted({(r["clients"], r["rank"]) for r in rows})
    agg_rows = [[str(K), str(r), *(f"{t[(m, K, r)] * 1e3:.2f}" for m in methods)] for K, r in points]
    k_max, r_max = max(k for k, _ in points), max(r for _, r in points)
    png_agg = plots.plot_loglog({
        f"clients (rank {r_max})": {m: ([k for k, r in points if r == r_max], [t[(m, k, r_max)] for k, r in points if r == r_max]) for m in methods},
        f"rank ({k_max} clients)": {m: ([r for k, r in points if k == k_max], [t[(m, k_max, r)] for k, r in points if k == k_max]) for m in methods},
    }, out / "plots" / "aggregation_time.png", ylabel="aggregate() median s")
    svd = agg["flexlora_svd"]

    comm_methods = sorted({r["method"] for rows_ in comm.values() for r in rows_})
    by = {(key, r["method"]): r for key, rows_ in comm.items() for r in rows_}
    comm_rows = []
    for m in comm_methods:
        cells = []
        for key in comm:
            r = by.get((key, m))
            cells += [fmt_bytes(r["bytes_up"]), fmt_bytes(r["bytes_down"])] if r else ["–", "–"]
        comm_rows.append([m, *cells])
    comm_headers = ["method"] + [h for key in comm for h in (f"up, ranks [{key.replace('-', ', ')}]", "down")]

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    md = [
        f"# {NAME}: client throughput, DP step cost, server aggregation, bytes per round",
        "",
        f"Machine of this report: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average "
        f"{load:.1f} when the report was written (timings from a shared machine are indicative; ratios measured "
        f"by alternating calls are the robust numbers). Size `{size_name}`, expected on 2 CPU cores: {size.estimate}. "
        "Sections come from the cache when their parameters are unchanged (see results.json, `run_log`).",
        "",
        "## Client training throughput (samples/s)",
        "",
        "Embedded MiniLM, LoRA r = 8 on query/value + classifier head, AdamW, same example indices per step; "
        "the bare PEFT loop trains on batches tokenized beforehand. `ClientTrainer.train` is the whole call "
        "(downlink into the adapter, collate, train, read factors back); `its loop` is the training loop alone.",
        "",
        md_table(["mode", "lora_A", "ClientTrainer.train", "its loop", "bare PEFT loop", "train / bare", "mean seq len"], tp_rows),
        "",
        "## DP-SGD step vs non-private step (ms per step, median)",
        "",
        md_table(["mode", "lora_A", "trainable params", "non-DP ms", "DP ms", "DP / non-DP", "enter+exit ms"], dp_rows),
        "",
        f"## Server aggregation time (`strategy.aggregate`, median ms, {rows[0]['modules']} modules of "
        f"{rows[0]['d_out']}x{rows[0]['d_in']}, BLAS threads {agg['blas_threads']})",
        "",
        md_table(["clients", "rank", *methods], agg_rows, right_from=0),
        "",
        f"![aggregation time]({png_agg.relative_to(out)})",
        "",
        f"FlexLoRA server SVD, d = {svd['d']}, {svd['clients']} clients of rank {svd['rank']} (core {svd['core']}): "
        f"server path (σ, V from the factors) {svd['server_s'] * 1e3:.1f} ms, full factored SVD "
        f"{svd['factored_s'] * 1e3:.1f} ms, dense ΔW SVD {svd['dense_s'] * 1e3:.1f} ms "
        f"(speed-up {svd['speedup']:.1f}x; max |Δσ|/σ₁ = {svd['max_sv_rel_diff']:.1e}).",
        "",
        "## Bytes per round (LoRA factors, float32, all clients; head excluded)",
        "",
        md_table(comm_headers, comm_rows),
        "",
    ]
    results = {"settings": {k: v for k, v in size.__dict__.items()}, "client_throughput": tp, "dp_step": dp,
               "aggregation": rows, "flexlora_svd": svd, "bytes_per_round": comm}
    return SuiteOutput(markdown="\n".join(md), results=results, run_log=cache.log)
