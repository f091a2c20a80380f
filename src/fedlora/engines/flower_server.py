"""The fedlora ServerApp loop over a Flower Grid: fedlora's `Server` decides, Flower carries the messages.

Per round: sample clients and draw simulated failures (as the local engine does, same RNG), send each
sampled client's node its own rank's downlink, wait for replies with a timeout, go on with the valid ones
(`Server.finish_round` enforces federation.min_clients), merge base deltas, evaluate centrally on the
held-out set. Clients that crash, time out or send malformed payloads are listed in the row's `dropped`.
"""

from __future__ import annotations

from fedlora.engines import flower_env  # noqa: F401  (before flwr: no telemetry, no update check)

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora import lora
from fedlora.client import Update
from fedlora.config import ExperimentConfig
from fedlora.engines.flower_client import NUM_PARTITIONS_KEY, PARTITION_KEY
from fedlora.engines.flower_wire import BaseEntry, decode_update, encode_downlink
from fedlora.engines.local import build_strategy
from fedlora.experiment import FederatedData, evaluate_global, dense_to_factors, export_adapter, metrics_row, prepare_data, run_summary
from fedlora.metrics import MetricsWriter, write_summary
from fedlora.models import ModelHost, adapter_name, load_tokenizer
from fedlora.progress import RunProgress
from fedlora.server import Server


class FlowerRunError(ValueError):
    """A federation that cannot go on (no nodes, too few valid replies): one line, non-zero exit."""


@dataclass
class FlowerOptions:
    round_timeout_s: float = 600.0  # wait this long for a round's replies, then go on with what arrived
    node_wait_s: float = 120.0  # wait this long for every client's SuperNode to connect before round 1
    federated_eval: bool = False  # also evaluate the global adapter on each client's own data every round


def one_line(text: str, limit: int = 300) -> str:
    lines = [x.strip() for x in str(text).strip().splitlines() if x.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


class ServerSide:
    """The server's model (central evaluation, merges), held-out data and fedlora `Server`, built once."""

    def __init__(self, cfg: ExperimentConfig, progress: RunProgress):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.data: FederatedData = prepare_data(cfg, load_tokenizer(cfg.model.name))
        progress.note(self.data.load_summary)
        self.host = ModelHost(cfg, len(self.data.label_names), set(cfg.client_ranks()))
        dims = lora.module_dims(self.host.model)
        self.strategy = build_strategy(cfg, dims)
        r_max = max(cfg.client_ranks())
        self.server = Server(cfg, self.strategy, dims, lora.get_head(self.host.model, adapter_name(r_max)),
                             [len(c) for c in self.data.clients])
        self.base_log: list[BaseEntry] = []  # every merged delta, factored: what late clients still need

    def evaluate_global(self) -> tuple[float, float]:
        return evaluate_global(self.cfg, self.host, self.server, self.data.test)

    def merge(self, base_delta: dict[str, np.ndarray]) -> None:
        lora.merge_base_delta(self.host.model, base_delta)
        # Clients get the merged delta as exact low-rank factors, not as dense matrices.
        self.base_log.append({m: dense_to_factors(d) for m, d in base_delta.items()})


# -- nodes ------------------------------------------------------------------------------------------------------
def map_nodes(grid: Grid, cfg: ExperimentConfig, options: FlowerOptions, known: dict[int, int],
              progress: RunProgress) -> dict[int, int]:
    """client id -> node id, asking each new node its partition id. Waits up to node_wait_s for all clients."""
    n = cfg.federation.num_clients
    mapping, asked = dict(known), set(known.values())
    deadline = time.monotonic() + options.node_wait_s
    while True:
        new = [int(x) for x in grid.get_node_ids() if int(x) not in asked]
        if new:
            msgs = [Message(RecordDict({"q": ConfigRecord({"ask": "partition"})}), dst_node_id=x,
                            message_type=MessageType.QUERY) for x in new]
            for reply in grid.send_and_receive(msgs, timeout=max(10.0, min(60.0, options.node_wait_s))):
                if reply.has_error():
                    progress.note(f"node {reply.metadata.src_node_id}: {one_line(reply.error.reason)}")
                    continue
                asked.add(int(reply.metadata.src_node_id))
                info = reply.content["node"]
                pid = int(info[PARTITION_KEY])
                if NUM_PARTITIONS_KEY in info and int(info[NUM_PARTITIONS_KEY]) != n:
                    raise FlowerRunError(f"a SuperNode has num-partitions={info[NUM_PARTITIONS_KEY]} but "
                                         f"federation.num_clients={n}")
                if not 0 <= pid < n:
                    raise FlowerRunError(f"a SuperNode has partition-id={pid}, outside 0..{n - 1}")
                mapping[pid] = int(reply.metadata.src_node_id)  # a restarted node replaces the old one
        if len(mapping) >= n or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if len(mapping) < cfg.federation.min_clients:
        raise FlowerRunError(f"only {len(mapping)} of {n} clients' SuperNodes connected within "
                             f"{options.node_wait_s:.0f}s (federation.min_clients={cfg.federation.min_clients})")
    if len(mapping) < n and mapping != known:
        progress.note(f"clients without a SuperNode: {sorted(set(range(n)) - set(mapping))}")
    return mapping


# -- rounds -----------------------------------------------------------------------------------------------------
@dataclass
class RoundTraffic:
    updates: list[Update]
    dropped: dict[int, str]
    bytes_up: int = 0
    bytes_up_head: int = 0
    bytes_down: int = 0
    setup_s: float = 0.0


class FlowerRounds:
    """Drives the rounds of one run over a Grid and writes the run folder like the local engine."""

    def __init__(self, grid: Grid, side: ServerSide, run_dir: Path, progress: RunProgress, options: FlowerOptions):
        self.grid, self.side, self.cfg = grid, side, side.cfg
        self.run_dir, self.progress, self.options = Path(run_dir), progress, options
        self.config_toml = self.cfg.to_toml()
        self.nodes: dict[int, int] = {}
        self.acked: dict[int, int] = {}  # node id -> base-delta entries the node confirmed holding

    def _instruction(self, client_id: int, node: int, kind: str) -> tuple[Message, int]:
        side = self.side
        start = self.acked.get(node, 0)
        payload = encode_downlink(self.cfg, side.server.downlink(client_id), client_id, side.strategy.sends_A,
                                  side.base_log[start:], start, self.config_toml, side.data.label_names)
        msg = Message(payload.content, dst_node_id=node, message_type=kind, group_id=str(side.server.round + 1))
        return msg, payload.nbytes

    def train_round(self) -> tuple[list[int], RoundTraffic]:
        server = self.side.server
        sampled = server.sample_clients()
        traffic = RoundTraffic([], {c: "dropped out (simulated failure)" for c in server.draw_dropouts(sampled)})
        sent: dict[int, int] = {}  # node -> client
        messages = []
        for c in sampled:
            if c in traffic.dropped:
                continue
            if c not in self.nodes:
                traffic.dropped[c] = "no SuperNode serves this client"
                continue
            msg, nbytes = self._instruction(c, self.nodes[c], MessageType.TRAIN)
            messages.append(msg)
            sent[self.nodes[c]] = c
            traffic.bytes_down += nbytes
        self.progress.start_round(server.round + 1, len(messages) * self.cfg.local_steps())
        replies = list(self.grid.send_and_receive(messages, timeout=self.options.round_timeout_s)) if messages else []
        answered = set()
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            c = sent.get(node)
            if c is None:
                continue
            answered.add(node)
            if reply.has_error():
                traffic.dropped[c] = f"client failed: {one_line(reply.error.reason)}"
                continue
            if "skip" in reply.content:  # e.g. its privacy budget would be exceeded: it sits out
                traffic.dropped[c] = str(reply.content["skip"]["reason"])
                continue
            try:
                up = decode_update(reply.content, self.cfg, server.dims, self.side.strategy.sends_A)
            except ValueError as exc:
                traffic.dropped[c] = one_line(str(exc))
                continue
            if up.update.client_id != c:
                traffic.dropped[c] = f"reply claims client {up.update.client_id}"
                continue
            traffic.updates.append(up.update)
            traffic.bytes_up += up.nbytes
            traffic.bytes_up_head += up.nbytes_head
            traffic.setup_s += float(up.metrics.get("setup-s", 0.0))
            self.acked[node] = int(up.metrics.get("base-count", self.acked.get(node, 0)))
            self.progress.advance(up.update.steps)
        for node, c in sent.items():
            if node not in answered:
                traffic.dropped[c] = f"no reply within {self.options.round_timeout_s:g}s"
        # Aggregate in client order, as the local engine does: float sums then agree bit for bit.
        traffic.updates.sort(key=lambda u: u.client_id)
        return sampled, traffic

    def federated_eval(self) -> float | None:
        """Weighted mean accuracy of the global adapter on every mapped client's own data."""
        messages = [self._instruction(c, node, MessageType.EVALUATE)[0] for c, node in sorted(self.nodes.items())]
        total, correct = 0, 0.0
        for reply in self.grid.send_and_receive(messages, timeout=self.options.round_timeout_s):
            if reply.has_error():
                continue
            m = reply.content["metrics"]
            total += int(m["num-examples"])
            correct += float(m["eval-accuracy"]) * int(m["num-examples"])
        return correct / total if total else None

    def run(self) -> dict:
        cfg, side, server = self.cfg, self.side, self.side.server
        self.nodes = map_nodes(self.grid, cfg, self.options, self.nodes, self.progress)
        writer = MetricsWriter(self.run_dir)
        loss0, acc0 = side.evaluate_global()
        self.progress.note(f"held-out accuracy before training: {acc0:.4f} ({len(side.data.test)} examples)")
        rows: list[dict] = []
        for _ in range(server.round, cfg.federation.rounds):
            t_round = time.perf_counter()
            if rows:  # a SuperNode that (re)connected since: ask it which client it is, without waiting
                now = replace(self.options, node_wait_s=0.0)
                self.nodes = map_nodes(self.grid, cfg, now, self.nodes, self.progress)
            sampled, traffic = self.train_round()
            try:
                outcome = server.finish_round(traffic.updates, sampled)
            except RuntimeError as exc:
                why = "; ".join(f"client {c}: {r}" for c, r in sorted(traffic.dropped.items()))
                raise FlowerRunError(f"{exc}" + (f" ({why})" if why else "")) from None
            if outcome.base_delta:
                side.merge(outcome.base_delta)
            eval_loss, eval_acc = side.evaluate_global()
            row = metrics_row(
                cfg, server, outcome, traffic.updates, sampled, traffic.dropped, (eval_loss, eval_acc),
                time.perf_counter() - t_round, traffic=(traffic.bytes_up, traffic.bytes_up_head, traffic.bytes_down),
            )
            row["client_setup_s"] = traffic.setup_s
            if self.options.federated_eval:
                row["client_eval_accuracy"] = self.federated_eval()
            writer.write(row)
            rows.append(row)
            self.progress.end_round(row)
        return self._finish(rows, (loss0, acc0))

    def _finish(self, rows: list[dict], before: tuple[float, float]) -> dict:
        cfg, side, server = self.cfg, self.side, self.side.server
        rank, factors = server.global_eval_factors()
        if cfg.output.save_adapter:
            export_adapter(cfg, self.run_dir / "adapter", rank, factors, server.head, server.base_delta,
                           side.data.label_names)
        summary = run_summary(cfg, server, rows, before, side.data)
        write_summary(self.run_dir, summary)
        return summary
