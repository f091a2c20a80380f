"""Training runs of a bench suite, cached per (config, seed) so an interrupted bench does not start over.

A run's folder is `<out>/runs/<hash>`, the hash of the resolved config TOML (the seed is part of it). A folder
with summary.json is reused as it is; one with a checkpoint but no summary is resumed from it; anything else
is (re)run from round 1. The bench's wall time per run (model loading included) is kept in `bench.json` beside
the run's files, so a cached run still reports how long it took.

`jobs > 1` trains the pending runs in that many worker processes with cores/jobs torch threads each. On a
2-core CPU two one-thread runs train about as fast together as one two-thread run (measured 2 x 41 vs 80-89
samples/s) and keep both cores busy through the single-threaded parts (loading, data preparation).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlora.config import ExperimentConfig, load_config
from fedlora.metrics import read_metrics

BENCH_FILE = "bench.json"


@dataclass(frozen=True)
class RunSpec:
    """One training run: what it stands for in the report (labels), its config overrides and its seed."""

    labels: tuple[tuple[str, Any], ...]  # e.g. (("method", "ffa"), ("epsilon", 3.0)): hashable, ordered
    overrides: tuple[str, ...]
    seed: int

    def label(self, key: str) -> Any:
        return dict(self.labels)[key]

    def describe(self) -> str:
        return " ".join(f"{k}={'none' if v is None else v}" for k, v in self.labels) + f" seed={self.seed}"

    def config(self) -> ExperimentConfig:
        return load_config(None, [*self.overrides, f"seed={self.seed}"])


@dataclass
class RunRecord:
    spec: RunSpec
    run_dir: Path
    status: str  # "cached" | "resumed" | "ran"
    seconds: float  # bench wall time of the run when it was trained (not of this call when cached)
    summary: dict
    metrics: list[dict] = field(default_factory=list)

    def series(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.metrics]

    def accuracy_curve(self) -> list[float]:
        """Held-out accuracy before training (round 0) and after every round."""
        return [float(self.summary["accuracy_before"])] + self.series("eval_accuracy")

    def to_json(self, root: Path) -> dict:
        """The raw numbers of the run for results.json."""
        last = self.metrics[-1] if self.metrics else {}
        return {
            **{k: v for k, v in self.spec.labels}, "seed": self.spec.seed,
            "run_dir": str(self.run_dir.relative_to(root)), "status": self.status, "seconds": self.seconds,
            "final_accuracy": self.summary.get("final_accuracy"), "accuracy_curve": self.accuracy_curve(),
            "bytes_up_per_round": self.series("bytes_up"), "bytes_down_per_round": self.series("bytes_down"),
            "bytes_up_head_per_round": self.series("bytes_up_head"),
            "final_epsilon": last.get("epsilon"), "noise_multiplier": last.get("noise_multiplier"),
            "client_sizes": [p["size"] for p in self.summary.get("partition", [])],
        }


def config_hash(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(cfg.to_toml().encode()).hexdigest()[:12]


class RunCache:
    """Runs specs under `root/runs/`, printing one progress line per run; `log` lists what each call did."""

    def __init__(self, root: Path, console: Console | None = None, suite: str = ""):
        self.root = Path(root)
        self.console = console or Console(stderr=True)
        self.suite = suite
        self.log: list[dict] = []
        self.trained: dict[Path, str] = {}  # run folders trained by worker processes in this call -> status

    def run_dir(self, cfg: ExperimentConfig) -> Path:
        return self.root / "runs" / config_hash(cfg)

    def ensure_all(self, specs: list[RunSpec], jobs: int = 1) -> list[RunRecord]:
        if jobs > 1:
            self._train_parallel(specs, jobs)
        return [self.ensure(spec, i + 1, len(specs)) for i, spec in enumerate(specs)]

    def ensure(self, spec: RunSpec, index: int = 1, total: int = 1) -> RunRecord:
        run_dir = self.run_dir(spec.config())
        if run_dir in self.trained:
            status = self.trained[run_dir]
        elif (run_dir / "summary.json").exists():
            status = "cached"
        else:
            status = train_run(spec, run_dir)
        record = RunRecord(
            spec=spec, run_dir=run_dir, status=status,
            seconds=float(_read_json(run_dir / BENCH_FILE).get("seconds", 0.0)),
            summary=_read_json(run_dir / "summary.json"), metrics=read_metrics(run_dir),
        )
        self._report(record, index, total)
        return record

    def _train_parallel(self, specs: list[RunSpec], jobs: int) -> None:
        todo = {self.run_dir(s.config()): s for s in specs}
        todo = {d: s for d, s in todo.items() if not (d / "summary.json").exists()}
        if len(todo) < 2:
            return
        threads = max(1, (os.cpu_count() or 1) // jobs)
        self.console.print(f"[bold]{self.suite}[/bold] training {len(todo)} runs in {jobs} processes "
                           f"({threads} torch thread(s) each)")
        # spawn: a forked child would inherit this process's torch thread pool and any loaded model state.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(train_run, s, d, threads): d for d, s in todo.items()}
            for n, fut in enumerate(as_completed(futures), 1):
                d = futures[fut]
                self.trained[d] = fut.result()
                self.console.print(f"[dim]{self.suite} finished {n}/{len(todo)}: {todo[d].describe()}[/dim]")

    def _report(self, rec: RunRecord, index: int, total: int) -> None:
        colour = {"cached": "dim", "resumed": "yellow", "ran": "green"}[rec.status]
        self.console.print(
            f"[bold]{self.suite}[/bold] [{index}/{total}] {rec.spec.describe():<40} [{colour}]{rec.status:<7}[/{colour}] "
            f"acc {rec.summary.get('final_accuracy', float('nan')):.4f}  {rec.seconds:6.1f} s  "
            f"[dim]{rec.run_dir.relative_to(self.root)}[/dim]"
        )
        self.log.append({"spec": rec.spec.describe(), "run_dir": str(rec.run_dir.relative_to(self.root)),
                         "status": rec.status, "seconds": rec.seconds})


def train_run(spec: RunSpec, run_dir: Path, threads: int | None = None) -> str:
    """Train (or resume) one run into `run_dir`; returns "ran" or "resumed". Module level: workers call it."""
    from fedlora.runner import resume_experiment, run_experiment

    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if (run_dir / "checkpoint" / "state.npz").exists():
        status = "resumed"
        resume_experiment(run_dir, quiet=True)
    else:
        status = "ran"
        run_experiment(spec.config(), out=run_dir, quiet=True)
    # Written last: a resumed run reports only the time of the call that finished it.
    (run_dir / BENCH_FILE).write_text(json.dumps({"seconds": time.perf_counter() - t0, "status": status,
                                                  "spec": spec.describe()}))
    return status


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
