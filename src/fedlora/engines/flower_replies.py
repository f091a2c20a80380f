"""Checked reading of what a Flower node sends back: every field of every reply kind goes through `Fields`.

A reply's own defects (a missing, mistyped or out-of-range field, text too long) raise `BadReply`, one line,
and the transport drops that client with it. Nothing here catches anything else: an exception that is not a
`BadReply` is a bug of the server's own code and must surface as one (traceback, exit 1), not as a client's
"malformed reply".

Reply kinds: a training update (`flower_wire.decode_update`, which reads its metrics here), a `skip` record (a
client that sits out, e.g. its privacy budget is spent), a federated evaluation, a node's answer to "which
client are you", and a SecAgg+ contributor's metadata (`decode_member`).
"""

from __future__ import annotations

from fedlora.engines import flower_env  # noqa: F401  (before flwr: no telemetry, no update check)

import json
import math
from dataclasses import dataclass

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedlora.errors import one_line  # noqa: F401  (re-exported)

MAX_TEXT = 500  # characters of a reason a client gives (it ends up in metrics.jsonl)
MAX_EXAMPLES = 10**9  # examples a client may claim when the server knows no tighter bound
_MISSING = object()


class BadReply(ValueError):
    """A reply the server refuses: one line naming what is wrong."""


def _short(x) -> str:
    return str(x)[:40]


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Fields:
    """Checked reads of one record's scalar fields. A field that is absent raises BadReply unless a default
    is given; a field that is present must be valid whatever the default."""

    def __init__(self, record, what: str):
        self.values, self.what = dict(record), what

    def _get(self, key: str, default):
        if key in self.values:
            return self.values[key]
        if default is _MISSING:
            raise BadReply(f"{self.what} lacks {key}")
        return default

    def integer(self, key: str, lo: int, hi: int, default=_MISSING) -> int:
        x = self._get(key, default)
        # Integers are compared as integers: math.isfinite(10**400) itself would raise OverflowError.
        ok = _is_number(x) and (isinstance(x, int) or (math.isfinite(x) and x == int(x))) and lo <= x <= hi
        if not ok:
            raise BadReply(f"{self.what} {key} = {_short(x)} is not an integer in {lo}..{hi}")
        return int(x)

    def number(self, key: str, lo: float = -math.inf, hi: float = math.inf, default=_MISSING) -> float:
        x = self._get(key, default)
        finite = _is_number(x) and (-1e308 < x < 1e308)  # also keeps float(x) of a huge integer from overflowing
        if not finite or not lo <= x <= hi:
            raise BadReply(f"{self.what} {key} = {_short(x)} is not a finite number in [{lo:g}, {hi:g}]")
        return float(x)

    def text(self, key: str, limit: int = MAX_TEXT, default=_MISSING) -> str:
        x = self._get(key, default)
        if not isinstance(x, str) or len(x) > limit:
            raise BadReply(f"{self.what} {key} is not text of at most {limit} characters")
        return x

    def numbers(self, key: str, limit: int, default=_MISSING) -> list[float]:
        x = self._get(key, default)
        if not isinstance(x, list) or len(x) > limit or any(not (_is_number(v) and -1e308 < v < 1e308) for v in x):
            raise BadReply(f"{self.what} {key} is not a list of at most {limit} finite numbers")
        return [float(v) for v in x]

    def json(self, key: str, limit: int) -> object:
        text = self.text(key, limit)
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # invalid JSON, nested too deep, an integer of 5,000 digits
            raise BadReply(f"{self.what} {key} is not valid JSON (or nested too deep)") from None


def record(content: RecordDict, key: str, kind: type, default=_MISSING):
    """The record `content[key]`, of exactly `kind` (ArrayRecord, ConfigRecord, MetricRecord)."""
    if key not in content:
        if default is _MISSING:
            raise BadReply(f"{key} missing")
        return default
    value = content[key]
    if not isinstance(value, kind):
        raise BadReply(f"{key} is not a {kind.__name__}")
    return value


def malformed(exc: BadReply) -> BadReply:
    """The same refusal, said as a malformed reply (the reason a dropped client gets in metrics.jsonl)."""
    text = " ".join(str(exc).split())[:300]
    return BadReply(text if text.startswith("malformed reply") else f"malformed reply: {text}")


# -- reply kinds other than a training update ------------------------------------------------------------------
def decode_skip(content: RecordDict) -> str:
    """Why a client sits out this round (its `skip` record's reason), as one line."""
    try:
        reason = Fields(record(content, "skip", ConfigRecord), "skip record").text("reason")
    except BadReply as exc:
        raise malformed(exc) from None
    return one_line(reason) or "sits out (no reason given)"


@dataclass(frozen=True)
class EvalReply:
    num_examples: int
    accuracy: float
    loss: float


def decode_evaluation(content: RecordDict, client_id: int, max_examples: int) -> EvalReply:
    """A federated evaluation reply of `client_id`: its example count (1..max_examples, the most the server
    lets one client weigh), an accuracy in [0, 1] and a finite loss >= 0."""
    try:
        m = Fields(record(content, "metrics", MetricRecord), "metric")
        if m.integer("client-id", 0, 1 << 62) != client_id:
            raise BadReply(f"evaluation reply claims client {m.values['client-id']}")
        return EvalReply(num_examples=m.integer("num-examples", 1, max_examples),
                         accuracy=m.number("eval-accuracy", 0.0, 1.0), loss=m.number("eval-loss", 0.0))
    except BadReply as exc:
        raise malformed(exc) from None


def decode_node_info(content: RecordDict, partition_key: str, partitions_key: str) -> tuple[int, int | None]:
    """(partition id, number of partitions or None) a node declares; ranges are the caller's to check."""
    try:
        info = Fields(record(content, "node", ConfigRecord), "node record")
        n = info.integer(partitions_key, 0, 1 << 62) if partitions_key in info.values else None
        return info.integer(partition_key, -(1 << 62), 1 << 62), n
    except BadReply as exc:
        raise malformed(exc) from None


def decode_node_profile(content: RecordDict, prefix: str, limit: int = 16) -> dict:
    """The profile keys (`prefix`*) a node declares beside its partition: numbers or short text, at most
    `limit` of them; what they mean is checked by the server's planner (fedlora.flaas.profiles)."""
    try:
        values = dict(record(content, "node", ConfigRecord))
    except BadReply as exc:
        raise malformed(exc) from None
    out = {k: v for k, v in values.items() if isinstance(k, str) and k.startswith(prefix)}
    if len(out) > limit:
        raise malformed(BadReply(f"node profile has {len(out)} keys, more than {limit}"))
    for k, v in out.items():
        if not ((_is_number(v) and -1e308 < v < 1e308) or (isinstance(v, str) and len(v) <= 64)):
            raise malformed(BadReply(f"node profile {_short(k)} is not a finite number or short text"))
    return out


@dataclass(frozen=True)
class Member:
    """A SecAgg+ contributor's metadata (its arrays are only in the sum)."""

    client_id: int
    rank: int
    num_examples: int  # the weight the sum was taken with: the claim bounded as Flower's mod bounds it
    train_loss: float
    steps: int
    samples: int
    train_s: float
    privacy: dict
    base_count: int
    setup_s: float
    clipped: int


def decode_member(metrics, num_examples, client_id: int, rank: int, reports: bool, max_weight: float,
                  report_limit: int = 1 << 20) -> Member:
    """The metadata of a SecAgg+ contribution (`FitRes.metrics` and `FitRes.num_examples`, as
    `flower_secagg.secure_reply` writes them), every field checked like a training update's."""
    try:
        m = Fields(metrics, "metric")
        if m.integer("client-id", 0, 1 << 62) != client_id:
            raise BadReply(f"reply claims client {m.values['client-id']}")
        if m.integer("rank", 1, 1 << 20) != rank:
            raise BadReply(f"rank {m.values['rank']} differs from the client's assigned rank {rank}")
        weight = Fields({"num-examples": num_examples}, "fit result").integer("num-examples", 1, MAX_EXAMPLES)
        privacy = m.json("privacy", report_limit) if reports else {}
        if reports and not isinstance(privacy, dict):
            raise BadReply("privacy report is not an object")
        return Member(client_id=client_id, rank=rank, num_examples=int(min(weight, max_weight)),
                      train_loss=m.number("train-loss"), steps=m.integer("steps", 0, 10**9),
                      samples=m.integer("samples", 0, 10**12), train_s=m.number("train-s", 0.0),
                      privacy=privacy, base_count=m.integer("base-count", 0, 10**6, default=0),
                      setup_s=m.number("setup-s", 0.0, default=0.0),
                      clipped=m.integer("secagg-clipped", 0, 1 << 62, default=0))
    except BadReply as exc:
        raise malformed(exc) from None
