"""The one federated run, whatever carries the messages.

`Run` owns everything but transport: setup (data, partition, model, strategy, server state), the round loop,
metrics rows, checkpoints and resume. An engine is a `Transport`: given the clients of a round, it delivers
each one its downlink and brings back their updates (in this process, or over Flower). Engines hold no setup,
no aggregation and no loop of their own.

    run = Run(cfg, run_dir)            # or Run.resume(run_dir)
    summary = fedlora.engines.execute(run)   # the engine named by cfg.engine
"""

from __future__ import annotations

from fedlora.errors import UserError

import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from fedlora import lora
from fedlora.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from fedlora.client import Update
from fedlora.client_state import CLIENT_STATE_DIR
from fedlora.config import ExperimentConfig, RoundFailed, checked
from fedlora.experiment import (
    FederatedData,
    evaluate_global,
    export_adapter,
    metrics_row,
    prepare_data,
    run_summary,
)
from fedlora.flaas.service import FlaasService
from fedlora.metrics import MetricsWriter, read_metrics, write_summary
from fedlora.host import ModelHost, adapter_name, load_tokenizer
from fedlora.progress import RunProgress
from fedlora.server import Server
from fedlora.strategies import Strategy, get_strategy


@dataclass
class RoundReplies:
    """What a transport brings back from one round."""

    updates: list[Update]
    dropped: dict[int, str]  # client -> why it sent nothing usable (failure, timeout, budget, malformed)
    traffic: tuple[int, int, int] | None = None  # (bytes up, bytes up of the head, bytes down) on a real wire
    extra: dict = field(default_factory=dict)  # engine-specific metrics for the row
    # Secure aggregation (fedlora.secagg): the round's sum instead of `updates`, or why the protocol halted
    # (too few clients left to unmask): that round then changes nothing and the run goes on.
    summed: Any = None  # fedlora.secagg.SummedRound
    failed: str | None = None


class Transport(ABC):
    """Moves downlinks and updates for a `Run`. Must implement `train`; the rest is optional."""

    def open(self, run: "Run") -> None:
        """Before the first round of this process (e.g. find the clients' nodes)."""

    def begin_round(self, run: "Run") -> None:
        """Before each round's sampling (e.g. notice nodes that reconnected)."""

    @abstractmethod
    def train(self, run: "Run", clients: list[int]) -> RoundReplies:
        """Train `clients` from `run.server.downlink(c)`; call `run.progress.advance(steps)` per update."""

    def merged(self, run: "Run", base_delta: dict[str, np.ndarray]) -> None:
        """The server merged `base_delta` into its base weights; clients must do the same (FLoRA, FedEx)."""

    def node_profiles(self) -> dict[int, dict]:
        """client -> the `flaas-*` profile keys its node declared (Flower --node-config), unchecked; {} if none."""
        return {}

    def round_metrics(self, run: "Run") -> dict:
        """Extra keys for the round's metrics row, after the global model of the round exists."""
        return {}

    def personal_eval(self, run: "Run") -> tuple[float, int] | None:
        """Methods with personal parts (FedSA): each client's own model (the global parts plus its personal
        ones), scored where the client lives: (example-weighted mean accuracy, clients scored), or None."""
        return None

    def state_dict(self) -> dict:
        """Transport state a resumed run needs (kept in the checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


Callback = Callable[[dict], Any]


def build_strategy(cfg: ExperimentConfig, dims: dict[str, tuple[int, int]]) -> Strategy:
    """The configured method, told the scale law and the seeded global init every client derives."""
    r_max = max(cfg.client_ranks())
    return get_strategy(cfg.strategy.name, **cfg.strategy.options, scale_for_rank=cfg.lora.scale, seed=cfg.seed,
                        initial_factors=lora.initial_factors(cfg.seed, dims, r_max, cfg.lora.scale(r_max)))


class Run:
    """One experiment: setup once, then an engine (`fedlora.engines.execute(run)`) runs every remaining round
    through `loop` and writes the run folder.

    `strategy` replaces the configured method by an instance (its class needs no registration); `data`
    replaces the configured dataset by a ready `FederatedData`; `callbacks` are called with every metrics row.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, progress: RunProgress | None = None, *,
                 strategy: Strategy | None = None, data: FederatedData | None = None,
                 callbacks: Iterable[Callback] = ()):
        cfg = self.cfg = checked(cfg, strategy)  # one validation of (config, strategy) for every entry point
        self.run_dir = Path(run_dir)
        self.progress = progress or RunProgress(enabled=False)
        self.callbacks = list(callbacks)
        torch.manual_seed(cfg.seed)
        tokenizer = load_tokenizer(cfg.model.name)
        self.data: FederatedData = data if data is not None else prepare_data(cfg, tokenizer)
        if len(self.data.clients) != cfg.federation.num_clients:
            raise UserError(f"the data has {len(self.data.clients)} client partitions but "
                             f"federation.num_clients={cfg.federation.num_clients}")
        self.progress.note(self.data.load_summary)
        self.host = ModelHost(cfg, len(self.data.label_names), set(cfg.client_ranks()))
        dims = lora.module_dims(self.host.model)
        self.flaas: FlaasService | None = None
        if cfg.flaas is not None:  # the server plans the ranks: federation.ranks becomes the plan
            head = lora.get_head(self.host.model, adapter_name(max(cfg.client_ranks())))
            self.flaas = FlaasService(cfg, self.host.model, dims, sum(h.size for h in head.values()),
                                      strategy or get_strategy(cfg.strategy.name, **cfg.strategy.options))
            cfg = self.cfg = checked(self.flaas.planned_config(cfg), strategy)
            self.progress.note(f"flaas: planned ranks {self.flaas.plan.to_json()}")
        self.strategy = strategy if strategy is not None else build_strategy(cfg, dims)
        r_max = max(cfg.client_ranks())
        self.host.ensure_rank(r_max)
        self.server = Server(cfg, self.strategy, dims, lora.get_head(self.host.model, adapter_name(r_max)),
                             [len(c) for c in self.data.clients])
        if self.flaas is not None:
            self.flaas.attach(self.server)
        self.before: tuple[float, float] | None = None  # (loss, accuracy) of the global model before round 1
        self._resume_state: dict | None = None

    @classmethod
    def resume(cls, run_dir: str | Path, progress: RunProgress | None = None, cfg: ExperimentConfig | None = None,
               **kwargs) -> "Run":
        """Rebuild the run from its config (default: the folder's config.toml), then restore the last checkpoint."""
        from fedlora.config import load_config

        run_dir = Path(run_dir)
        if cfg is None and not (run_dir / "config.toml").is_file():
            raise UserError(f"not a run folder (no config.toml): {run_dir}")
        state = load_checkpoint(run_dir / "checkpoint")  # first: a damaged file fails before the model loads
        run = cls(cfg or load_config(run_dir / "config.toml"), run_dir, progress, **kwargs)
        run.server.load_state_dict(state["server"])
        with torch.no_grad():
            layers = lora.lora_layers(run.host.model)
            for name, w in state["base_weights"].items():
                layers[name].get_base_layer().weight.copy_(torch.from_numpy(w))
        run.before = tuple(state["before"])
        run._resume_state = state  # the transport's part is restored when the loop starts
        run.progress.note(f"resumed {run_dir} after round {run.server.round}")
        return run

    # -- the run ---------------------------------------------------------------------------------------------
    def evaluate_global(self) -> tuple[float, float]:
        return evaluate_global(self.cfg, self.host, self.server, self.data.test)

    def loop(self, transport: Transport) -> dict:
        """The round loop, the only one: sample, deliver, aggregate, merge, evaluate, log, checkpoint."""
        cfg, server = self.cfg, self.server
        if self._resume_state is not None:
            transport.load_state_dict(self._resume_state.get("transport", {}))
        transport.open(self)
        writer = MetricsWriter(self.run_dir, truncate_after_round=server.round, cfg=cfg, server=server)
        if self.before is None:
            # A fresh run in a folder that held another run: a kill before round 1 ends must not leave that
            # run's checkpoint for `fedlora resume` to mix into this one.
            (self.run_dir / "checkpoint" / CHECKPOINT_FILE).unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / CLIENT_STATE_DIR, ignore_errors=True)
            self.before = self.evaluate_global()
            self.progress.note(f"held-out accuracy before training: {self.before[1]:.4f} "
                               f"({len(self.data.test)} examples)")
        while server.round < cfg.federation.rounds:
            t_round = time.perf_counter()
            transport.begin_round(self)
            if self.flaas is not None:
                self.flaas.observe(transport.node_profiles(), self.progress.note)
            sampled = server.sample_clients()
            dropped = {c: "dropped out (simulated failure)" for c in server.draw_dropouts(sampled)}
            if self.flaas is not None:  # nothing fits them, or they are offline (simulated availability)
                dropped.update(self.flaas.excluded(server.round + 1, [c for c in sampled if c not in dropped]))
            active = [c for c in sampled if c not in dropped]
            self.progress.start_round(server.round + 1, len(active) * cfg.local_steps())
            replies = transport.train(self, active)
            if self.flaas is not None:  # the simulated clock; stragglers past the deadline leave the round
                replies = self.flaas.settle(replies, replies.traffic[0] if replies.traffic
                                            else replies.extra.get("bytes_up"))
            dropped.update(replies.dropped)
            # Aggregate in client order whatever the arrival order: float sums then agree across engines.
            updates = sorted(replies.updates, key=lambda u: u.client_id)
            if replies.summed is not None:
                updates = sorted(replies.summed.members, key=lambda u: u.client_id)
            try:
                outcome = server.finish_round(updates if replies.summed is None else [], sampled,
                                              summed=replies.summed, failed=replies.failed)
            except RoundFailed as exc:  # name the clients that never sent anything too
                why = "; ".join(f"client {c}: {r}" for c, r in sorted(dropped.items()))
                raise RoundFailed(f"{exc}" + (f" (no update: {why})" if why else "")) from None
            if replies.failed is not None:
                self.progress.note(f"round {server.round}: no aggregate: {replies.failed}")
            if outcome.base_delta:
                lora.merge_base_delta(self.host.model, outcome.base_delta)
                transport.merged(self, outcome.base_delta)
            evaluation = self.evaluate_global()
            row = metrics_row(cfg, server, outcome, updates, sampled, dropped, evaluation,
                              time.perf_counter() - t_round, traffic=replies.traffic)
            row.update(replies.extra)
            row["eval_protocol"] = self.host.task.eval_protocol(cfg)
            if replies.failed is not None:
                row["failed"] = replies.failed
            row.update(transport.round_metrics(self))
            if server.strategy.roles(server.round).personal and server.round == cfg.federation.rounds:
                personal = transport.personal_eval(self)
                if personal is not None:
                    row["personal_accuracy"], row["personal_clients"] = personal
                    self.progress.note(f"personalised accuracy (each client's own model, {personal[1]} clients): "
                                       f"{personal[0]:.4f}")
                else:  # the clients' own parts live where they train: this engine does not score them
                    row["personal_accuracy"] = None
                    row["personal_note"] = (f"not measured on engine={cfg.engine}: each client's personal parts "
                                            "stay on its node")
            writer.write(row)
            self.save_checkpoint(transport)
            self.progress.end_round(row)
            for callback in self.callbacks:
                callback(row)
        return self.finish()

    def save_checkpoint(self, transport: Transport) -> None:
        layers = lora.lora_layers(self.host.model)
        save_checkpoint(self.run_dir / "checkpoint", {
            "server": self.server.state_dict(),
            "transport": transport.state_dict(),
            # The exact float32 base weights that absorbed merges (FLoRA, FedEx), not a re-summed delta.
            "base_weights": {n: layers[n].get_base_layer().weight.detach().float().cpu().numpy().copy()
                             for n in self.server.base_delta},
            "before": list(self.before),
        })

    def finish(self) -> dict:
        """Export the global adapter and write summary.json (also after a resume from the final checkpoint)."""
        cfg, server = self.cfg, self.server
        rows = read_metrics(self.run_dir)
        if cfg.output.save_adapter:
            rank, factors = server.global_eval_factors()
            export_adapter(cfg, self.run_dir / "adapter", rank, factors, server.head, server.base_delta,
                           self.data.label_names)
        summary = run_summary(cfg, server, rows, self.before, self.data,
                              eval_protocol=self.host.task.eval_protocol(cfg))
        write_summary(self.run_dir, summary)
        return summary
