"""What travels between the Flower ServerApp and ClientApp: fedlora downlinks and updates as Flower records.

Only what a method really sends is put on the wire: the parts its `roles(round)` name (B and A, B alone for
FFA, A alone for FedSA, the r x r core R for Fed-SB; every other part is derived from the shared seed or kept
by the client), the classifier head, and the factored deltas merged into the base weights (FLoRA, FedEx).
Byte counts are the `nbytes` of those float32 arrays, i.e. of the real payload.
"""

from __future__ import annotations

from fedlora.engines import flower_env  # noqa: F401  (before flwr: no telemetry, no update check)

import json
import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora import lora
from fedlora.client import Downlink, Update
from fedlora.config import ExperimentConfig
from fedlora.engines.flower_replies import MAX_EXAMPLES, BadReply, Fields, malformed, record
from fedlora.strategies import LoraFactors, Strategy
from fedlora.strategies.types import part_shape

WIRE_DTYPE = np.float32
BaseEntry = dict[str, tuple[np.ndarray, np.ndarray]]  # module -> (B, A) of one merged delta, ΔW = B·A


def seeded_reference(cfg: ExperimentConfig, dims: dict[str, tuple[int, int]], rank: int,
                     strategy: Strategy) -> dict[str, LoraFactors]:
    """What every client can rebuild from the seed alone, at `rank`: the method's starting adapter (the PEFT
    init: seeded A, B = 0; Fed-SB: A0 and B0), a prefix of the widest rank's. Parts never sent come from here."""
    r_max = max(cfg.client_ranks())
    init = strategy.starting_factors(lora.initial_factors(cfg.seed, dims, max(r_max, rank), cfg.lora.scale(r_max)))
    return {m: LoraFactors(A=f.A[:rank], B=f.B[:, :rank], scale=f.scale) for m, f in init.items()}


def _arr(x: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(x, dtype=WIRE_DTYPE))


def _nbytes(*records: ArrayRecord) -> int:
    """Payload bytes: values times 4 (float32), headers and names not counted (as in strategies/base.py)."""
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for r in records for a in r.values())


def _factors_record(factors: dict[str, LoraFactors], strategy: Strategy,
                    parts: tuple[str, ...]) -> tuple[ArrayRecord, ConfigRecord]:
    arrays, modules, scales = ArrayRecord(), [], []
    for m, f in factors.items():
        for part, a in strategy.to_parts(m, f, parts).items():
            arrays[f"{m}:{part}"] = _arr(a)
        modules.append(m)
        scales.append(float(f.scale))
    return arrays, ConfigRecord({"modules": modules, "scales": scales})


def _read_factors(arrays: ArrayRecord, meta: ConfigRecord, strategy: Strategy, parts: tuple[str, ...],
                  ref: dict[str, LoraFactors]) -> dict[str, LoraFactors]:
    """Factors back from a record; every part not sent comes from `ref` (what the receiver holds)."""
    out = {}
    for m, scale in zip(list(meta.get("modules", [])), list(meta.get("scales", []))):
        missing = [p for p in parts if f"{m}:{p}" not in arrays]
        if missing or m not in ref:
            raise ValueError(f"module {m}: {missing or 'its reference'} missing from the payload")
        f = strategy.from_parts(m, {p: arrays[f"{m}:{p}"].numpy() for p in parts}, ref[m])
        out[m] = LoraFactors(A=f.A, B=f.B, scale=float(scale))
    return out


def _head_record(head: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: _arr(v) for k, v in head.items()})


def _read_head(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in (record or {}).items()}


# -- downlink --------------------------------------------------------------------------------------------------
@dataclass
class DownPayload:
    content: RecordDict
    nbytes: int


def encode_downlink(
    cfg: ExperimentConfig, down: Downlink, client_id: int, strategy: Strategy,
    base_entries: list[BaseEntry], base_from: int, config_toml: str, label_names: list[str],
    privacy_state: str = "",
) -> DownPayload:
    """A train instruction for one client: its rank's factors (in the client's own scale, so both engines hand
    the trainer the same float32 values), the head, the base deltas it has not received yet, and the config.
    `privacy_state`: the client's last privacy report (JSON), for a node that may have lost its own."""
    factors = lora.with_scale(down.factors, cfg.lora.scale(down.rank)) if down.factors else {}
    arrays, meta = _factors_record(factors, strategy, strategy.roles(down.round).down)
    head = _head_record(down.head)
    base = ArrayRecord()
    for i, entry in enumerate(base_entries, start=base_from):
        for m, (B, A) in entry.items():
            base[f"{i}|{m}:B"], base[f"{i}|{m}:A"] = _arr(B), _arr(A)
    content = RecordDict({
        "lora": arrays, "lora-meta": meta, "head": head, "base": base,
        "instruction": ConfigRecord({
            "round": down.round, "rank": down.rank, "client-id": client_id,
            "base-from": base_from, "base-count": len(base_entries), "config": config_toml,
            "label-names": list(label_names), "privacy-state": privacy_state,
        }),
    })
    return DownPayload(content, _nbytes(arrays, head, base))


def decode_downlink(
    content: RecordDict, cfg: ExperimentConfig, dims: dict[str, tuple[int, int]], strategy: Strategy
) -> Downlink:
    ins = content["instruction"]
    rank, round_idx = int(ins["rank"]), int(ins["round"])
    factors = _read_factors(content["lora"], content["lora-meta"], strategy, strategy.roles(round_idx).down,
                            seeded_reference(cfg, dims, rank, strategy))
    return Downlink(rank=rank, factors=factors, head=_read_head(content.get("head")), round=round_idx)


def decode_base_entries(content: RecordDict) -> dict[int, BaseEntry]:
    """Index -> entry of the base deltas carried by a train instruction."""
    out: dict[int, BaseEntry] = {}
    arrays = content.get("base") or ArrayRecord()
    for key in arrays:
        if not key.endswith(":B"):
            continue
        idx, module = key[:-2].split("|", 1)
        out.setdefault(int(idx), {})[module] = (arrays[key].numpy(), arrays[f"{idx}|{module}:A"].numpy())
    return out


# -- uplink ----------------------------------------------------------------------------------------------------
def encode_update(update: Update, strategy: Strategy, parts: tuple[str, ...],
                  extra_metrics: dict[str, float] | None = None) -> RecordDict:
    """A client's reply: the `parts` it sends this round (`strategy.roles(round).up`), head, metrics, report."""
    arrays, meta = _factors_record(update.factors, strategy, parts)
    metrics = {
        "client-id": update.client_id, "rank": update.rank, "num-examples": update.num_examples,
        "train-loss": float(update.train_loss), "steps": update.steps, "samples": update.samples,
        "train-s": float(update.train_s), "next-rank": -1 if update.next_rank is None else int(update.next_rank),
    }
    if update.privacy.get("epsilon") is not None:
        metrics["epsilon"] = float(update.privacy["epsilon"])
    metrics.update(extra_metrics or {})
    return RecordDict({
        "lora": arrays, "lora-meta": meta, "head": _head_record(update.head),
        "metrics": MetricRecord(metrics),
        # The privacy report holds the accountant state (nested lists): JSON in a ConfigRecord.
        "privacy": ConfigRecord({"report": json.dumps(update.privacy)}),
    })


@dataclass
class UpPayload:
    update: Update
    nbytes: int
    nbytes_head: int
    metrics: dict  # the reply's metrics, each one checked (`base-count`, `setup-s` included)


FLOAT_DTYPES = {"float16", "float32", "float64"}
_NPY_HEADER = 4096  # bytes an .npy header may take beyond the values
MAX_REPORT = 1 << 20  # bytes of a privacy report (JSON)


def _expected_array(arrays, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float array under `key`, of exactly `shape`, cast to float32. Declared type, shape and byte size
    are checked before anything is parsed, so a reply cannot make the server allocate more than it expects."""
    if key not in arrays:
        raise BadReply(f"{key} missing")
    arr = arrays[key]
    if not isinstance(arr, Array) or arr.stype != "numpy.ndarray":
        raise BadReply(f"{key}: not a NumPy array record")
    if str(arr.dtype) not in FLOAT_DTYPES:
        raise BadReply(f"{key}: dtype {str(arr.dtype)[:20]} is not a float type")
    if tuple(arr.shape) != tuple(shape):
        raise BadReply(f"{key}: shape {tuple(arr.shape)[:4]} differs from the expected {tuple(shape)}")
    if not isinstance(arr.data, bytes) or len(arr.data) > int(np.prod(shape, dtype=np.int64)) * 8 + _NPY_HEADER:
        raise BadReply(f"{key}: payload larger than a float array of shape {tuple(shape)}")
    try:
        value = arr.numpy()
    except Exception as exc:  # parsing the reply's own bytes: NumPy raises several types on a corrupt stream
        raise BadReply(f"{key}: unreadable array ({type(exc).__name__})") from None
    if value.dtype.kind != "f" or value.shape != tuple(shape):
        raise BadReply(f"{key}: its data is {value.dtype} {value.shape}, not float {tuple(shape)}")
    return value.astype(np.float32, copy=False)


def decode_update(content: RecordDict, server, client_id: int) -> UpPayload:
    """The update of `client_id` from its reply, read against what the server expects of it this round: its
    modules and shapes (`server.dims` at the rank the server assigned), A only when the strategy sends A, the
    server's head keys, its scale (the server's), bounded counts. Raises BadReply (one line) on the reply's own
    defects; values (finiteness, norms) are checked by `Server.finish_round`. Any other exception is a bug of
    the server's code and propagates as one."""
    try:
        return _decode_update(content, server, client_id)
    except BadReply as exc:
        raise malformed(exc) from None


def _decode_update(content: RecordDict, server, client_id: int) -> UpPayload:
    cfg, strategy, parts = server.cfg, server.strategy, server.up_parts()
    rank = server.expected_rank(client_id)
    arrays = record(content, "lora", ArrayRecord)
    mt = Fields(record(content, "metrics", MetricRecord), "metric")
    if mt.integer("client-id", 0, cfg.federation.num_clients - 1) != client_id:
        raise BadReply(f"reply claims client {mt.values['client-id']}")
    if mt.integer("rank", 1, 1 << 20) != rank:
        raise BadReply(f"rank {mt.values['rank']} differs from the client's assigned rank {rank}")
    expected = {f"{m}:{p}" for m in server.dims for p in parts}
    extra = sorted(set(arrays) - expected)
    if extra:
        what = "its own A (A is shared and never sent)" if "A" not in parts and any(k.endswith(":A") for k in extra) \
            else f"unexpected arrays {[k[:60] for k in extra[:2]]} (this round it sends {', '.join(parts)})"
        raise BadReply(f"the reply carries {what}")
    meta = record(content, "lora-meta", ConfigRecord, default=None)
    scale = cfg.lora.scale(rank)
    if meta is not None and "scales" in meta:
        declared = Fields(meta, "lora-meta").numbers("scales", len(server.dims))
        if any(not math.isclose(x, scale, rel_tol=1e-6) for x in declared):
            raise BadReply(f"declared LoRA scale differs from the server's {scale} for rank {rank}")
    ref = server.sent_factors(client_id)  # what it was sent: every part it does not send stays that
    factors, nbytes_lora = {}, 0
    for m, (d_out, d_in) in server.dims.items():
        sent = {p: _expected_array(arrays, f"{m}:{p}", part_shape(p, rank, d_out, d_in)) for p in parts}
        nbytes_lora += sum(int(a.size) * WIRE_DTYPE().itemsize for a in sent.values())
        f = strategy.from_parts(m, sent, ref[m])
        factors[m] = LoraFactors(A=f.A, B=f.B, scale=scale)
    head_record = record(content, "head", ArrayRecord, default=ArrayRecord())
    if set(head_record) != set(server.head):
        raise BadReply(f"head keys {sorted(head_record)[:3]} differ from the server's {sorted(server.head)[:3]}")
    head = {k: _expected_array(head_record, k, h.shape) for k, h in server.head.items()}
    privacy: dict = {}
    if server.mechanism.client_reports:
        privacy = Fields(record(content, "privacy", ConfigRecord), "privacy").json("report", MAX_REPORT)
        if not isinstance(privacy, dict):
            raise BadReply("privacy report is not an object")
    next_rank = mt.integer("next-rank", -1, rank, default=-1)
    checked = {
        "client-id": client_id, "rank": rank, "num-examples": mt.integer("num-examples", 1, MAX_EXAMPLES),
        "train-loss": mt.number("train-loss"), "steps": mt.integer("steps", 0, 10**9),
        "samples": mt.integer("samples", 0, 10**12), "train-s": mt.number("train-s", 0.0),
        "next-rank": next_rank, "base-count": mt.integer("base-count", 0, 10**6, default=0),
        "setup-s": mt.number("setup-s", 0.0, default=0.0),
    }
    update = Update(
        client_id=client_id, rank=rank, factors=factors, head=head, num_examples=checked["num-examples"],
        train_loss=checked["train-loss"], steps=checked["steps"], samples=checked["samples"],
        train_s=checked["train-s"], next_rank=None if next_rank <= 0 else next_rank, privacy=privacy,
    )
    nbytes_head = sum(int(h.size) * WIRE_DTYPE().itemsize for h in head.values())
    return UpPayload(update, nbytes_lora + nbytes_head, nbytes_head, checked)
