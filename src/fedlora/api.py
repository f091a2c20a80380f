"""The Python API behind `fedlora.run`: the same run as `fedlora run`, from a config object, a TOML path or a dict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from fedlora.config import ConfigError, ExperimentConfig, load_config


@dataclass
class RunResult:
    """What a finished run produced. Everything is also in `run_dir` (metrics.jsonl, summary.json, adapter/)."""

    run_dir: Path
    metrics: list[dict]  # one row per round, as in metrics.jsonl
    summary: dict  # as in summary.json

    @property
    def adapter_path(self) -> Path | None:
        """The global model as a PEFT adapter folder (None with output.save_adapter = false)."""
        path = self.run_dir / "adapter"
        return path if path.is_dir() else None

    @property
    def epsilon(self) -> float | None:
        """The largest epsilon over clients at the end (None without DP)."""
        return self.summary.get("final_epsilon")

    @property
    def final_accuracy(self) -> float:
        return self.summary["final_accuracy"]


def as_config(config: ExperimentConfig | str | Path | Mapping[str, Any] | None,
              overrides: Iterable[str] = ()) -> ExperimentConfig:
    """A validated config from a config object, a TOML path, a nested dict, or None (the defaults)."""
    overrides = list(overrides)
    if isinstance(config, ExperimentConfig):
        if not overrides:
            return config
        config = config.model_dump(exclude_none=True)
    if config is None or isinstance(config, (str, Path)):
        return load_config(config, overrides)
    if isinstance(config, Mapping):
        from fedlora.config import _set_dotted, parse_override, validate_tree

        tree = _deep_copy(config)
        for item in overrides:
            _set_dotted(tree, *parse_override(item))
        return validate_tree(tree)
    raise ConfigError(f"config must be an ExperimentConfig, a TOML path or a dict, not {type(config).__name__}")


def _deep_copy(tree: Mapping) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def run(config: ExperimentConfig | str | Path | Mapping[str, Any] | None = None, *, overrides: Iterable[str] = (),
        out: str | Path | None = None, strategy=None, data=None, callbacks: Iterable = (),
        progress: bool = False) -> RunResult:
    """Run a federated fine-tune to the end and return its `RunResult`.

    config: an `ExperimentConfig`, a TOML path, a nested dict (`{"federation": {"rounds": 3}}`) or None.
    overrides: dotted `key=value` strings, as on the command line.
    out: the run folder (default: output.dir/<strategy>-<time>).
    strategy: a `fedlora.strategies.Strategy` instance to use instead of `strategy.name` (any subclass).
    data: a `fedlora.experiment.FederatedData` (one encoded partition per client and a held-out set) to use
      instead of `data.*`; `fedlora.experiment.prepare_data` shows how one is built.
    callbacks: callables called with each round's metrics row (a dict) right after it is written.
    progress: print the per-round progress and the closing table (as the CLI does).
    """
    from fedlora.runner import run_experiment

    cfg = as_config(config, overrides)
    run_dir = run_experiment(cfg, out=out, quiet=not progress, strategy=strategy, data=data, callbacks=callbacks)
    return result_of(run_dir)


def resume(run_dir: str | Path, *, callbacks: Iterable = (), progress: bool = False) -> RunResult:
    """Continue a killed run from its last checkpoint and return its `RunResult`."""
    from fedlora.runner import resume_experiment

    return result_of(resume_experiment(Path(run_dir), quiet=not progress, callbacks=callbacks))


def result_of(run_dir: str | Path) -> RunResult:
    """The `RunResult` of a finished run folder."""
    import json

    from fedlora.metrics import read_metrics

    run_dir = Path(run_dir)
    return RunResult(run_dir, read_metrics(run_dir), json.loads((run_dir / "summary.json").read_text()))
