"""Entry points behind the CLI: run an experiment on the configured engine, write plots, print the table."""

from __future__ import annotations

from pathlib import Path

from fedlora.config import ExperimentConfig
from fedlora.experiment import make_run_dir
from fedlora.metrics import read_metrics
from fedlora.progress import RunProgress, summary_table
from fedlora.report import plot_run


def _engine(cfg: ExperimentConfig):
    if cfg.engine == "flower-sim":
        from fedlora.engines.flower import FlowerSimRun

        return FlowerSimRun
    from fedlora.engines.local import LocalRun

    return LocalRun


def run_experiment(cfg: ExperimentConfig, out: str | Path | None = None, quiet: bool = False) -> Path:
    """Run `cfg` to the end; returns the run folder (config.toml, metrics.jsonl, summary.json, plots, adapter)."""
    run_dir = make_run_dir(cfg, str(out) if out else None)
    progress = RunProgress(enabled=cfg.output.progress and not quiet)
    progress.note(f"run folder: {run_dir}")
    summary = _engine(cfg)(cfg, run_dir, progress).run()
    plot_run(run_dir)
    if progress.enabled:
        progress.console.print(summary_table(summary, read_metrics(run_dir)))
    return run_dir


def resume_experiment(run_dir: Path, quiet: bool = False) -> Path:
    from fedlora.config import load_config

    if not (run_dir / "config.toml").exists():
        raise ValueError(f"not a run folder (no config.toml): {run_dir}")
    cfg = load_config(run_dir / "config.toml")
    progress = RunProgress(enabled=cfg.output.progress and not quiet)
    summary = _engine(cfg).resume(cfg, run_dir, progress).run()
    plot_run(run_dir)
    if progress.enabled:
        progress.console.print(summary_table(summary, read_metrics(run_dir)))
    return run_dir
