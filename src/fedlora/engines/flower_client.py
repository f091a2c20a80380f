"""The fedlora ClientApp: runs the same `ClientTrainer.train` as the local engine on this node's data.

A node learns everything from the train instruction (the resolved config travels with it), so the same
ClientApp serves Flower's simulation and a real SuperNode. Per node, `context.state` keeps what must outlive
one round: the client's DP accountant, the base deltas merged so far (FLoRA, FedEx) and what the method keeps
on its clients (FedSA's B; in the node config's `state-dir` folder instead when given, which also survives a
SuperNode restart). Per process, the base
model is loaded once and shared by the nodes the process serves (Ray actors in simulation).
"""

from __future__ import annotations


from fedlora.engines import flower_env  # noqa: F401  (before flwr: no telemetry, no update check)

import hashlib
import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.errors import UserError
from fedlora import lora
from fedlora.client import ClientTrainer, EncodedData, client_round, evaluate
from fedlora.client_state import ClientStateStore
from fedlora.config import ExperimentConfig
from fedlora.engines.flower_secagg import SECAGG_INS, secagg_mod, secure_reply
from fedlora.engines.flower_wire import BaseEntry, decode_base_entries, decode_downlink, encode_update
from fedlora.flaas.profiles import node_profile_fields
from fedlora.host import ModelHost

PARTITION_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
DATA_PATH_KEY = "data-path"
BASE_STATE = "fedlora.base"
PRIVACY_STATE = "fedlora.privacy"
CLIENT_STATE = "fedlora.client-state"
STATE_DIR_KEY = "state-dir"

Fault = Callable[[int, int], None]  # (round, client id) -> None; raises to make this client fail (tests)


def config_from_toml(text: str) -> ExperimentConfig:
    """The server's resolved config. Its data.path is the server's: a node reads its own data (node config)."""
    from fedlora.config import validate_tree

    return validate_tree(tomllib.loads(text), check_files=False)


def node_partition(node_config) -> tuple[int, int | None]:
    """(partition id, number of partitions) of this SuperNode; one clear line if it was started without them."""
    if PARTITION_KEY not in node_config:
        raise UserError(f"this SuperNode has no {PARTITION_KEY}: "
                         "start it with --node-config 'partition-id=K num-partitions=N'")
    n = node_config.get(NUM_PARTITIONS_KEY)
    return int(node_config[PARTITION_KEY]), None if n is None else int(n)


@dataclass
class ClientRuntime:
    """Model host, trainer and data of one experiment in this process (one per config, the latest kept)."""

    cfg: ExperimentConfig
    host: ModelHost
    trainer: ClientTrainer
    label_names: list[str]
    setup_s: float
    partitions: dict[int, EncodedData] = field(default_factory=dict)
    files: dict[str, EncodedData] = field(default_factory=dict)
    pristine: dict[str, torch.Tensor] | None = None  # base weights before any merged delta
    applied: int = 0  # base-delta entries merged into this process's base weights

    def client_data(self, node_config, client_id: int) -> EncodedData:
        """The node's own file (node config `data-path`) or its partition of the configured dataset."""
        path = node_config.get(DATA_PATH_KEY)
        if path:
            if path not in self.files:
                self.files[path] = self.host.task.file_data(self.cfg, str(path), self.host.tokenizer, self.label_names)
            return self.files[path]
        if client_id not in self.partitions:
            # This client's share as the server partitions it, tokenizing only this share (a ClientApp
            # process per round in deployment: the rest would be wasted work).
            data, names = self.host.task.client_data(self.cfg, self.host.tokenizer, client_id)
            if list(names) != list(self.label_names):
                raise UserError(f"labels differ from the server's: {names} vs {self.label_names}")
            self.partitions[client_id] = data
        return self.partitions[client_id]

    def sync_base(self, entries: list[BaseEntry]) -> None:
        """Make this process's base weights the pristine ones plus exactly `entries` (in order)."""
        if not entries and self.applied == 0:
            return
        layers = lora.lora_layers(self.host.model)
        if self.pristine is None:
            self.pristine = {n: l.get_base_layer().weight.detach().clone() for n, l in layers.items()}
        if self.applied > len(entries):  # another node of this process saw a longer history: start over
            with torch.no_grad():
                for n, w in self.pristine.items():
                    layers[n].get_base_layer().weight.copy_(w)
            self.applied = 0
        for entry in entries[self.applied:]:
            delta = {m: B.astype(np.float64) @ A.astype(np.float64) for m, (B, A) in entry.items()}
            lora.merge_base_delta(self.host.model, delta)
        self.applied = len(entries)


_RUNTIMES: dict[str, ClientRuntime] = {}


def runtime_for(config_toml: str, label_names: list[str]) -> ClientRuntime:
    key = hashlib.sha256((config_toml + "\0" + "\0".join(label_names)).encode()).hexdigest()
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one experiment per process at a time: free the previous model
        t0 = time.perf_counter()
        cfg = config_from_toml(config_toml)
        from fedlora.federated_run import build_strategy

        torch.manual_seed(cfg.seed)
        host = ModelHost(cfg, len(label_names), set(cfg.client_ranks()))
        strategy = build_strategy(cfg, lora.module_dims(host.model))
        trainer = ClientTrainer(cfg, host, strategy)
        _RUNTIMES[key] = ClientRuntime(cfg, host, trainer, list(label_names), time.perf_counter() - t0)
    return _RUNTIMES[key]


# -- node state (context.state) ---------------------------------------------------------------------------------
def _stored_base(state: RecordDict) -> dict[int, BaseEntry]:
    return decode_base_entries(RecordDict({"base": state[BASE_STATE]})) if BASE_STATE in state else {}


def store_base(state: RecordDict, new: dict[int, BaseEntry]) -> list[BaseEntry]:
    """Add the entries of this instruction to the node's history; return the whole history, in order."""
    entries = _stored_base(state)
    if new:
        entries.update(new)
        record = ArrayRecord()
        for i, entry in entries.items():
            for m, (B, A) in entry.items():
                record[f"{i}|{m}:B"], record[f"{i}|{m}:A"] = Array(B), Array(A)
        state[BASE_STATE] = record
    if sorted(entries) != list(range(len(entries))):
        raise UserError(f"base-delta history has gaps: {sorted(entries)}")
    return [entries[i] for i in range(len(entries))]


def load_privacy(cfg: ExperimentConfig, state: RecordDict, num_examples: int, server_report: str = ""):
    """This client's sample-level DP state (`dp.SamplePrivacy`): resumed from the node's state, else calibrated
    once for the whole run, as the local engine does. None without sample-level DP.

    A node without state of its own (a resumed run, a restarted SuperNode) continues from the accountant in
    the server's last report of this client (`server_report`, JSON), so its epsilon is not reset to zero."""
    from fedlora.dp import MECHANISMS, SamplePrivacy
    from fedlora.privacy import ClientAccountant

    if PRIVACY_STATE in state:
        return SamplePrivacy.from_state_dict(json.loads(str(state[PRIVACY_STATE]["state"])))
    dp = MECHANISMS[cfg.privacy.mode].client_state(cfg, num_examples)
    if dp is None:
        return None
    if server_report:
        dp.accountant = ClientAccountant.from_state_dict(json.loads(server_report)["accountant"])
    return dp


def save_privacy(state: RecordDict, dp) -> None:
    """Keep the client's DP state (sigma, q and its accountant) across rounds, as JSON in a ConfigRecord."""
    if dp is not None:
        state[PRIVACY_STATE] = ConfigRecord({"state": json.dumps(dp.state_dict())})


def client_store(context: Context) -> ClientStateStore:
    """This node's store of what its client never sends: the node config's `state-dir` folder, else a store
    rebuilt from the node's context state (written back by `keep_client_store`)."""
    folder = context.node_config.get(STATE_DIR_KEY)
    if folder:
        return ClientStateStore(Path(str(folder)))
    store = ClientStateStore()
    record = context.state[CLIENT_STATE] if CLIENT_STATE in context.state else ArrayRecord()
    held: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for key, arr in record.items():
        cid, rnd, name = key.split("|", 2)
        held.setdefault((int(cid), int(rnd)), {})[name] = arr.numpy()
    for (cid, rnd), arrays in sorted(held.items()):
        store.save(cid, rnd, arrays)
    return store


def keep_client_store(context: Context, store: ClientStateStore) -> None:
    if store.root is not None:
        return  # already on disk
    record = ArrayRecord()
    for cid, rounds in store.in_memory().items():
        for rnd, arrays in rounds.items():
            for name, arr in arrays.items():
                record[f"{cid}|{rnd}|{name}"] = Array(np.ascontiguousarray(arr))
    context.state[CLIENT_STATE] = record


# -- compressed uploads (fedlora.compression) -------------------------------------------------------------------
COMPRESSED = "lora-c"  # record of the encoded upload: "<tensor>|<part>" -> array (int8, fp16, indices, ...)


def compressed_upload(rt: ClientRuntime, client_id: int, down, update) -> ArrayRecord | None:
    """The client's sent tensors encoded with federation.compression (None: none, the float32 wire). top-k's
    residual goes to the trainer's store, which the caller persists with the node's other client state."""
    from fedlora import compression

    if not compression.CompressionSpec.from_config(rt.cfg).lossy:
        return None
    payload, _, _ = compression.compress_update(rt.cfg, rt.trainer.strategy, update,
                                                compression.start_factors(rt.trainer, down, client_id), down.head,
                                                rt.trainer.store, down.round)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()})


# -- handlers ---------------------------------------------------------------------------------------------------
def _instruction(msg: Message) -> tuple[ClientRuntime, int]:
    ins = msg.content["instruction"]
    rt = runtime_for(str(ins["config"]), [str(x) for x in ins["label-names"]])
    return rt, int(ins["client-id"])


def _check_node(context: Context, client_id: int) -> None:
    pid, _ = node_partition(context.node_config)
    if pid != client_id:
        raise UserError(f"instruction for client {client_id} reached the node of partition {pid}")


def handle_train(msg: Message, context: Context, fault: Fault | None = None) -> Message:
    rt, client_id = _instruction(msg)
    _check_node(context, client_id)
    setup_s = rt.setup_s
    rt.setup_s = 0.0  # count the model load once, in the first reply of this process
    data = rt.client_data(context.node_config, client_id)
    ins = msg.content["instruction"]
    entries = store_base(context.state, decode_base_entries(msg.content))
    if len(entries) < int(ins["base-from"]) + int(ins["base-count"]):
        raise UserError("base-delta history incomplete on this node")
    rt.sync_base(entries)
    strategy = rt.trainer.strategy
    down = decode_downlink(msg.content, rt.cfg, rt.trainer.dims, strategy)
    if fault is not None:
        fault(down.round, client_id)
    dp = load_privacy(rt.cfg, context.state, len(data), str(ins.get("privacy-state", "") or ""))
    rt.trainer.store = client_store(context)
    update = client_round(rt.trainer, client_id, down, data, dp)
    secure = SECAGG_INS in msg.content
    if secure and isinstance(update, str):  # inside SecAgg+ a client that sits out is a dropout
        raise UserError(update)
    upload = None if isinstance(update, str) or secure else compressed_upload(rt, client_id, down, update)
    keep_client_store(context, rt.trainer.store)
    if isinstance(update, str):  # it sits out (privacy budget)
        return Message(RecordDict({"skip": ConfigRecord({"reason": update})}), reply_to=msg)
    save_privacy(context.state, dp)
    extra = {"base-count": len(entries), "setup-s": setup_s}
    if secure:  # the summand, for Flower's secaggplus_mod to mask (fedlora.engines.flower_secagg)
        content = secure_reply(strategy, rt.trainer.dims, down, update, msg.content[SECAGG_INS], extra)
        return Message(content, reply_to=msg)
    content = encode_update(update, strategy, strategy.roles(down.round).up, extra)
    if upload is not None:  # the encoded change replaces the float32 factors and head on the wire
        content["lora"], content["head"], content[COMPRESSED] = ArrayRecord(), ArrayRecord(), upload
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: the global adapter sent for this client's rank, on the client's own data."""
    rt, client_id = _instruction(msg)
    _check_node(context, client_id)
    data = rt.client_data(context.node_config, client_id)
    rt.sync_base(store_base(context.state, decode_base_entries(msg.content)))
    down = decode_downlink(msg.content, rt.cfg, rt.trainer.dims, rt.trainer.strategy)
    rt.trainer.store = client_store(context)  # a personal part (FedSA's B) is scored too: the client's own model
    adapter = rt.trainer.load(down, client_id)
    cap = rt.cfg.data.max_eval_examples
    if cap is not None and len(data) > cap:  # the same budget as the central held-out set
        keep = np.random.default_rng([rt.cfg.seed, client_id]).choice(len(data), cap, replace=False)
        data = data.subset(np.sort(keep))
    loss, acc = evaluate(rt.host, adapter, data, rt.cfg.eval.batch_size)
    metrics = MetricRecord({"client-id": client_id, "eval-loss": loss, "eval-accuracy": acc, "num-examples": len(data)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Which client this node is: the server maps client ids to node ids with it before round 1."""
    pid, n = node_partition(context.node_config)
    reply = {PARTITION_KEY: pid} | ({} if n is None else {NUM_PARTITIONS_KEY: n})
    reply |= node_profile_fields(context.node_config)  # what this device declares it has (fedlora.flaas)
    return Message(RecordDict({"node": ConfigRecord(reply)}), reply_to=msg)


def make_client_app(fault: Fault | None = None) -> ClientApp:
    # Flower's SecAgg+ mod sees only SecAgg+ messages (privacy.secure_aggregation); the others pass by it.
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, fault)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context)

    return app
