"""The Flower transport of a `fedlora.Run`: the run's loop decides, Flower carries the messages.

Per round the run samples clients; this transport sends each sampled client's node its own rank's downlink,
waits for replies with a timeout and decodes them. Clients that crash, time out or send malformed payloads
come back as `dropped` with a reason. Merged base deltas are kept factored and sent to every node that has not
confirmed them yet (also after a resume, when nodes start empty).
"""

from __future__ import annotations


from fedlora.engines import flower_env  # noqa: F401  (before flwr: no telemetry, no update check)

import json
import time
from dataclasses import dataclass, replace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.errors import UserError, one_line  # noqa: F401  (one_line re-exported)
from fedlora.config import ExperimentConfig, RoundFailed
from fedlora.engines.flower_client import COMPRESSED, NUM_PARTITIONS_KEY, PARTITION_KEY
from fedlora.engines.flower_replies import (
    MAX_EXAMPLES,
    BadReply,
    decode_evaluation,
    decode_node_info,
    decode_node_profile,
    decode_skip,
)
from fedlora.engines.flower_wire import BaseEntry, decode_update, encode_downlink, encode_update
from fedlora.experiment import dense_to_factors
from fedlora.flaas.profiles import NODE_PREFIX
from fedlora.progress import RunProgress
from fedlora.federated_run import RoundReplies, Run, Transport


class FlowerRunError(UserError):
    """A federation that cannot go on (no nodes, too few valid replies): one line, non-zero exit."""


@dataclass
class FlowerOptions:
    round_timeout_s: float = 600.0  # wait this long for a round's replies, then go on with what arrived
    node_wait_s: float = 120.0  # wait this long for every client's SuperNode to connect before round 1
    federated_eval: bool = False  # also evaluate the global adapter on each client's own data every round


# -- nodes ------------------------------------------------------------------------------------------------------
def map_nodes(grid: Grid, cfg: ExperimentConfig, options: FlowerOptions, known: dict[int, int],
              progress: RunProgress, profiles: dict[int, dict] | None = None) -> dict[int, int]:
    """client id -> node id, asking each new node its partition id (and the profile it declares, into
    `profiles`). Waits up to node_wait_s for all clients."""
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
                try:
                    pid, partitions = decode_node_info(reply.content, PARTITION_KEY, NUM_PARTITIONS_KEY)
                except BadReply as exc:  # this node stays unmapped; the others go on
                    progress.note(f"node {reply.metadata.src_node_id}: {exc}")
                    continue
                if partitions is not None and partitions != n:
                    raise FlowerRunError(f"a SuperNode has num-partitions={partitions} but "
                                         f"federation.num_clients={n}")
                if not 0 <= pid < n:
                    raise FlowerRunError(f"a SuperNode has partition-id={pid}, outside 0..{n - 1}")
                mapping[pid] = int(reply.metadata.src_node_id)  # a restarted node replaces the old one
                if profiles is not None:
                    try:
                        profiles[pid] = decode_node_profile(reply.content, NODE_PREFIX)
                    except BadReply as exc:  # checked again by the planner; an unreadable one is no profile
                        progress.note(f"node {reply.metadata.src_node_id}: {exc}")
                        profiles[pid] = {f"{NODE_PREFIX}unreadable": 1}
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
class FlowerTransport(Transport):
    """Moves one run's downlinks and updates over a Flower Grid (simulation or deployment)."""

    def __init__(self, grid: Grid, options: FlowerOptions):
        self.grid, self.options = grid, options
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.acked: dict[int, int] = {}  # node id -> base-delta entries the node confirmed holding
        self.base_log: list[BaseEntry] = []  # every merged delta, factored: what late clients still need
        self.primed: set[int] = set()  # nodes that got an instruction from this process
        self.rounds_here = 0
        self.profiles: dict[int, dict] = {}  # client id -> the profile keys its node declared (fedlora.flaas)

    # -- Transport ---------------------------------------------------------------------------------------------
    def open(self, run: Run) -> None:
        self.config_toml = run.cfg.to_toml()
        self.nodes = map_nodes(self.grid, run.cfg, self.options, self.nodes, run.progress, self.profiles)

    def begin_round(self, run: Run) -> None:
        if self.rounds_here:  # a SuperNode that (re)connected since: ask it which client it is, without waiting
            now = replace(self.options, node_wait_s=0.0)
            self.nodes = map_nodes(self.grid, run.cfg, now, self.nodes, run.progress, self.profiles)
        self.rounds_here += 1

    def node_profiles(self) -> dict[int, dict]:
        return dict(self.profiles)

    def train(self, run: Run, clients: list[int]) -> RoundReplies:
        if run.cfg.privacy.secure_aggregation:  # the round as Flower's SecAgg+ protocol: the server gets the sum
            from fedlora.engines.flower_secagg import secure_round

            return secure_round(self, run, clients)
        server = run.server
        replies = RoundReplies([], {}, extra={"client_setup_s": 0.0})
        up = down = up_head = 0
        sent: dict[int, int] = {}  # node -> client
        messages = []
        for c in clients:
            if c not in self.nodes:
                replies.dropped[c] = "no SuperNode serves this client"
                continue
            msg, nbytes = self._instruction(run, c, self.nodes[c], MessageType.TRAIN)
            messages.append(msg)
            sent[self.nodes[c]] = c
            down += nbytes
        answers = list(self.grid.send_and_receive(messages, timeout=self.options.round_timeout_s)) if messages else []
        answered = set()
        for reply in answers:
            node = int(reply.metadata.src_node_id)
            c = sent.get(node)
            if c is None:
                continue
            answered.add(node)
            if reply.has_error():
                replies.dropped[c] = f"client failed: {one_line(reply.error.reason)}"
                continue
            try:
                if "skip" in reply.content:  # e.g. its privacy budget would be exceeded: it sits out
                    replies.dropped[c] = decode_skip(reply.content)
                    continue
                content, sizes = decompressed(reply.content, server, c)
                payload = decode_update(content, server, c)
            except BadReply as exc:  # the reply's own defect; anything else is the server's bug and propagates
                replies.dropped[c] = one_line(str(exc))
                continue
            replies.updates.append(payload.update)
            up += sizes[0] if sizes else payload.nbytes
            up_head += sizes[1] if sizes else payload.nbytes_head
            replies.extra["client_setup_s"] += payload.metrics["setup-s"]
            # What the node says it holds, never more than what exists (a lie only costs it a resend).
            self.acked[node] = min(payload.metrics["base-count"], len(self.base_log))
            run.progress.advance(payload.update.steps)
        for node, c in sent.items():
            if node not in answered:
                replies.dropped[c] = f"no reply within {self.options.round_timeout_s:g}s"
        replies.traffic = (up, up_head, down)
        return replies

    def merged(self, run: Run, base_delta: dict[str, np.ndarray]) -> None:
        # Clients get the merged delta as exact low-rank factors, not as dense matrices.
        self.base_log.append({m: dense_to_factors(d) for m, d in base_delta.items()})

    def round_metrics(self, run: Run) -> dict:
        if not self.options.federated_eval:
            return {}
        accuracy, dropped = self.federated_eval(run)
        return {"client_eval_accuracy": accuracy} | ({"client_eval_dropped": dropped} if dropped else {})

    def state_dict(self) -> dict:
        return {"base_log": [{m: [B, A] for m, (B, A) in entry.items()} for entry in self.base_log]}

    def load_state_dict(self, state: dict) -> None:
        # Nodes of a restarted federation hold nothing: every node is sent the whole history again.
        self.base_log = [{m: (B, A) for m, (B, A) in entry.items()} for entry in state.get("base_log", [])]
        self.acked = {}

    # -- messages ----------------------------------------------------------------------------------------------
    def _instruction(self, run: Run, client_id: int, node: int, kind: str) -> tuple[Message, int]:
        start = self.acked.get(node, 0)
        # A node this process has not instructed yet may have lost its state (a resumed run, a restarted
        # SuperNode): it gets the client's last privacy report, so its DP accountant continues, not restarts.
        privacy = run.server.privacy.get(client_id) if node not in self.primed else None
        self.primed.add(node)
        payload = encode_downlink(run.cfg, run.server.downlink(client_id), client_id, run.strategy,
                                  self.base_log[start:], start, self.config_toml, run.data.label_names,
                                  privacy_state=json.dumps(privacy) if privacy else "")
        msg = Message(payload.content, dst_node_id=node, message_type=kind, group_id=str(run.server.round + 1))
        return msg, payload.nbytes

    def federated_eval(self, run: Run) -> tuple[float | None, dict[str, str]]:
        """(weighted mean accuracy of the global adapter on every mapped client's own data, client -> why its
        evaluation was not counted)."""
        sent = {node: c for c, node in sorted(self.nodes.items())}
        messages = [self._instruction(run, c, node, MessageType.EVALUATE)[0] for node, c in sent.items()]
        total, correct, dropped = 0, 0.0, {}
        for reply in self.grid.send_and_receive(messages, timeout=self.options.round_timeout_s):
            c = sent.pop(int(reply.metadata.src_node_id), None)
            if c is None:  # not a node this evaluation asked, or a second reply
                continue
            if reply.has_error():
                dropped[str(c)] = f"client failed: {one_line(reply.error.reason)}"
                continue
            try:
                ev = decode_evaluation(reply.content, c, eval_example_bound(run.cfg))
            except BadReply as exc:
                dropped[str(c)] = one_line(str(exc))
                continue
            total += ev.num_examples
            correct += ev.accuracy * ev.num_examples
        dropped.update({str(c): f"no reply within {self.options.round_timeout_s:g}s" for c in sent.values()})
        return (correct / total if total else None), dropped


def eval_example_bound(cfg: ExperimentConfig) -> int:
    """The most examples one client's evaluation may weigh: the evaluation cap every client applies, else the
    same bound as a training reply's count."""
    return int(cfg.data.max_eval_examples or MAX_EXAMPLES)


def decompressed(content: RecordDict, server, client_id: int) -> tuple[RecordDict, tuple[int, int] | None]:
    """A reply with a compressed upload (`COMPRESSED`) turned into the float32 reply `decode_update` reads (which
    then checks it like any other), and (bytes, bytes of the head) as sent; a plain reply as it is, None."""
    from fedlora import compression
    from fedlora.client import Update

    if COMPRESSED not in content:
        return content, None
    record = content[COMPRESSED]
    if not isinstance(record, ArrayRecord):
        raise BadReply(f"malformed reply: {COMPRESSED} is not an array record")
    # A compressed upload is never larger than the float32 one: refuse to parse anything bigger.
    limit = 2 * sum(int(np.prod(s)) * 4 for s in _sent_shapes(server, client_id)) + 4096 * (len(record) + 1)
    if any(not isinstance(a, Array) or a.stype != "numpy.ndarray" for a in record.values()) \
            or sum(len(a.data) for a in record.values()) > limit:
        raise BadReply("malformed reply: compressed upload is not NumPy arrays of the expected size")
    arrays = {}
    for k, a in record.items():
        try:
            arrays[str(k)] = a.numpy()
        except Exception as exc:  # parsing the reply's own bytes: NumPy raises several types on a corrupt stream
            raise BadReply(f"malformed reply: compressed upload: unreadable array ({type(exc).__name__})") from None
    try:
        factors, head = compression.decompress_update(server, client_id, arrays)
    except ValueError as exc:  # the codec's answer to a payload that does not fit (its documented contract)
        raise BadReply(f"malformed reply: compressed upload: {one_line(str(exc), 200) or type(exc).__name__}") from None
    rank = server.expected_rank(client_id)
    plain = encode_update(Update(client_id=client_id, rank=rank, factors=factors, head=head, num_examples=1,
                                 train_loss=0.0, steps=0, samples=0, train_s=0.0),
                          server.strategy, server.up_parts())
    out = RecordDict({k: v for k, v in content.items() if k != COMPRESSED})
    out["lora"], out["head"] = plain["lora"], plain["head"]
    return out, (compression.payload_nbytes(arrays),
                 compression.payload_nbytes({k: v for k, v in arrays.items() if k.startswith("head.")}))


def _sent_shapes(server, client_id: int) -> list[tuple[int, ...]]:
    from fedlora.protocol import sent_tensors

    return [a.shape for a in sent_tensors(server.strategy, server.up_parts(), server.sent_factors(client_id),
                                          server.head).values()]


def run_on_grid(run: Run, grid: Grid, options: FlowerOptions) -> dict:
    """`run.loop` over Flower; a round without enough valid replies ends it with one line."""
    try:
        return run.loop(FlowerTransport(grid, options))
    except RoundFailed as exc:
        raise FlowerRunError(str(exc)) from None
