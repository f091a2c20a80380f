"""Experiment trackers (TensorBoard, MLflow, trackio, W&B) fed from the run's metrics rows, on the server only.

Every tracker is a plug-in registered by name (`output.report_to`), an optional extra of the package, and is
told nothing but what a metrics.jsonl row holds. What a row may publish under differential privacy is decided
here, in one place: `AGGREGATE_FIELDS` are computed only from the released global model, the config or the
privacy accountant (publishing them is post-processing of the DP release); every other field, including any
field not listed (fail closed), is computed from individual clients (their losses, norms, sizes, who took
part) and is withheld from trackers under DP unless `output.report_per_client = true`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Iterable

from fedlora.errors import UserError

AGGREGATE_FIELDS = frozenset({
    "round", "strategy",
    "eval_loss", "eval_accuracy",  # the released global model on the server's own held-out data
    "eval_protocol",  # how eval_accuracy is scored (scorer, shots, template): from the config
    "global_adapter_sha256", "global_delta_norm",  # the released global model itself
    "epsilon", "delta", "noise_multiplier", "sample_rate", "dp_steps", "dp_steps_max", "accountant", "privacy",
    "secure_aggregation",
})
# Listed so that a reader sees every known field classified; unlisted fields are treated the same way.
PER_CLIENT_FIELDS = frozenset({
    "clients", "sampled", "dropped", "dropped_reasons", "rejected", "failed", "ranks", "update_norms",
    "train_loss", "personal_accuracy", "personal_clients", "client_eval_accuracy", "epsilon_client",
    "samples", "train_s", "samples_per_s", "wall_s", "client_setup_s",
    "bytes_up", "bytes_up_head", "bytes_down",
    "secagg_stage_s", "secagg_reply_arrays", "secagg_sums_received", "secagg_clipped",
    "flaas_plan", "sim_round_s", "sim_client_s",  # who trained at which rank, and how long each took (flaas)
})
STATE_FILE = "trackers.json"  # run ids a resumed run continues


def publishable(row: dict, *, private: bool, per_client: bool = False) -> dict[str, float]:
    """The numbers of a row a tracker receives: scalars as they are, dicts of numbers flattened to `key/sub`;
    text, lists and nulls are left out. Under DP (`private`), only aggregate fields unless `per_client`."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "round" or (private and not per_client and key not in AGGREGATE_FIELDS):
            continue
        if isinstance(value, dict):
            for sub, x in value.items():
                if _number(x) is not None:
                    out[f"{key}/{sub}"] = _number(x)
        elif _number(value) is not None:
            out[key] = _number(value)
    return out


def _number(x) -> float | None:
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)) and math.isfinite(x):
        return float(x)
    return None


class Tracker:
    """One experiment tracker. `modules` must be importable; `extra` is the package extra that installs them."""

    name = ""
    modules: tuple[str, ...] = ()
    extra = ""

    def __init__(self, run_dir: Path, params: dict, state: dict, first_round: int):
        """`params`: the flattened config; `state`: what `state()` returned in an earlier process of this run
        (empty for a new run); `first_round`: the first round this process logs (> 1 on a resume)."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def state(self) -> dict:
        return {}

    def close(self) -> None:
        pass


TRACKERS: dict[str, type[Tracker]] = {}


def register_tracker(cls: type[Tracker]) -> type[Tracker]:
    TRACKERS[cls.name] = cls
    return cls


def available_trackers() -> list[str]:
    return list(TRACKERS)


def missing_modules(name: str) -> list[str]:
    return [m for m in TRACKERS[name].modules if importlib.util.find_spec(m) is None]


class TrackerSet:
    """The trackers of one run folder, opened together (every one checked before any opens)."""

    def __init__(self, names: Iterable[str], run_dir: Path, params: dict, first_round: int = 1,
                 resume_state: bool = True):
        names = list(names)
        for name in names:
            if name not in TRACKERS:
                raise UserError(f"unknown tracker {name!r}; available: {', '.join(TRACKERS)}")
            if missing_modules(name):
                cls = TRACKERS[name]
                raise UserError(f"output.report_to includes {name!r} but {missing_modules(name)[0]} is not "
                                f"installed: pip install 'fedlora[{cls.extra}]'")
        self.state_path = Path(run_dir) / STATE_FILE
        saved = json.loads(self.state_path.read_text()) if resume_state and self.state_path.is_file() else {}
        self.trackers = [TRACKERS[n](Path(run_dir), params, saved.get(n, {}), first_round) for n in names]
        if self.trackers and resume_state:
            self.state_path.write_text(json.dumps({t.name: t.state() for t in self.trackers}, indent=2) + "\n")
        self.closed = not self.trackers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for t in self.trackers:
            t.log(step, metrics)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for t in self.trackers:
                t.close()


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as `section.key -> text`, the form trackers keep parameters in."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        elif value is not None:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


# -- the plug-ins ----------------------------------------------------------------------------------------------
@register_tracker
class TensorBoardTracker(Tracker):
    """Event files under RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)."""

    name, modules, extra = "tensorboard", ("tensorboard",), "tensorboard"

    def __init__(self, run_dir, params, state, first_round):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run (or a replay) hides the events of rounds it logs again.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=first_round)
        if first_round == 1:
            self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in params.items()), 0)

    def log(self, step, metrics):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps every round it logged

    def close(self):
        self.writer.close()


@register_tracker
class MlflowTracker(Tracker):
    """An MLflow run in $MLFLOW_TRACKING_URI, else in a local store RUN_DIR/mlflow.db
    (`mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`); experiment $MLFLOW_EXPERIMENT_NAME or fedlora."""

    name, modules, extra = "mlflow", ("mlflow", "sqlalchemy", "alembic"), "mlflow"

    def __init__(self, run_dir, params, state, first_round):
        import logging

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for quiet in ("mlflow.store", "alembic"):  # "Creating initial MLflow database tables...": not news
            if logging.getLogger(quiet).level == logging.NOTSET:
                logging.getLogger(quiet).setLevel(logging.WARNING)
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = state.get("run_id")
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fedlora")
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
            items = [Param(k, v[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def log(self, step, metrics):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def state(self):
        return {"run_id": self.run_id}

    def close(self):
        self.client.set_terminated(self.run_id)


@register_tracker
class WandbTracker(Tracker):
    """A Weights & Biases run, offline (files under RUN_DIR/wandb, `wandb sync` uploads them) unless WANDB_MODE
    says otherwise; project $WANDB_PROJECT or fedlora."""

    name, modules, extra = "wandb", ("wandb",), "wandb"

    def __init__(self, run_dir, params, state, first_round):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fedlora"), name=run_dir.name,
                              dir=str(run_dir), config=params, id=state.get("id"), resume="allow",
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def state(self):
        return {"id": self.run.id}

    def close(self):
        self.run.finish()


@register_tracker
class TrackioTracker(Tracker):
    """A trackio run in its local store (`trackio show`), project $TRACKIO_PROJECT or fedlora."""

    name, modules, extra = "trackio", ("trackio",), "trackio"

    def __init__(self, run_dir, params, state, first_round):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "fedlora"), name=run_dir.name,
                                config=params, resume="allow")

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def close(self):
        self.trackio.finish()
