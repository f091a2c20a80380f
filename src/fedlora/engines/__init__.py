"""Engines: what carries a `fedlora.Run`'s messages. One registry, looked up by `cfg.engine`.

An engine is built with the run (`make_engine(name, run)`) and has `execute() -> summary`, which drives
`run.loop(transport)` with its own `fedlora.run.Transport`. Flower is imported only when it is used.
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


def make_engine(name: str, run):
    if name not in ENGINES:
        raise UserError(f"unknown engine {name!r}; available: {', '.join(sorted(ENGINES))}")
    return ENGINES[name](run)
