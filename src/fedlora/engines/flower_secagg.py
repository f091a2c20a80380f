"""Secure aggregation on Flower (simulation and deployment): one fedlora round as Flower's SecAgg+ protocol.

Decision (see fedlora.secagg for what is summed and the guarantees): fedlora's loop keeps the round and drives
the four public stage methods of Flower's `SecAggPlusWorkflow` (setup, share keys, collect masked vectors,
unmask) on the transport's Grid. The workflow's legacy strategy is a stand-in (`_SumTaker`): it hands each node
its fedlora train instruction in the collect stage and receives the unmasked sum, the only aggregate the server
side ever sees. Nodes run Flower's `secaggplus_mod` unchanged (`secagg_mod` routes only SecAgg+ messages to it):
in the collect stage it calls fedlora's train handler, which answers with the summand (`secure_reply`), and the
mod masks it and clears every array record before the reply leaves the node. Dropouts within the threshold are
recovered by the workflow (Shamir shares); below it the workflow halts and the round changes nothing.
"""

from __future__ import annotations

from fedlora.engines import flower_env  # noqa: F401  (before flwr: no telemetry, no update check)

import json
import time
from types import SimpleNamespace

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedlora import secagg
from fedlora.engines.flower_replies import BadReply, decode_member
from fedlora.client import Update

SECAGG_INS = "fedlora.secagg"  # the round's SecAgg parameters in a train instruction (width, coef, max-weight)


# -- client side -------------------------------------------------------------------------------------------------
def secagg_mod(msg: Message, context, call_next) -> Message:
    """Flower's `secaggplus_mod` for SecAgg+ messages; every other message goes straight to the ClientApp."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_reply(strategy, dims, down, update, ins: ConfigRecord, extra: dict) -> RecordDict:
    """The collect stage's reply of fedlora's train handler: the summand as a legacy FitRes (what the mod reads),
    weighted by the example count (clamped to the round's max weight), and the client's metadata as scalars."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    width, coef, max_weight = int(ins["width"]), float(ins["coef"]), float(ins["max-weight"])
    parts = strategy.roles(down.round).up
    names = secagg.layout(parts, dims, {k: np.shape(h) for k, h in down.head.items()}, width)
    dp_clip = float(ins.get("dp-clip", 0.0)) or None  # client-level DP: the change is clipped here, on the client
    x = secagg.summand(strategy, parts, update, names, coef, (down.factors, down.head), dp_clip)
    weight = max(1, int(min(update.num_examples, max_weight)))
    plan = secagg.Plan(width, {}, max_weight, float(ins["clip"]), int(ins["bits"]))
    metrics = {
        "client-id": update.client_id, "rank": update.rank, "num-examples": weight,
        "train-loss": float(update.train_loss), "steps": update.steps, "samples": update.samples,
        "train-s": float(update.train_s), "privacy": json.dumps(update.privacy),
        "secagg-clipped": secagg.clipped_values(x, weight, plan), **extra,
    }
    return fitres_to_recorddict(FitRes(Status(Code.OK, ""), ndarrays_to_parameters(x), weight, metrics), False)


# -- server side -------------------------------------------------------------------------------------------------
def content_nbytes(content: RecordDict) -> tuple[int, int]:
    """(array bytes, other bytes) of a message's payload: array data, bytes and text values, 8 per number."""
    arrays = other = 0

    def size(v) -> int:
        if isinstance(v, (bytes, str)):
            return len(v.encode() if isinstance(v, str) else v)
        if isinstance(v, list):
            return sum(size(x) for x in v)
        return 8

    for record in content.values():
        if isinstance(record, ArrayRecord):
            arrays += sum(len(a.data) for a in record.values())
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            other += sum(size(v) for v in record.values())
    return arrays, other


class _Recorder:
    """The Grid the workflow talks to: the transport's, counting what goes each way and keeping the errors."""

    def __init__(self, grid):
        self.grid = grid
        self.bytes_down = self.bytes_up = 0
        self.reply_arrays = 0  # array bytes in any reply: the mod clears them, so this stays 0
        self.errors: dict[int, str] = {}
        self.replied: set[int] = set()

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.bytes_down += sum(sum(content_nbytes(m.content)) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            node = int(r.metadata.src_node_id)
            self.replied.add(node)
            if r.has_error():
                self.errors[node] = str(r.error.reason)
                continue
            arrays, other = content_nbytes(r.content)
            self.reply_arrays += sum(len(a.data) for k, rec in r.content.items() if isinstance(rec, ArrayRecord)
                                     for a in rec.values())
            self.bytes_up += arrays + other
        return replies


class _SumTaker:
    """The workflow's legacy strategy: it selects the round's nodes and takes the unmasked sum (a weighted mean,
    the same `parameters` object in every result: the workflow put it there)."""

    def __init__(self, nodes: list[int]):
        from flwr.common import FitIns, Parameters

        self.selection = [(SimpleNamespace(node_id=n), FitIns(Parameters([], ""), {})) for n in nodes]
        self.received: list = []

    def configure_fit(self, server_round, parameters, client_manager):
        return self.selection

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        self.received.append([id(fitres.parameters) for _, fitres in results])
        self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return None, {}


def _as_update(m) -> Update:
    """A checked contributor's metadata as the Update the server's round reads (no factors, no head)."""
    return Update(client_id=m.client_id, rank=m.rank, factors={}, head={}, num_examples=m.num_examples,
                  train_loss=m.train_loss, steps=m.steps, samples=m.samples, train_s=m.train_s, privacy=m.privacy)


def secure_round(transport, run, clients: list[int]):
    """One round over SecAgg+: RoundReplies with `summed` (the sum and its members) or `failed`."""
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState

    from fedlora.errors import one_line
    from fedlora.federated_run import RoundReplies

    server, cfg = run.server, run.cfg
    replies = RoundReplies([], {}, extra={"secure_aggregation": True})
    nodes: dict[int, int] = {}  # node -> client
    for c in clients:
        if c in transport.nodes:
            nodes[transport.nodes[c]] = c
        else:
            replies.dropped[c] = "no SuperNode serves this client"
    if len(nodes) < 2:
        replies.failed = f"secure aggregation needs 2 clients, {len(nodes)} reachable"
        return replies
    plan = secagg.plan(server, sorted(nodes.values()))
    instructions = {}
    for node, c in nodes.items():
        msg, _ = transport._instruction(run, c, node, MessageType.TRAIN)
        msg.content[SECAGG_INS] = ConfigRecord({"width": plan.width, "coef": plan.coefs[c], "clip": plan.clip,
                                                "bits": plan.bits, "max-weight": plan.max_weight,
                                                "dp-clip": plan.dp_clip or 0.0})
        instructions[node] = msg.content
    grid = _Recorder(transport.grid)
    taker = _SumTaker(list(nodes))
    context = SimpleNamespace(
        state=RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server.round + 1}),
                          MAIN_PARAMS_RECORD: ArrayRecord()}),
        strategy=taker, client_manager=SimpleNamespace(num_available=lambda: len(nodes)))
    workflow = SecAggPlusWorkflow(1.0, cfg.privacy.secagg_threshold, max_weight=plan.max_weight,
                                  clipping_range=plan.clip, quantization_range=plan.quantization_range,
                                  timeout=transport.options.round_timeout_s)
    state = WorkflowState()
    stage_s = []
    ok = True
    for i, stage in enumerate((workflow.setup_stage, workflow.share_keys_stage,
                               workflow.collect_masked_vectors_stage, workflow.unmask_stage)):
        t0 = time.perf_counter()
        ok = stage(grid, context, state)
        stage_s.append(round(time.perf_counter() - t0, 4))
        if i == 0:
            state.nid_to_fitins = instructions  # the workflow's FitIns stand-ins become fedlora's instructions
        if not ok:
            break
    contributed = {int(proxy.node_id): fitres for proxy, fitres in state.legacy_results}
    for node, c in nodes.items():
        if node in grid.errors and node not in contributed:
            replies.dropped[c] = f"client failed: {one_line(grid.errors[node])}"
        elif node not in grid.replied:
            replies.dropped[c] = f"no reply within {transport.options.round_timeout_s:g}s"
    replies.extra.update(secagg_stage_s=stage_s, secagg_reply_arrays=grid.reply_arrays,
                         secagg_sums_received=len(taker.received))
    replies.traffic = (grid.bytes_up, 0, grid.bytes_down)
    mean = getattr(taker, "mean", None)
    if not ok or mean is None:
        replies.failed = (f"secure aggregation halted: {len(contributed)} of {len(nodes)} clients sent a masked "
                          f"update, too few to unmask (privacy.secagg_threshold={cfg.privacy.secagg_threshold})")
        return replies
    try:  # every field of every contributor's metadata is checked (decode_member); the sum's layout too
        checked = {node: decode_member(fitres.metrics, fitres.num_examples, nodes[node],
                                       server.expected_rank(nodes[node]), server.mechanism.client_reports,
                                       plan.max_weight)
                   for node, fitres in contributed.items()}
        members = [_as_update(checked[node]) for node in sorted(checked, key=lambda n: nodes[n])]
        summed = secagg.summed_round(server, plan, mean, members)
    except (BadReply, ValueError) as exc:  # a member's metadata, or a sum without the round's layout
        replies.failed = f"secure aggregation: {one_line(str(exc))}"
        return replies
    for node, m in checked.items():
        transport.acked[node] = min(m.base_count, len(transport.base_log))
    replies.extra.update(client_setup_s=sum(m.setup_s for m in checked.values()),
                         secagg_clipped=sum(m.clipped for m in checked.values()))
    head = sum(int(np.prod(np.shape(h))) for h in server.head.values())
    replies.traffic = (grid.bytes_up, 8 * head * len(members), grid.bytes_down)
    replies.summed = summed
    for u in members:
        run.progress.advance(u.steps)
    return replies
