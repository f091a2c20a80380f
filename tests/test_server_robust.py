"""The server survives anything a client sends: the Flower reply path decode -> check -> aggregate, fuzzed.

A real `Server` over small random modules (no model): honest clients send encoded updates; one client's reply
is replaced by a crafted record (strings, complex, bool or integer arrays, lying shapes and byte sizes, extra or
missing keys, its own A under FFA, another scale, 1e30 values, NaN counts, nested privacy reports, ...).
Invariants: nothing but BadReply escapes the decoder, nothing escapes the round, each call is fast, and the next
global model is finite and within the update bound.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.client import Update
from fedlora.config import RoundFailed, load_config
from fedlora.engines.flower_wire import BadReply, decode_update, encode_update
from fedlora.federated_run import build_strategy
from fedlora.round.bounds import change_norm
from fedlora.server import Server
from fedlora.strategies import LoraFactors

DIMS = {"enc.0.query": (6, 5), "enc.0.value": (7, 5)}
HEAD = {"classifier.weight": np.zeros((2, 5), np.float32), "classifier.bias": np.zeros(2, np.float32)}
BOUND = 50.0


def make_server(method: str, *extra: str) -> Server:
    cfg = load_config(None, ["federation.num_clients=4", f"strategy.name={method}",
                             f"federation.max_update_norm={BOUND}", *[x for x in extra if x != "no-relative-bound"]])
    if "no-relative-bound" in extra:  # only the absolute bound stands between a client and the model
        cfg.federation.norm_bound_factor = None
    return Server(cfg, build_strategy(cfg, DIMS), DIMS, {k: v.copy() for k, v in HEAD.items()}, [10] * 4)


def honest_report(server: Server, client: int) -> dict:
    """What an honest DP-SGD client reports after its first round: its accountant charged for the steps asked."""
    from fedlora.dp import SamplePrivacy

    state = SamplePrivacy.for_client(server.cfg, server.client_sizes[client])
    state.accountant.step(state.noise_multiplier, state.sample_rate, server.cfg.local_steps())
    return state.report()


def honest_update(server: Server, client: int, rng: np.random.Generator, size: float = 0.1) -> Update:
    down = server.downlink(client)
    factors = {}
    for m, f in down.factors.items():
        A = f.A if not server.strategy.trains_A else f.A + size * rng.normal(size=f.A.shape)
        factors[m] = LoraFactors(A=np.asarray(A, np.float32), B=(f.B + size * rng.normal(size=f.B.shape)).astype(np.float32),
                                 scale=server.cfg.lora.scale(down.rank))
    head = {k: (v + size * rng.normal(size=v.shape)).astype(np.float32) for k, v in down.head.items()}
    return Update(client, down.rank, factors, head, num_examples=10, train_loss=0.5, steps=2, samples=20, train_s=0.1)


# -- crafted replies --------------------------------------------------------------------------------------------
def raw_array(dtype: str, shape: tuple, data: bytes) -> Array:
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


arrays = st.one_of(
    st.builds(lambda a: Array(np.asarray(a)), st.sampled_from([
        np.array(["a", "b"]), np.array([1 + 2j, 3j]), np.array([True, False]), np.arange(6, dtype=np.int64),
        np.full((6, 2), 1e30, np.float32), np.full((6, 2), np.nan, np.float32), np.zeros((7, 2), np.float64),
        np.zeros((6, 2), np.float16), np.zeros((2, 5), np.float32), np.zeros((1_000, 1_000), np.float32)[:1],
    ])),
    st.builds(raw_array, st.sampled_from(["float32", "<U3", "object", "complex64", "float64"]),
              st.sampled_from([(6, 2), (10**9, 10**9), (0,), (6, 2, 1), (-1, 2)]),
              st.sampled_from([b"", b"\x93NUMPY", b"x" * 100, b"\x93NUMPY\x01\x00" + b" " * 300])),
)
numbers = st.one_of(st.sampled_from([0, -1, 1, 2, 4, 10**12, 1e9, math.inf, -math.inf, math.nan, 1e30, -5.5]),
                    st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
                    st.lists(st.integers(-3, 3), max_size=3))
metric_keys = st.sampled_from(["client-id", "rank", "num-examples", "train-loss", "steps", "samples", "train-s",
                               "next-rank", "base-count", "setup-s", "epsilon", "extra"])
reports = st.one_of(
    st.just("[" * 100_000 + "]" * 100_000),
    st.just('{"epsilon": 1}'), st.just("not json"), st.just("x" * (2 << 20)),
    st.builds(json.dumps, st.recursive(st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=5)),
                                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                                       max_leaves=20)),
    st.builds(lambda e, h: json.dumps({"epsilon": e, "noise_multiplier": 1.0, "sample_rate": 0.5, "dp_steps": 2,
                                       "accountant": {"kind": "rdp", "history": h}}),
              st.sampled_from([1.0, -1.0, 1e308]),
              st.sampled_from([[[1.0, 0.5, 2]], [[1.0, 0.5]], [["a", "b", "c"]], [[1.0, 0.5, 1e300]], "x"])),
)


@st.composite
def mutations(draw):
    """A list of edits applied to an honest reply."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["array", "drop-array", "extra-array", "own-A", "metric", "drop-metric",
                                     "scale", "report", "head-key", "drop-record", "wrong-record"]))
        if kind in ("array", "drop-array"):
            edits.append((kind, draw(st.sampled_from(["enc.0.query:B", "enc.0.value:B", "enc.0.query:A"])),
                          draw(arrays)))
        elif kind == "extra-array":
            edits.append((kind, draw(st.text(min_size=1, max_size=8)), draw(arrays)))
        elif kind == "metric":
            edits.append((kind, draw(metric_keys), draw(numbers)))
        elif kind == "drop-metric":
            edits.append((kind, draw(metric_keys), None))
        elif kind == "scale":
            edits.append((kind, None, draw(st.lists(numbers.filter(lambda x: not isinstance(x, list)), max_size=3))))
        elif kind == "report":
            edits.append((kind, None, draw(reports)))
        elif kind == "head-key":
            edits.append((kind, draw(st.sampled_from(["classifier.weight", "classifier.bias", "extra.weight"])),
                          draw(arrays)))
        else:
            edits.append((kind, draw(st.sampled_from(["lora", "metrics", "head", "privacy", "lora-meta"])), None))
    return edits


def apply(content: RecordDict, edits) -> RecordDict:
    for kind, key, value in edits:
        try:
            if kind == "array":
                content["lora"][key] = value
            elif kind == "drop-array" and key in content["lora"]:
                del content["lora"][key]
            elif kind == "extra-array":
                content["lora"][key] = value
            elif kind == "own-A":
                content["lora"]["enc.0.query:A"] = Array(np.zeros((2, 5), np.float32))
            elif kind == "metric":
                content["metrics"][key] = value
            elif kind == "drop-metric" and key in content["metrics"]:
                del content["metrics"][key]
            elif kind == "scale":
                content["lora-meta"]["scales"] = [float(x) for x in value]
            elif kind == "report":
                content["privacy"] = ConfigRecord({"report": value})
            elif kind == "head-key":
                content["head"][key] = value
            elif kind == "drop-record" and key in content:
                del content[key]
            elif kind == "wrong-record":
                content[key] = ConfigRecord({"x": 1}) if key != "privacy" else MetricRecord({"report": 1})
        except (TypeError, ValueError, KeyError, OverflowError):
            pass  # Flower itself refuses to build that record: no client can send it
    return content


def run_round(server: Server, crafted: RecordDict, rng: np.random.Generator):
    """Clients 0-2 are honest, client 3's reply is crafted; returns the outcome of the round."""
    updates = []
    for c in range(3):
        up = honest_update(server, c, rng)
        if server.cfg.privacy.mode == "sample":
            up.privacy = honest_report(server, c)
        updates.append(decode_update(encode_update(up, server.strategy, server.up_parts()), server, c).update)
    start = time.perf_counter()
    try:
        updates.append(decode_update(crafted, server, 3).update)
    except BadReply as exc:
        assert "\n" not in str(exc)
    outcome = server.finish_round(updates, [0, 1, 2, 3])
    assert time.perf_counter() - start < 5.0
    return outcome


def global_change(server: Server, before: dict) -> float:
    _, now = server.global_eval_factors()
    total = sum(float(np.sum((now[m].B.astype(np.float64) - before[m].B) ** 2)) for m in now)
    if server.strategy.sends_A:
        total += sum(float(np.sum((now[m].A.astype(np.float64) - before[m].A) ** 2)) for m in now)
    return math.sqrt(total)


@pytest.mark.parametrize("method,extra", [("ffa", ()), ("fedit", ("no-relative-bound",)),
                                          ("rbla", ("federation.ranks=[2, 4]", "no-relative-bound")),
                                          ("ffa", ("privacy.mode=sample", "privacy.epsilon=3"))])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(edits=mutations(), seed=st.integers(0, 2**16))
def test_a_crafted_reply_never_escapes_the_round_nor_moves_the_model_past_the_bound(method, extra, edits, seed):
    server = make_server(method, *extra)
    rng = np.random.default_rng(seed)
    honest = honest_update(server, 3, rng, size=float(rng.choice([0.1, 1e30 ** 0.5, 1e3])))
    if server.cfg.privacy.mode == "sample":
        honest.privacy = honest_report(server, 3)
    crafted = apply(encode_update(honest, server.strategy, server.up_parts()), edits)
    _, before = server.global_eval_factors()
    before = {m: LoraFactors(A=f.A.astype(np.float64), B=f.B.astype(np.float64), scale=f.scale) for m, f in before.items()}
    outcome = run_round(server, crafted, rng)
    assert set(outcome.trained) >= {0, 1, 2}
    _, now = server.global_eval_factors()
    assert all(np.isfinite(f.B).all() and np.isfinite(f.A).all() for f in now.values())
    assert all(np.isfinite(h).all() for h in server.head.values())
    assert global_change(server, before) <= BOUND * (1 + 1e-6)


def test_each_named_attack_is_refused_with_a_reason():
    """The attacks listed in the issue, one by one, through decode and check."""
    rng = np.random.default_rng(0)
    ffa = make_server("ffa")
    fedit = make_server("fedit")

    def reply(server, **metric):
        content = encode_update(honest_update(server, 3, rng), server.strategy, server.up_parts())
        for k, v in metric.items():
            content["metrics"][k] = v
        return content

    def refused(server, content, fragment):
        with pytest.raises(BadReply, match=fragment):
            decode_update(content, server, 3)

    c = reply(ffa)
    c["lora"]["enc.0.query:B"] = Array(np.array([["a", "b"]] * 6))
    refused(ffa, c, "not a float type")
    c = reply(ffa)
    c["lora"]["enc.0.query:B"] = Array(np.zeros((6, 4), np.complex64))
    refused(ffa, c, "not a float type")
    c = reply(ffa)
    c["lora"]["enc.0.query:B"] = Array(np.zeros((6, 4), bool))
    refused(ffa, c, "not a float type")
    c = reply(ffa)
    c["head"]["classifier.extra"] = Array(np.zeros(2, np.float32))
    refused(ffa, c, "head keys")
    for rank in (math.inf, 1e12, 1e9):
        refused(ffa, reply(ffa, **{"next-rank": rank}), "next-rank")
    for n in (-1, math.nan, 0, 1e12):
        refused(ffa, reply(ffa, **{"num-examples": n}), "num-examples")
    c = reply(ffa)
    c["lora"]["enc.0.query:A"] = Array(np.zeros((8, 5), np.float32))
    refused(ffa, c, "its own A")
    c = reply(fedit)
    c["lora-meta"]["scales"] = [123.0, 123.0]
    refused(fedit, c, "scale differs")
    c = reply(ffa)
    c["lora"]["enc.0.query:B"] = raw_array("float32", (6, 8), b"\x93NUMPY" + b"0" * 10_000_000)
    refused(ffa, c, "payload larger")
    sample = make_server("ffa", "privacy.mode=sample", "privacy.epsilon=3")
    c = reply(sample)
    c["privacy"] = ConfigRecord({"report": "[" * 200_000 + "]" * 200_000})
    refused(sample, c, "nested too deep|not valid JSON")
    # Finite but huge values pass decoding and are stopped by the update bound, with their reason.
    c = reply(ffa)
    c["lora"]["enc.0.query:B"] = Array(np.full((6, 8), 1e30, np.float32))
    up = decode_update(c, ffa, 3).update
    honest = [honest_update(ffa, k, rng) for k in range(3)]
    outcome = ffa.finish_round(honest + [up], [0, 1, 2, 3])
    assert outcome.trained == [0, 1, 2] and "above the bound" in outcome.rejected[3]


def test_a_strategy_refusing_one_client_rejects_that_client_not_the_round():
    from fedlora.strategies.fedit import FedIT

    class Picky(FedIT):
        """Refuses any update whose first B entry is exactly 7 (a stand-in for a method's own check)."""

        def aggregate(self, updates, weights):
            for k, u in enumerate(updates):
                if any(f.B[0, 0] == 7.0 for f in u.values()):
                    raise ValueError(f"client {k}: B starts with 7")
            return super().aggregate(updates, weights)

    cfg = load_config(None, ["federation.num_clients=4", "strategy.name=fedit"])
    server = Server(cfg, Picky(scale_for_rank=cfg.lora.scale), DIMS, {k: v.copy() for k, v in HEAD.items()}, [10] * 4)
    rng = np.random.default_rng(1)
    ups = [honest_update(server, c, rng) for c in range(3)]
    for f in ups[2].factors.values():
        f.B[0, 0] = 7.0
    outcome = server.finish_round(ups, [0, 1, 2])
    assert outcome.trained == [0, 1] and "refused by" in outcome.rejected[2] and "starts with 7" in outcome.rejected[2]


def test_the_server_reads_only_the_parts_a_client_sends():
    """An FFA client's own A (never sent on the wire) is replaced by the server's: the aggregate is unchanged."""
    rng = np.random.default_rng(2)
    results = []
    for tamper in (False, True):
        server = make_server("ffa")
        ups = [honest_update(server, c, np.random.default_rng(c)) for c in range(3)]
        if tamper:
            ups[2].factors = {m: LoraFactors(A=f.A + rng.normal(size=f.A.shape).astype(np.float32), B=f.B,
                                             scale=f.scale) for m, f in ups[2].factors.items()}
        outcome = server.finish_round(ups, [0, 1, 2])
        assert outcome.trained == [0, 1, 2]
        results.append(server.global_eval_factors()[1])
    for m in results[0]:
        assert np.array_equal(results[0][m].A, results[1][m].A) and np.array_equal(results[0][m].B, results[1][m].B)


def test_one_client_cannot_dominate_by_magnitude():
    """Below the absolute bound, a change 1000x the others' is scaled down to 10x the round's median."""
    server = make_server("ffa", "federation.max_update_norm=1e9")
    rng = np.random.default_rng(2)
    ups = [honest_update(server, c, rng, size=0.01) for c in range(4)]
    ups[3] = honest_update(server, 3, rng, size=10.0)
    norms = [change_norm(server, u) for u in ups]
    server.finish_round(ups, [0, 1, 2, 3])
    _, now = server.global_eval_factors()
    change = math.sqrt(sum(float(np.sum(f.B.astype(np.float64) ** 2)) for f in now.values())
                       + sum(float(np.sum(h.astype(np.float64) ** 2)) for h in server.head.values()))
    assert change <= (sum(norms[:3]) + 10 * float(np.median(norms))) / 4 * (1 + 1e-6)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_robust_aggregation_ignores_one_outlier(rule):
    server = make_server("fedit", f"federation.aggregation={rule}", "federation.trim_fraction=0.25",
                         "federation.norm_bound_factor=1000", "federation.max_update_norm=1e9")
    rng = np.random.default_rng(3)
    ups = [honest_update(server, c, rng, size=0.01) for c in range(4)]
    ups[3] = honest_update(server, 3, rng, size=100.0)
    server.finish_round(ups, [0, 1, 2, 3])
    _, now = server.global_eval_factors()
    assert max(float(np.abs(f.B).max()) for f in now.values()) < 0.1


def test_robust_aggregation_is_refused_where_it_does_not_fit():
    from fedlora.config import ConfigError

    for bad in (["strategy.name=flexlora"], ["strategy.name=rbla", "federation.ranks=[2, 4]"],
                ["privacy.mode=client", "privacy.epsilon=3"]):
        with pytest.raises(ConfigError, match="federation.aggregation"):
            load_config(None, ["federation.aggregation=median", *bad])


def test_server_refuses_update_the_local_engine_could_fake():
    """The local engine does not decode: the same checks run in Server.check_update."""
    server = make_server("ffa")
    rng = np.random.default_rng(4)
    u = honest_update(server, 0, rng)
    assert server.check_update(u) is None
    from dataclasses import replace

    assert "example count" in server.check_update(replace(u, num_examples=-3))
    assert "next rank" in server.check_update(replace(u, next_rank=10**9))
    assert "clients keep their rank" in server.check_update(replace(u, next_rank=4))
    assert "head keys" in server.check_update(replace(u, head={**u.head, "x": np.zeros(1, np.float32)}))
    wrong = {m: LoraFactors(A=f.A, B=f.B, scale=f.scale * 3) for m, f in u.factors.items()}
    assert "scale" in server.check_update(replace(u, factors=wrong))
    ints = {m: LoraFactors(A=f.A, B=f.B.astype(np.int64), scale=f.scale) for m, f in u.factors.items()}
    assert "float arrays" in server.check_update(replace(u, factors=ints))


def test_round_failed_when_too_few_valid_updates_remain():
    server = make_server("ffa", "federation.min_clients=2")
    rng = np.random.default_rng(5)
    ups = [honest_update(server, 0, rng)]
    with pytest.raises(RoundFailed, match="min_clients=2"):
        server.finish_round(ups, [0, 1])


def test_forged_privacy_reports_are_refused_on_the_round_path_and_the_server_logs_its_own_epsilon(tmp_path):
    """Sample-level DP: the server recomputes each client's epsilon from its reported history at the (sigma, q)
    the config gives it; a forged claim is refused with the server's value, the row logs the server's epsilon,
    and only the verified report reaches the checkpoint (which reads back as data, markers included)."""
    from fedlora.checkpoint import load_checkpoint, save_checkpoint

    server = make_server("ffa", "privacy.mode=sample", "privacy.epsilon=3")
    rng = np.random.default_rng(0)
    updates = []
    for c in range(4):
        u = honest_update(server, c, rng)
        u.privacy = honest_report(server, c)
        updates.append(u)
    true_eps = updates[0].privacy["epsilon"]
    updates[1].privacy = {**updates[1].privacy, "epsilon": 0.001}  # a forged claim
    updates[2].privacy = {**updates[2].privacy, "__array__": "a0"}  # a checkpoint marker smuggled in
    hist = updates[3].privacy["accountant"]["history"]
    updates[3].privacy = {**updates[3].privacy, "accountant": {"kind": "rdp", "history": [[h[0], 1.5, h[2]] for h in hist]}}
    outcome = server.finish_round(updates, [0, 1, 2, 3])
    assert "epsilon" in outcome.rejected[1] and f"{true_eps:.3g}"[:3] in outcome.rejected[1]
    assert 3 in outcome.rejected and set(outcome.trained) == {0, 2}
    assert set(server.privacy[2]) == {"epsilon", "noise_multiplier", "sample_rate", "dp_steps", "accountant"}
    assert server.mechanism.metrics(server.privacy)["epsilon"] == pytest.approx(true_eps, rel=1e-6)
    save_checkpoint(tmp_path / "ck", {"server": server.state_dict()})
    again = make_server("ffa", "privacy.mode=sample", "privacy.epsilon=3")
    again.load_state_dict(load_checkpoint(tmp_path / "ck")["server"])
    assert again.privacy == server.privacy
