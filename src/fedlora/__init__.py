"""fedlora: privacy-preserving federated fine-tuning of transformer models with LoRA.

    import fedlora
    result = fedlora.run({"strategy": {"name": "rbla"}, "federation": {"ranks": [4, 8], "rounds": 3}})
    result.metrics[-1]["eval_accuracy"], result.adapter_path, result.epsilon

The surface: `run`, `resume`, `load_config`, `RunResult`, `ExperimentConfig`, `ConfigError`, `Run` (the run
object behind them, for engines and step-by-step use) and `strategies` (`get_strategy`, `register`,
`Strategy`, `LoraFactors`). Importing fedlora changes no environment variable and no warning filter; torch
and transformers load when a run starts.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

from fedlora import strategies
from fedlora.api import RunResult, resume, run
from fedlora.config import ConfigError, ExperimentConfig, load_config

try:
    __version__ = _version("fedlora")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["ConfigError", "ExperimentConfig", "Run", "RunResult", "__version__", "load_config", "resume", "run",
           "strategies"]


def __getattr__(name: str):
    if name == "Run":  # torch and transformers: only when asked for
        from fedlora.federated_run import Run

        return Run
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")
