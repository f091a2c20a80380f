"""The Flower payload codec: exactly what a method sends, byte counts from the real arrays, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, RecordDict

from fedlora import lora
from fedlora.client import Downlink, Update
from fedlora.config import load_config
from fedlora.engines.flower import config_from_run_config, simulation_backend_config
from fedlora.engines.flower_client import store_base
from fedlora.engines.flower_wire import (
    decode_base_entries,
    decode_downlink,
    decode_update,
    encode_downlink,
    encode_update,
    seeded_reference,
)
from fedlora.strategies import LoraFactors

DIMS = {"enc.0.query": (6, 5), "enc.0.value": (7, 5)}
HEAD = {"classifier.weight": np.arange(10, dtype=np.float32).reshape(2, 5), "classifier.bias": np.ones(2, np.float32)}
HEAD_BYTES = 12 * 4


def _cfg(*overrides: str):
    return load_config(None, ["federation.num_clients=2", "federation.ranks=[2, 4]", *overrides])


def _server(cfg, head=HEAD):
    """A real fedlora Server over the toy modules: what a reply is decoded against."""
    from fedlora.federated_run import build_strategy
    from fedlora.server import Server

    return Server(cfg, build_strategy(cfg, DIMS), DIMS, dict(head), [10] * cfg.federation.num_clients)


def _strategy(cfg):
    from fedlora.federated_run import build_strategy

    return build_strategy(cfg, DIMS)


def _factors(rank: int, cfg, rng) -> dict[str, LoraFactors]:
    ref = seeded_reference(cfg, DIMS, rank, _strategy(cfg))
    return {m: LoraFactors(A=ref[m].A, B=rng.normal(size=(d_out, rank)).astype(np.float32), scale=cfg.lora.scale(rank))
            for m, (d_out, _) in DIMS.items()}


def test_seeded_reference_is_the_prefix_of_the_widest_ranks_init():
    cfg = _cfg()
    widest = lora.initial_factors(cfg.seed, DIMS, 4, cfg.lora.scale(4))
    for rank in (1, 2, 4):
        for m, f in seeded_reference(cfg, DIMS, rank, _strategy(cfg)).items():
            assert np.array_equal(f.A, widest[m].A[:rank]) and not f.B.any() and f.B.shape[1] == rank


def test_ffa_downlink_carries_B_and_head_only():
    cfg, rng = _cfg(), np.random.default_rng(0)
    down = Downlink(rank=2, factors=_factors(2, cfg, rng), head=HEAD, round=3)
    payload = encode_downlink(cfg, down, 1, _strategy(cfg), [], 0, cfg.to_toml(), ["neg", "pos"])
    assert not any(k.endswith(":A") for k in payload.content["lora"])
    assert payload.nbytes == (6 * 2 + 7 * 2) * 4 + HEAD_BYTES
    back = decode_downlink(payload.content, cfg, DIMS, _strategy(cfg))
    assert (back.rank, back.round) == (2, 3)
    for m, f in down.factors.items():
        assert np.array_equal(back.factors[m].A, f.A) and np.array_equal(back.factors[m].B, f.B)
        assert back.factors[m].scale == f.scale
    assert all(np.array_equal(back.head[k], v) for k, v in HEAD.items())


def test_downlink_is_sent_in_the_clients_own_scale():
    """Factors labelled with another scale are re-expressed before casting, as ClientTrainer.load would."""
    cfg, rng = _cfg(), np.random.default_rng(1)
    f = _factors(4, cfg, rng)
    other = {m: LoraFactors(A=x.A, B=x.B.astype(np.float64), scale=x.scale * 2) for m, x in f.items()}
    rbla = _cfg("strategy.name=rbla")
    payload = encode_downlink(rbla, Downlink(4, other, {}, 1), 0, _strategy(rbla), [], 0, "", [])
    back = decode_downlink(payload.content, rbla, DIMS, _strategy(rbla))
    want = lora.with_scale(other, cfg.lora.scale(4))
    for m in f:
        assert back.factors[m].scale == cfg.lora.scale(4)
        assert np.array_equal(back.factors[m].B, want[m].B.astype(np.float32))


def test_update_round_trip_and_bytes_follow_what_the_method_sends():
    cfg, rng = _cfg(), np.random.default_rng(2)
    update = Update(client_id=1, rank=4, factors=_factors(4, cfg, rng), head=HEAD, num_examples=17, train_loss=0.5,
                    steps=3, samples=48, train_s=0.25, next_rank=None,
                    privacy={"epsilon": 1.5, "accountant": {"h": [[1.0, 0.1, 3]]}})
    for method, lora_bytes in (("ffa", (6 + 7) * 4 * 4), ("rbla", (6 + 7 + 5 + 5) * 4 * 4)):
        server = _server(_cfg(f"strategy.name={method}", "privacy.mode=sample", "privacy.epsilon=3"))
        content = encode_update(update, server.strategy, server.up_parts(), {"base-count": 2})
        up = decode_update(content, server, 1)
        assert up.nbytes == lora_bytes + HEAD_BYTES and up.nbytes_head == HEAD_BYTES
        u = up.update
        assert (u.client_id, u.rank, u.num_examples, u.steps, u.samples, u.next_rank) == (1, 4, 17, 3, 48, None)
        assert u.privacy == update.privacy and up.metrics["base-count"] == 2
        for m, f in update.factors.items():
            assert np.array_equal(u.factors[m].A, f.A) and np.array_equal(u.factors[m].B, f.B)


def test_malformed_reply_is_one_line_value_error():
    cfg, rng = _cfg(), np.random.default_rng(3)
    update = Update(0, 2, _factors(2, cfg, rng), {}, 5, 0.1, 1, 5, 0.1)
    content = encode_update(update, _strategy(_cfg("strategy.name=rbla")), ("A", "B"))
    content["lora"] = ArrayRecord({k: v for k, v in content["lora"].items() if not k.endswith(":A")})
    with pytest.raises(ValueError, match="malformed reply") as err:
        # a method that sends A must not get the seeded one
        decode_update(content, _server(_cfg("strategy.name=rbla"), head={}), 0)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="malformed reply"):
        decode_update(RecordDict({}), _server(cfg), 0)


def test_base_deltas_travel_as_factors_and_accumulate_on_the_node():
    cfg, rng = _cfg(), np.random.default_rng(4)
    entries = [{m: (rng.normal(size=(d_out, 3)), rng.normal(size=(3, d_in))) for m, (d_out, d_in) in DIMS.items()}
               for _ in range(3)]
    state = RecordDict()
    first = encode_downlink(cfg, Downlink(2, {}, {}, 2), 0, _strategy(cfg), entries[:2], 0, "", [])
    assert first.nbytes == 2 * sum((d_out + d_in) * 3 for d_out, d_in in DIMS.values()) * 4
    assert len(store_base(state, decode_base_entries(first.content))) == 2
    later = encode_downlink(cfg, Downlink(2, {}, {}, 4), 0, _strategy(cfg), entries[2:], 2, "", [])
    held = store_base(state, decode_base_entries(later.content))
    assert len(held) == 3
    for got, want in zip(held, entries):
        for m in DIMS:
            assert np.allclose(got[m][0], want[m][0], atol=1e-6) and np.allclose(got[m][1], want[m][1], atol=1e-6)
    gap = encode_downlink(cfg, Downlink(2, {}, {}, 4), 0, _strategy(cfg), entries[:1], 5, "", [])
    with pytest.raises(ValueError, match="gaps"):
        store_base(state, decode_base_entries(gap.content))


def test_run_config_reads_fedlora_config_and_overrides(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("[federation]\nnum_clients = 3\n")
    cfg, out, options = config_from_run_config(
        {"config": str(path), "overrides": "federation.rounds=5 federation.ranks=[2, 4]  strategy.name=rbla",
         "out": "runs/x",
         "round-timeout": 30.0, "node-wait": 5.0, "federated-eval": True})
    assert (cfg.federation.num_clients, cfg.federation.rounds, cfg.strategy.name) == (3, 5, "rbla")
    assert cfg.federation.ranks == [2, 4]
    assert out == "runs/x"
    assert (options.round_timeout_s, options.node_wait_s, options.federated_eval) == (30.0, 5.0, True)
    with pytest.raises(ValueError, match="not found"):
        config_from_run_config({"config": str(tmp_path / "missing.toml")})
    with pytest.raises(ValueError, match="unknown key"):
        config_from_run_config({"overrides": "federation.nope=1"})


def test_simulation_backend_is_cpu_only_one_core_per_client():
    conf = simulation_backend_config(num_clients=3)
    assert conf["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    assert conf["init_args"]["num_gpus"] == 0 and 1 <= conf["init_args"]["num_cpus"] <= 3


def test_a_node_tokenizes_exactly_its_partition_of_prepare_data():
    from fedlora.experiment import prepare_data
    from fedlora.tasks import get_task
    from fedlora.models import load_tokenizer

    cfg = load_config(None, ["federation.num_clients=3", "federation.partition=dirichlet", "data.max_length=24"])
    tok = load_tokenizer(cfg.model.name)
    full = prepare_data(cfg, tok)
    partition_data = get_task(cfg.task).client_data
    for k in range(3):
        mine, names = partition_data(cfg, tok, k)
        assert names == full.label_names and np.array_equal(mine.labels, full.clients[k].labels)
        assert all(np.array_equal(a, b) for a, b in zip(mine.input_ids, full.clients[k].input_ids))
    with pytest.raises(ValueError, match="partition-id 3 outside"):
        partition_data(cfg, tok, 3)


def test_a_node_with_its_own_file_maps_labels_by_name(tmp_path):
    from fedlora.models import load_tokenizer
    from fedlora.tasks import get_task

    cfg = load_config(None, ["data.max_length=16"])
    _load_file = get_task(cfg.task).file_data
    path = tmp_path / "mine.csv"
    path.write_text("text,label\ngreat film,positive\ndull and long,negative\nloved it,positive\n")
    data = _load_file(cfg, str(path), load_tokenizer(cfg.model.name), ["negative", "positive"])
    assert data.labels.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="not among the federation's labels"):
        _load_file(cfg, str(path), load_tokenizer(cfg.model.name), ["neg", "pos"])


def test_a_node_validates_the_servers_config_without_the_servers_data_file(tmp_path):
    from fedlora.config import ConfigError
    from fedlora.engines.flower_client import config_from_toml

    data = tmp_path / "server-only.csv"
    data.write_text("text,label\na,x\nb,y\n")
    cfg = load_config(None, ["data.name=csv", f"data.path={data}"])
    data.unlink()  # the file exists on the server only
    with pytest.raises(ConfigError, match="no such file"):
        load_config(None, ["data.name=csv", f"data.path={data}"])
    assert config_from_toml(cfg.to_toml()).data.path == str(data)
