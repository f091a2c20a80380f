"""Entry points behind the CLI and `fedlora.run`: build a `Run`, execute it, write plots, print the table."""

from __future__ import annotations


from pathlib import Path
from typing import Iterable

from fedlora.config import ExperimentConfig
from fedlora.engines import execute
from fedlora.errors import UserError
from fedlora.experiment import make_run_dir
from fedlora.metrics import read_metrics
from fedlora.progress import RunProgress, summary_table
from fedlora.report import plot_run


def _finish(run_dir: Path, summary: dict, progress: RunProgress) -> Path:
    plot_run(run_dir)
    if progress.enabled:
        progress.console.print(summary_table(summary, read_metrics(run_dir)))
    return run_dir


def run_experiment(cfg: ExperimentConfig, out: str | Path | None = None, quiet: bool = False, *,
                   strategy=None, data=None, callbacks: Iterable = ()) -> Path:
    """Run `cfg` to the end; returns the run folder (config.toml, metrics.jsonl, summary.json, plots, adapter)."""
    from fedlora.federated_run import Run

    run_dir = make_run_dir(cfg, str(out) if out else None)
    progress = RunProgress(enabled=cfg.output.progress and not quiet)
    progress.note(f"run folder: {run_dir}")
    run = Run(cfg, run_dir, progress, strategy=strategy, data=data, callbacks=callbacks)
    return _finish(run_dir, execute(run), progress)


def resume_experiment(run_dir: Path, quiet: bool = False, callbacks: Iterable = ()) -> Path:
    from fedlora.config import load_config
    from fedlora.federated_run import Run

    if not (run_dir / "config.toml").exists():
        raise UserError(f"not a run folder (no config.toml): {run_dir}")
    cfg = load_config(run_dir / "config.toml")
    progress = RunProgress(enabled=cfg.output.progress and not quiet)
    run = Run.resume(run_dir, progress, callbacks=callbacks)
    return _finish(run_dir, execute(run), progress)
