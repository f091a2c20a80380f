"""Flower engine: the same federation on Flower's simulation runtime (`engine=flower-sim`) and on a real
SuperLink/SuperNode deployment (`flwr run . <connection>`).

- `FlowerSimEngine(run).execute()`: `run.loop` on Flower's simulation runtime in this process (Ray backend,
  one CPU per client, no GPU); `fedlora.engines.execute(Run(cfg with engine="flower-sim", ...))` picks it.
- `serverapp` / `clientapp`: the components `[tool.flwr.app.components]` names. The ServerApp reads the
  fedlora config from the run config (`config`: a fedlora TOML, `overrides`: "key=value key=value", `out`:
  the run folder, `resume`: continue the run in `out` from its checkpoint); the ClientApp gets the resolved
  config with each instruction.
The round loop is `fedlora.Run.loop`, the transport `flower_server.FlowerTransport`, the training fedlora's
`ClientTrainer` (flower_client.py); what travels is in flower_wire.py.
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

from fedlora.errors import UserError
from fedlora.config import ExperimentConfig
from fedlora.engines.flower_client import Fault, make_client_app
from fedlora.engines.flower_server import FlowerOptions, FlowerRunError, one_line, run_on_grid
from fedlora.progress import RunProgress
from fedlora.federated_run import Run

__all__ = ["FlowerOptions", "FlowerRunError", "FlowerSimEngine", "clientapp", "serverapp"]


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


class FlowerSimEngine:
    """engine=flower-sim: the run's loop inside a ServerApp on Flower's simulation runtime, in this process.

    The run (config, data, model) is built before Ray starts, so their errors surface first. `fault` (tests)
    makes chosen clients raise inside the ClientApp.
    """

    def __init__(self, run: Run, options: FlowerOptions | None = None, fault: Fault | None = None):
        self.run = run
        self.options = options or FlowerOptions()
        self.fault = fault

    def execute(self) -> dict:
        from flwr.simulation import run_simulation

        result: dict[str, Any] = {}
        app = ServerApp()

        @app.main()
        def _main(grid: Grid, context: Context) -> None:
            try:
                result["summary"] = run_on_grid(self.run, grid, self.options)
            except BaseException as exc:  # re-raised below, outside Flower's thread
                result["error"] = exc

        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU only: silences Ray's GPU env tip
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.ERROR)  # Flower's INFO/deprecation lines would interleave with our progress
        try:
            run_simulation(
                server_app=app,
                client_app=make_client_app(self.fault),
                num_supernodes=self.run.cfg.federation.num_clients,
                backend_name="ray",
                backend_config=simulation_backend_config(self.run.cfg.federation.num_clients),
            )
        finally:
            flwr_log.setLevel(level)
        if "error" in result:
            raise result["error"]  # user errors stay ValueErrors (one line); bugs keep their traceback
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
    raise UserError(f"run config: fedlora config file not found: {path}")


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
    """The ServerApp of `flwr run`: a new run in `out` (or output.dir/<strategy>-<time>), or, with
    `resume = true`, the run in `out` continued from its last checkpoint (a ServerApp restarted mid-run)."""
    from fedlora.experiment import make_run_dir
    from fedlora.report import plot_run

    cfg, out, options = config_from_run_config(context.run_config)
    progress = RunProgress(enabled=cfg.output.progress)
    if bool(context.run_config.get("resume", False)):
        if not out:
            raise UserError("run config: resume = true needs out = the run folder to continue")
        run = Run.resume(out, progress)
    else:
        run = Run(cfg, make_run_dir(cfg, out), progress)
    progress.note(f"run folder: {run.run_dir.resolve()}")
    summary = run_on_grid(run, grid, options)
    plot_run(run.run_dir)
    return summary


serverapp = ServerApp()


@serverapp.main()
def _serverapp_main(grid: Grid, context: Context) -> None:
    try:
        run_deployment(grid, context)
    except UserError as exc:  # config, data or federation error: one clear line in the run's log ...
        line = one_line(str(exc))
        print(f"fedlora: error: {line}", file=sys.stderr, flush=True)
        # ... and an exception, so that Flower marks the run failed with this line as its details.
        raise FlowerRunError(line) from None


clientapp = make_client_app()
