"""Engines: what carries a `fedlora.Run`'s messages. One registry, looked up by `cfg.engine`.

An engine is built for a run (`make_engine(run)`) and has `execute() -> summary`, which drives
`run.loop(transport)` with its own `fedlora.federated_run.Transport`. `execute(run)` does both. The engines sit
above `Run` (which never imports them); Flower is imported only when it is used.
"""

from __future__ import annotations

from fedlora.errors import UserError


def _local(run):
    from fedlora.engines.local import LocalEngine

    return LocalEngine(run)


def _flower_sim(run):
    from fedlora.engines.flower import FlowerSimEngine

    return FlowerSimEngine(run)


ENGINES = {"local": _local, "flower-sim": _flower_sim}


def make_engine(run, name: str | None = None):
    """The engine named by `name` (default: the run's cfg.engine), built for `run`."""
    name = name or run.cfg.engine
    if name not in ENGINES:
        raise UserError(f"unknown engine {name!r}; available: {', '.join(sorted(ENGINES))}")
    return ENGINES[name](run)


def execute(run) -> dict:
    """Every remaining round of `run` on its configured engine; returns the summary (also in summary.json)."""
    return make_engine(run).execute()
