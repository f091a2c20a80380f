"""What travels between the Flower ServerApp and ClientApp: fedlora downlinks and updates as Flower records.

Only what a method really sends is put on the wire: B always, A only when the strategy sends A (FFA derives
A from the shared seed on both ends), the classifier head, and the factored deltas merged into the base
weights (FLoRA, FedEx). Byte counts are the `nbytes` of those float32 arrays, i.e. of the real payload.
"""

from __future__ import annotations

from fedlora.engines import flower_env  # noqa: F401  (before flwr: no telemetry, no update check)

import json
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora import lora
from fedlora.client import Downlink, Update
from fedlora.config import ExperimentConfig
from fedlora.strategies import LoraFactors

WIRE_DTYPE = np.float32
BaseEntry = dict[str, tuple[np.ndarray, np.ndarray]]  # module -> (B, A) of one merged delta, ΔW = B·A


def shared_A(cfg: ExperimentConfig, dims: dict[str, tuple[int, int]], rank: int) -> dict[str, np.ndarray]:
    """The seeded A every FFA client holds (prefix of the widest rank's init): never sent, rebuilt here."""
    r_max = max(cfg.client_ranks())
    init = lora.initial_factors(cfg.seed, dims, max(r_max, rank), cfg.lora.scale(r_max))
    return {m: f.A[:rank] for m, f in init.items()}


def _arr(x: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(x, dtype=WIRE_DTYPE))


def _nbytes(*records: ArrayRecord) -> int:
    """Payload bytes: values times 4 (float32), headers and names not counted (as in strategies/base.py)."""
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for r in records for a in r.values())


def _factors_record(factors: dict[str, LoraFactors], with_A: bool) -> tuple[ArrayRecord, ConfigRecord]:
    arrays, modules, scales = ArrayRecord(), [], []
    for m, f in factors.items():
        arrays[f"{m}:B"] = _arr(f.B)
        if with_A:
            arrays[f"{m}:A"] = _arr(f.A)
        modules.append(m)
        scales.append(float(f.scale))
    return arrays, ConfigRecord({"modules": modules, "scales": scales})


def _read_factors(
    arrays: ArrayRecord, meta: ConfigRecord, A_of: dict[str, np.ndarray] | None
) -> dict[str, LoraFactors]:
    """Factors back from a record; A from `A_of` (the seed) when the sender did not send it."""
    out = {}
    for m, scale in zip(list(meta.get("modules", [])), list(meta.get("scales", []))):
        if f"{m}:B" not in arrays:
            raise ValueError(f"module {m}: B missing from the payload")
        B = arrays[f"{m}:B"].numpy()
        if f"{m}:A" in arrays:
            A = arrays[f"{m}:A"].numpy()
        elif A_of is not None and m in A_of:
            A = A_of[m]
        else:
            raise ValueError(f"module {m}: A missing from the payload")
        out[m] = LoraFactors(A=A, B=B, scale=float(scale))
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
    cfg: ExperimentConfig, down: Downlink, client_id: int, sends_A: bool,
    base_entries: list[BaseEntry], base_from: int, config_toml: str, label_names: list[str],
) -> DownPayload:
    """A train instruction for one client: its rank's factors (in the client's own scale, so both engines hand
    the trainer the same float32 values), the head, the base deltas it has not received yet, and the config."""
    factors = lora.with_scale(down.factors, cfg.lora.scale(down.rank)) if down.factors else {}
    arrays, meta = _factors_record(factors, with_A=sends_A)
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
            "label-names": list(label_names),
        }),
    })
    return DownPayload(content, _nbytes(arrays, head, base))


def decode_downlink(
    content: RecordDict, cfg: ExperimentConfig, dims: dict[str, tuple[int, int]], sends_A: bool
) -> Downlink:
    ins = content["instruction"]
    rank = int(ins["rank"])
    factors = _read_factors(content["lora"], content["lora-meta"], None if sends_A else shared_A(cfg, dims, rank))
    return Downlink(rank=rank, factors=factors, head=_read_head(content.get("head")), round=int(ins["round"]))


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
def encode_update(update: Update, sends_A: bool, extra_metrics: dict[str, float] | None = None) -> RecordDict:
    arrays, meta = _factors_record(update.factors, with_A=sends_A)
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
    metrics: dict


def decode_update(
    content: RecordDict, cfg: ExperimentConfig, dims: dict[str, tuple[int, int]], sends_A: bool
) -> UpPayload:
    """Update from a reply. Raises ValueError (one line) on a malformed payload; value checks are the Server's."""
    try:
        mt = dict(content["metrics"])
        rank = int(mt["rank"])
        factors = _read_factors(content["lora"], content["lora-meta"], None if sends_A else shared_A(cfg, dims, rank))
        head = _read_head(content.get("head"))
        privacy = json.loads(str(content["privacy"]["report"])) if "privacy" in content else {}
        update = Update(
            client_id=int(mt["client-id"]), rank=rank, factors=factors, head=head,
            num_examples=int(mt["num-examples"]), train_loss=float(mt["train-loss"]), steps=int(mt["steps"]),
            samples=int(mt["samples"]), train_s=float(mt["train-s"]),
            next_rank=None if int(mt["next-rank"]) < 0 else int(mt["next-rank"]), privacy=privacy,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed reply: {type(exc).__name__}: {exc}") from None
    head_bytes = _nbytes(content["head"]) if "head" in content else 0
    return UpPayload(update, _nbytes(content["lora"]) + head_bytes, head_bytes, mt)
