"""Flower engine: the same federation on Flower's simulation runtime (`engine=flower-sim`) and on a real
SuperLink/SuperNode deployment (`flwr run . <connection>`).

- `FlowerSimRun(cfg, run_dir, progress).run()`: Flower's simulation runtime in this process (Ray backend,
  one CPU per client, no GPU). Same contract as `engines.local.LocalRun`.
- `serverapp` / `clientapp`: the components `[tool.flwr.app.components]` names. The ServerApp reads the
  fedlora config from the run config (`config`: a fedlora TOML, `overrides`: "key=value key=value", `out`:
  the run folder); the ClientApp gets the resolved config with each instruction.
The round logic is fedlora's `Server` (flower_server.py), the training fedlora's `ClientTrainer`
(flower_client.py); what travels is in flower_wire.py.
"""

from __future__ import annotations

from fedlora.engines import flower_env  # noqa: F401  (before flwr: no telemetry, no update check)

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import ExperimentConfig
from fedlora.engines.flower_client import Fault, make_client_app
from fedlora.engines.flower_server import FlowerOptions, FlowerRounds, FlowerRunError, ServerSide, one_line
from fedlora.progress import RunProgress

__all__ = ["FlowerOptions", "FlowerRunError", "FlowerSimRun", "clientapp", "serverapp"]


def simulation_backend_config(num_clients: int, cpus_per_client: int = 1) -> dict[str, Any]:
    """Ray on CPUs only: as many concurrent clients as cores allow, each pinned to `cpus_per_client` core(s)."""
    cores = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(cpus_per_client, min(cores, num_clients * cpus_per_client)),
            "num_gpus": 0,
            "logging_level": "ERROR",
            "log_to_driver": False,
            "include_dashboard": False,
        },
    }


class FlowerSimRun:
    """One experiment on Flower's simulation runtime, in this process. `run()` returns the summary dict."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, progress: RunProgress,
                 options: FlowerOptions | None = None, fault: Fault | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.options = options or FlowerOptions()
        self.fault = fault  # tests: make chosen clients raise inside the ClientApp
        self.side = ServerSide(cfg, progress)  # config, data and model errors surface before Ray starts

    @classmethod
    def resume(cls, cfg: ExperimentConfig, run_dir: Path, progress: RunProgress) -> "FlowerSimRun":
        raise ValueError("resume is not supported on engine=flower-sim yet; rerun, or resume with engine=local")

    def run(self) -> dict:
        from flwr.simulation import run_simulation

        result: dict[str, Any] = {}
        app = ServerApp()

        @app.main()
        def _main(grid: Grid, context: Context) -> None:
            try:
                result["summary"] = FlowerRounds(grid, self.side, self.run_dir, self.progress, self.options).run()
            except Exception as exc:  # surfaced below as one line, not as a Flower traceback
                result["error"] = exc

        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU only: silences Ray's GPU env tip
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.ERROR)  # Flower's INFO/deprecation lines would interleave with our progress
        try:
            run_simulation(
                server_app=app,
                client_app=make_client_app(self.fault),
                num_supernodes=self.cfg.federation.num_clients,
                backend_name="ray",
                backend_config=simulation_backend_config(self.cfg.federation.num_clients),
            )
        finally:
            flwr_log.setLevel(level)
        if "error" in result:
            exc = result["error"]
            if isinstance(exc, ValueError):
                raise FlowerRunError(one_line(str(exc))) from None
            raise FlowerRunError(f"flower-sim: {type(exc).__name__}: {one_line(str(exc))}") from exc
        if "summary" not in result:
            raise FlowerRunError("flower-sim: the ServerApp ended without a result (see the log above)")
        return result["summary"]


# -- `flwr run`: components named in pyproject.toml [tool.flwr.app.components] ---------------------------------
def _find_config(path: str) -> Path:
    """A fedlora TOML: absolute, relative to the working directory, or to the installed app folder."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + [Path(s) / p for s in sys.path if s]
    for c in candidates:
        if c.is_file():
            return c
    raise ValueError(f"run config: fedlora config file not found: {path}")


def split_overrides(text: str) -> list[str]:
    """"a.b=1 c.d=[4, 8]" -> ["a.b=1", "c.d=[4, 8]"]: a new item starts only where a `key=` follows a space."""
    return [item for item in re.split(r"\s+(?=[A-Za-z_][\w.\-]*=)", text.strip()) if item]


def config_from_run_config(run_config) -> tuple[ExperimentConfig, str | None, FlowerOptions]:
    """(fedlora config, run folder, options) from Flower's run config (pyproject + `--run-config`)."""
    from fedlora.config import load_config

    path = str(run_config.get("config", "") or "")
    cfg = load_config(_find_config(path) if path else None, split_overrides(str(run_config.get("overrides", "") or "")))
    options = FlowerOptions(
        round_timeout_s=float(run_config.get("round-timeout", FlowerOptions.round_timeout_s)),
        node_wait_s=float(run_config.get("node-wait", FlowerOptions.node_wait_s)),
        federated_eval=bool(run_config.get("federated-eval", False)),
    )
    return cfg, str(run_config.get("out", "") or "") or None, options


def run_deployment(grid: Grid, context: Context) -> dict:
    from fedlora.experiment import make_run_dir
    from fedlora.report import plot_run

    cfg, out, options = config_from_run_config(context.run_config)
    run_dir = make_run_dir(cfg, out)
    progress = RunProgress(enabled=cfg.output.progress)
    progress.note(f"run folder: {run_dir.resolve()}")
    summary = FlowerRounds(grid, ServerSide(cfg, progress), run_dir, progress, options).run()
    plot_run(run_dir)
    return summary


serverapp = ServerApp()


@serverapp.main()
def _serverapp_main(grid: Grid, context: Context) -> None:
    try:
        run_deployment(grid, context)
    except ValueError as exc:  # config, data or federation error: one clear line in the run's log ...
        line = one_line(str(exc))
        print(f"fedlora: error: {line}", file=sys.stderr, flush=True)
        # ... and an exception, so that Flower marks the run failed with this line as its details.
        raise FlowerRunError(line) from None


clientapp = make_client_app()
