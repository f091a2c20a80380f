"""Every Flower reply kind goes through one checked decoder (issue 26, items 3 and 5): crafted skip records,
evaluation replies and node answers drop that client with a reason through the real `FlowerTransport`, never
end the run; and a bug in the server's own code is raised as itself, never blamed on a client.

A Grid double answers each message with a crafted reply; the server is a real `Server` over toy modules (no
model is loaded)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedlora.client import Update
from fedlora.config import load_config
from fedlora.engines.flower_client import COMPRESSED
from fedlora.engines.flower_replies import (
    MAX_EXAMPLES,
    BadReply,
    Fields,
    decode_evaluation,
    decode_member,
    decode_skip,
)
from fedlora.engines.flower_server import FlowerOptions, FlowerTransport, eval_example_bound, map_nodes
from fedlora.engines.flower_wire import encode_update
from fedlora.federated_run import build_strategy
from fedlora.progress import RunProgress
from fedlora.server import Server
from fedlora.strategies import LoraFactors

DIMS = {"enc.0.query": (6, 5), "enc.0.value": (7, 5)}
HEAD = {"classifier.weight": np.zeros((2, 5), np.float32), "classifier.bias": np.zeros(2, np.float32)}
NODE = 100  # node id of client c is NODE + c

pytestmark = pytest.mark.usefixtures("server_task_identity")


class ScriptedGrid(Grid):
    """Answers each message with `answer(client, message) -> RecordDict | None` (None: no reply)."""

    def __init__(self, answer, clients: int):
        self.answer, self.clients = answer, clients

    def get_node_ids(self):
        return [NODE + c for c in range(self.clients)]

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            content = self.answer(msg.metadata.dst_node_id - NODE, msg)
            if content is not None:
                out.append(Message(content, reply_to=msg))
        return out

    # the rest of Grid's interface is not used by the transport
    def set_run(self, run):  # pragma: no cover
        pass

    @property
    def run(self):  # pragma: no cover
        return None

    def create_message(self, *a, **k):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError


def make_run(*overrides: str, clients: int = 4):
    cfg = load_config(None, [f"federation.num_clients={clients}", "strategy.name=fedit", *overrides])
    server = Server(cfg, build_strategy(cfg, DIMS), DIMS, {k: v.copy() for k, v in HEAD.items()}, [10] * clients)
    return SimpleNamespace(cfg=cfg, server=server, strategy=server.strategy, progress=RunProgress(enabled=False),
                           data=SimpleNamespace(label_names=["neg", "pos"]))


def transport(run, answer) -> FlowerTransport:
    options = FlowerOptions(round_timeout_s=1.0, federated_eval=True)
    t = FlowerTransport(ScriptedGrid(answer, run.cfg.federation.num_clients), options)
    t.config_toml = run.cfg.to_toml()
    t.nodes = {c: NODE + c for c in range(run.cfg.federation.num_clients)}
    return t


def honest_reply(run, c: int) -> RecordDict:
    down = run.server.downlink(c)
    rng = np.random.default_rng(c)
    factors = {m: LoraFactors(A=f.A.astype(np.float32), B=(f.B + 0.01 * rng.normal(size=f.B.shape)).astype(np.float32),
                              scale=f.scale) for m, f in down.factors.items()}
    up = Update(c, down.rank, factors, dict(down.head), num_examples=10, train_loss=0.5, steps=2, samples=20,
                train_s=0.1)
    return encode_update(up, run.strategy, run.server.up_parts(), {"base-count": 0, "setup-s": 0.5})


def eval_reply(c: int, n=20, acc=0.5, loss=0.7) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"client-id": c, "eval-loss": loss, "eval-accuracy": acc,
                                                "num-examples": n})})


# -- training replies: skip records ---------------------------------------------------------------------------
@pytest.mark.parametrize("skip,fragment", [
    (ConfigRecord({}), "skip record lacks reason"),
    (ConfigRecord({"reason": 3}), "not text"),
    (ConfigRecord({"reason": ["a"]}), "not text"),
    (ConfigRecord({"reason": "x" * 10_000}), "not text of at most"),
    (MetricRecord({"reason": 1}), "skip is not a ConfigRecord"),
])
def test_a_malformed_skip_record_drops_that_client_with_a_reason(skip, fragment):
    run = make_run()

    def answer(c, msg):
        return RecordDict({"skip": skip}) if c == 3 else honest_reply(run, c)

    replies = transport(run, answer).train(run, [0, 1, 2, 3])
    assert sorted(u.client_id for u in replies.updates) == [0, 1, 2]
    assert fragment in replies.dropped[3] and replies.dropped[3].startswith("malformed reply")


def test_an_honest_skip_keeps_its_reason_on_one_line():
    run = make_run()
    answer = lambda c, msg: RecordDict({"skip": ConfigRecord({"reason": "budget\nspent"})}) if c == 1 \
        else honest_reply(run, c)
    replies = transport(run, answer).train(run, [0, 1])
    assert replies.dropped == {1: "spent"} and [u.client_id for u in replies.updates] == [0]


def test_optional_metrics_are_checked_and_bounded():
    run = make_run()

    def answer(c, msg):
        content = honest_reply(run, c)
        if c == 1:
            content["metrics"]["setup-s"] = math.nan
        if c == 2:
            content["metrics"]["base-count"] = 10**6  # a lie about held deltas: only costs it a resend
        return content

    t = transport(run, answer)
    replies = t.train(run, [0, 1, 2])
    assert "setup-s" in replies.dropped[1] and sorted(u.client_id for u in replies.updates) == [0, 2]
    assert t.acked[NODE + 2] == 0 and replies.extra["client_setup_s"] == 1.0


# -- server bugs are not client faults ---------------------------------------------------------------------------
@pytest.mark.parametrize("error", [KeyError, TypeError, ZeroDivisionError])
def test_a_bug_in_the_servers_decoding_code_propagates(monkeypatch, error):
    run = make_run()

    def broken(*args, **kwargs):
        raise error("server bug")

    monkeypatch.setattr(run.strategy, "from_parts", broken)
    with pytest.raises(error, match="server bug"):
        transport(run, lambda c, msg: honest_reply(run, c)).train(run, [0, 1])


def test_a_bug_behind_the_codec_propagates_and_the_codecs_refusal_drops(monkeypatch):
    from fedlora import compression

    run = make_run()
    answer = lambda c, msg: RecordDict({**dict(honest_reply(run, c)), COMPRESSED: ArrayRecord()})
    monkeypatch.setattr(compression, "decompress_update", lambda *a: (_ for _ in ()).throw(ValueError("bad codes")))
    replies = transport(run, answer).train(run, [0, 1])
    assert replies.updates == [] and all("bad codes" in r for r in replies.dropped.values())
    monkeypatch.setattr(compression, "decompress_update", lambda *a: (_ for _ in ()).throw(AttributeError("bug")))
    with pytest.raises(AttributeError, match="bug"):
        transport(run, answer).train(run, [0, 1])


# -- federated evaluation replies -----------------------------------------------------------------------------
@pytest.mark.parametrize("content,fragment", [
    (RecordDict({}), "metrics missing"),
    (RecordDict({"metrics": ConfigRecord({"x": 1})}), "not a MetricRecord"),
    (eval_reply(3, n=math.inf), "num-examples"),
    (eval_reply(3, n=1e30), "num-examples"),
    (eval_reply(3, n=10**12), "num-examples"),
    (eval_reply(3, n=0), "num-examples"),
    (eval_reply(3, n=2.5), "num-examples"),
    (eval_reply(3, acc=1e30), "eval-accuracy"),
    (eval_reply(3, acc=math.nan), "eval-accuracy"),
    (eval_reply(3, acc=-0.1), "eval-accuracy"),
    (eval_reply(3, loss=math.inf), "eval-loss"),
    (eval_reply(2), "claims client 2"),
    (RecordDict({"metrics": MetricRecord({"client-id": 3, "eval-accuracy": 0.9, "eval-loss": 0.1})}), "num-examples"),
])
def test_a_malformed_evaluation_reply_drops_that_client_with_a_reason(content, fragment):
    run = make_run("data.max_eval_examples=100")
    answers = {0: eval_reply(0, n=20, acc=0.5), 1: eval_reply(1, n=60, acc=0.9), 2: None, 3: content}
    metrics = transport(run, lambda c, msg: answers[c]).round_metrics(run)
    assert metrics["client_eval_accuracy"] == pytest.approx((20 * 0.5 + 60 * 0.9) / 80)
    dropped = metrics["client_eval_dropped"]
    assert set(dropped) == {"2", "3"} and dropped["2"] == "no reply within 1s"
    assert fragment in dropped["3"] and "\n" not in dropped["3"]


def test_evaluation_counts_are_bounded_by_the_evaluation_cap():
    run = make_run("data.max_eval_examples=50")
    metrics = transport(run, lambda c, msg: eval_reply(c, n=51 if c == 0 else 50)).round_metrics(run)
    assert set(metrics["client_eval_dropped"]) == {"0"} and metrics["client_eval_accuracy"] == 0.5
    # Without a cap, the bound is the one a training reply's count has.
    uncapped = make_run()
    assert eval_example_bound(uncapped.cfg) == MAX_EXAMPLES
    assert decode_evaluation(eval_reply(0, n=MAX_EXAMPLES), 0, MAX_EXAMPLES).num_examples == MAX_EXAMPLES


# -- node answers -----------------------------------------------------------------------------------------------
def test_a_malformed_node_answer_leaves_that_node_unmapped():
    run = make_run(clients=3)
    answers = {0: RecordDict({"node": ConfigRecord({"partition-id": 0, "num-partitions": 3})}),
               1: RecordDict({"node": ConfigRecord({"num-partitions": 3})}),  # no partition id
               2: RecordDict({"node": ConfigRecord({"partition-id": "two"})})}
    grid = ScriptedGrid(lambda c, msg: answers[c], 3)
    cfg = load_config(None, ["federation.num_clients=3", "federation.min_clients=1"])
    assert map_nodes(grid, cfg, FlowerOptions(node_wait_s=0.0), {}, run.progress) == {0: NODE}


# -- SecAgg+ contributor metadata (for flower_secagg) ------------------------------------------------------------
def test_secagg_member_metadata_is_checked():
    good = {"client-id": 2, "rank": 4, "train-loss": 0.3, "steps": 3, "samples": 30, "train-s": 0.2,
            "privacy": '{"epsilon": 1.0}', "base-count": 1, "setup-s": 0.0, "secagg-clipped": 0}
    m = decode_member(good, 10**9, 2, 4, True, max_weight=64.0)
    assert (m.num_examples, m.privacy, m.base_count) == (64, {"epsilon": 1.0}, 1)
    for key, value in (("client-id", 1), ("rank", 2), ("train-loss", math.nan), ("steps", -1), ("privacy", "[1]"),
                       ("privacy", "{"), ("train-s", math.inf)):
        with pytest.raises(BadReply, match="malformed reply"):
            decode_member({**good, key: value}, 10, 2, 4, True, max_weight=64.0)
    with pytest.raises(BadReply, match="num-examples"):
        decode_member(good, math.inf, 2, 4, True, max_weight=64.0)


# -- properties -------------------------------------------------------------------------------------------------
values = st.one_of(st.sampled_from([0, 1, -1, 20, 10**9, 10**20, 0.5, 1.0, 1e30, -1e30, math.inf, -math.inf,
                                    math.nan, 2.5]),
                   st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30),
                   st.lists(st.integers(-3, 3), max_size=2), st.lists(st.floats(), max_size=2),
                   st.just([10**400]))
eval_keys = st.sampled_from(["client-id", "num-examples", "eval-accuracy", "eval-loss", "extra"])


@st.composite
def eval_contents(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([RecordDict({}), RecordDict({"metrics": ConfigRecord({"eval-accuracy": "x"})}),
                                     RecordDict({"metrics": ArrayRecord()})]))
    metrics = {"client-id": 3, "eval-loss": 0.4, "eval-accuracy": 0.25, "num-examples": 30}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(eval_keys)
        if draw(st.booleans()):
            metrics.pop(key, None)
        else:
            metrics[key] = draw(values)
    try:
        return RecordDict({"metrics": MetricRecord(metrics)})
    except (TypeError, ValueError):  # Flower itself refuses to build it: no client can send it
        return RecordDict({"metrics": MetricRecord({"client-id": 3})})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=eval_contents())
def test_any_evaluation_reply_is_counted_within_bounds_or_dropped_with_a_reason(content):
    run = make_run("data.max_eval_examples=100")
    answers = {0: eval_reply(0, n=20, acc=0.5), 1: eval_reply(1, n=60, acc=0.9), 2: eval_reply(2, n=20, acc=0.1),
               3: content}
    metrics = transport(run, lambda c, msg: answers[c]).round_metrics(run)
    dropped = metrics.get("client_eval_dropped", {})
    acc = metrics["client_eval_accuracy"]
    event("dropped" if "3" in dropped else "counted")
    if "3" in dropped:
        assert set(dropped) == {"3"} and "\n" not in dropped["3"] and dropped["3"].startswith("malformed reply")
        assert acc == pytest.approx((20 * 0.5 + 60 * 0.9 + 20 * 0.1) / 100)
    else:  # counted: a count the cap allows and an accuracy in [0, 1], so the mean stays one
        ev = decode_evaluation(content, 3, 100)
        assert 1 <= ev.num_examples <= 100 and 0 <= ev.accuracy <= 1 and math.isfinite(ev.loss)
        assert acc == pytest.approx((20 * 0.5 + 60 * 0.9 + 20 * 0.1 + ev.num_examples * ev.accuracy)
                                    / (100 + ev.num_examples))


@settings(max_examples=100, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(["reason", "x"]),
                              st.one_of(st.text(max_size=600), st.integers(), st.floats(), st.booleans(),
                                        st.binary(max_size=5), st.lists(st.text(max_size=3), max_size=2)),
                              max_size=2))
def test_any_skip_record_gives_a_one_line_reason(fields):
    try:
        content = RecordDict({"skip": ConfigRecord(fields)})
    except (TypeError, ValueError):
        return
    try:
        reason = decode_skip(content)
    except BadReply as exc:
        assert str(exc).startswith("malformed reply") and "\n" not in str(exc)
        return
    assert isinstance(fields.get("reason"), str) and "\n" not in reason and reason


@settings(max_examples=200, deadline=None)
@given(x=values, lo=st.sampled_from([0, 1, -5]), hi=st.sampled_from([1, 100, 10**9]))
def test_fields_return_a_checked_value_or_refuse(x, lo, hi):
    f = Fields({"k": x}, "metric")
    for read in (lambda: f.integer("k", lo, hi), lambda: f.number("k", lo, hi)):
        try:
            v = read()
        except BadReply as exc:
            assert "\n" not in str(exc)
            continue
        assert lo <= v <= hi and math.isfinite(v)
    try:
        got = f.numbers("k", 2)
    except BadReply:
        return
    assert all(math.isfinite(v) for v in got)
