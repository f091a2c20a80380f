"""RoLoRA, Fed-SB and FedSA: the identities of ALGORITHMS-style math in float64 on random factors, the server
reading only what each method sends in each round, and each method end to end on the embedded data."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.engines import execute, make_engine
from fedlora.client import Downlink, Update
from fedlora.config import load_config
from fedlora.federated_run import build_strategy
from fedlora.server import Server
from fedlora.strategies import LoraFactors, get_strategy
from fedlora.strategies.fedsb import orthonormal_rows

# Flower messages need a sender identity (conftest.server_task_identity).
pytestmark = pytest.mark.usefixtures("server_task_identity")

DIMS = {"enc.0.query": (9, 7), "enc.0.value": (6, 7)}
HEAD = {"classifier.weight": np.zeros((2, 7), np.float32)}


def server_for(method: str, *extra: str) -> Server:
    cfg = load_config(None, ["federation.num_clients=3", f"strategy.name={method}", "lora.rank=4", *extra])
    return Server(cfg, build_strategy(cfg, DIMS), DIMS, {k: v.copy() for k, v in HEAD.items()}, [10, 20, 30])


def trained(server: Server, client: int, rng, size: float = 0.3) -> Update:
    """A client that changed A, B and the head from its downlink (what it sends is the method's business)."""
    down = server.downlink(client)
    factors = {m: LoraFactors(A=(f.A + size * rng.normal(size=f.A.shape)).astype(np.float32),
                              B=(f.B + size * rng.normal(size=f.B.shape)).astype(np.float32), scale=f.scale)
               for m, f in down.factors.items()}
    head = {k: (v + size * rng.normal(size=v.shape)).astype(np.float32) for k, v in down.head.items()}
    return Update(client, down.rank, factors, head, server.client_sizes[client], 0.1, 2, 8, 0.01)


# -- RoLoRA ---------------------------------------------------------------------------------------------------
def test_rolora_alternates_and_each_round_is_the_exact_average_of_products():
    rng = np.random.default_rng(0)
    s = get_strategy("rolora")
    assert [s.roles(t).train for t in (1, 2, 3, 4)] == [("B",), ("A",), ("B",), ("A",)]
    assert all(s.roles(t).up == s.roles(t).train and s.roles(t).down == ("A", "B") for t in (1, 2))
    p = np.array([1.0, 2.0, 3.0]) / 6.0
    A, B = rng.normal(size=(5, 7)), rng.normal(size=(9, 5))
    for common in ("A", "B"):
        ups = [{"q": LoraFactors(A=A if common == "A" else rng.normal(size=(5, 7)),
                                 B=B if common == "B" else rng.normal(size=(9, 5)), scale=0.5)} for _ in range(3)]
        exact = sum(pk * u["q"].delta() for pk, u in zip(p, ups))
        res = s.aggregate(ups, [1, 2, 3])
        np.testing.assert_allclose(res.effective_delta("q"), exact, rtol=1e-12, atol=1e-12)
    both = [{"q": LoraFactors(A=rng.normal(size=(5, 7)), B=rng.normal(size=(9, 5)), scale=0.5)} for _ in range(2)]
    with pytest.raises(ValueError, match="both A and B differ"):
        s.aggregate(both, [1, 1])


def test_rolora_server_reads_only_this_rounds_factor_and_stays_exact():
    server = server_for("rolora")
    rng = np.random.default_rng(1)
    for round_idx, part in ((1, "B"), (2, "A"), (3, "B")):
        before = server.downlink(0).factors
        ups = [trained(server, c, rng) for c in range(3)]
        server.finish_round(ups, [0, 1, 2])
        after = server.global_eval_factors()[1]
        p = np.array(server.client_sizes, float) / sum(server.client_sizes)
        for m in DIMS:
            frozen = "A" if part == "B" else "B"
            np.testing.assert_array_equal(getattr(after[m], frozen), getattr(before[m], frozen))
            # The exact aggregate of what the clients sent (their trained factor under the common other one).
            sent = [LoraFactors(A=u.factors[m].A if part == "A" else before[m].A,
                                B=u.factors[m].B if part == "B" else before[m].B, scale=before[m].scale) for u in ups]
            exact = sum(pk * f.delta() for pk, f in zip(p, sent))
            np.testing.assert_allclose(after[m].delta(), exact, rtol=1e-6, atol=1e-6)
        assert server.round == round_idx


# -- Fed-SB ---------------------------------------------------------------------------------------------------
def fedsb_round(seed: int, k: int = 4, r: int = 5):
    rng = np.random.default_rng(seed)
    init = {m: LoraFactors(A=rng.normal(size=(r, d_in)), B=np.zeros((d_out, r)), scale=0.5) for m, (d_out, d_in) in
            {"q": (12, 10), "v": (8, 10)}.items()}
    s = get_strategy("fedsb", initial_factors=init, seed=seed)
    start = s.starting_factors(init)
    Rs = [{m: rng.normal(size=(r, r)) for m in init} for _ in range(k)]
    ups = [{m: s.from_parts(m, {"R": R[m]}, start[m]) for m in init} for R in Rs]
    return s, start, Rs, ups, rng.uniform(1, 5, size=k)


@pytest.mark.parametrize("seed", range(4))
def test_fedsb_average_of_cores_is_the_average_of_products(seed):
    s, start, Rs, ups, w = fedsb_round(seed)
    p = w / w.sum()
    res = s.aggregate(ups, w)
    for m, f in start.items():
        A0, B0 = s.A0[m], s.B0[m]
        np.testing.assert_allclose(A0 @ A0.T, np.eye(A0.shape[0]), atol=1e-12)
        np.testing.assert_allclose(B0.T @ B0, np.eye(B0.shape[1]), atol=1e-12)
        assert not f.delta().any() and np.array_equal(f.B, B0)  # R = 0 at the start: ΔW = 0
        exact = sum(pk * 0.5 * B0 @ R[m] @ A0 for pk, R in zip(p, Rs))
        np.testing.assert_allclose(res.effective_delta(m), exact, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s.to_parts(m, res.downlink(5)[m], ("R",))["R"],
                                   sum(pk * R[m] for pk, R in zip(p, Rs)), atol=1e-12)
    assert s.uplink_nbytes(ups[0]) == 4 * 2 * 5 * 5  # r² per module, whatever the layer's width


def test_fedsb_refuses_a_moved_B_and_sample_dp():
    s, start, Rs, ups, w = fedsb_round(0)
    bad = dict(ups[1])
    bad["q"] = LoraFactors(A=ups[1]["q"].A, B=ups[1]["q"].B + 1e-3, scale=0.5)
    with pytest.raises(ValueError, match="client 1.*fixed B0"):
        s.aggregate([ups[0], bad], [1, 1])
    with pytest.raises(ValueError, match="privacy.mode=sample"):
        load_config(None, ["strategy.name=fedsb", "privacy.mode=sample", "privacy.epsilon=3"])
    with pytest.raises(ValueError, match="different ranks.*one r x r core"):
        load_config(None, ["strategy.name=fedsb", "federation.ranks=[4, 8]"])


def test_orthonormal_rows_keeps_the_row_space():
    A = np.random.default_rng(3).normal(size=(4, 9))
    Q = orthonormal_rows(A)
    np.testing.assert_allclose(Q @ Q.T, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(A @ Q.T @ Q, A, atol=1e-12)  # A's rows lie in Q's span


# -- FedSA ------------------------------------------------------------------------------------------------------
def test_fedsa_sends_A_only_and_the_server_never_holds_a_B():
    from fedlora.engines.flower_wire import decode_update, encode_downlink, encode_update

    server = server_for("fedsa")
    s = server.strategy
    assert s.roles(1).up == ("A",) and s.roles(1).down == ("A",) and s.roles(1).personal == ("B",)
    rng = np.random.default_rng(4)
    ups = [trained(server, c, rng) for c in range(3)]
    wire = [decode_update(encode_update(u, s, server.up_parts()), server, u.client_id) for u in ups]
    assert all(set(k.split(":")[1] for k in encode_update(u, s, ("A",))["lora"]) == {"A"} for u in ups)
    assert wire[0].nbytes - wire[0].nbytes_head == 4 * 4 * 7 * 2  # A (4 x 7) of two modules
    server.finish_round([w.update for w in wire], [0, 1, 2])
    p = np.array(server.client_sizes, float) / sum(server.client_sizes)
    glob = server.global_eval_factors()[1]
    for m in DIMS:
        np.testing.assert_allclose(glob[m].A, sum(pk * u.factors[m].A for pk, u in zip(p, ups)), atol=1e-6)
        assert not glob[m].B.any()  # the clients' B never reached it
    down = encode_downlink(server.cfg, server.downlink(0), 0, s, [], 0, "", [])
    assert {k.split(":")[1] for k in down.content["lora"]} == {"A"}


@pytest.mark.slow
def test_fedsa_client_gets_its_own_B_back_under_the_new_A(tmp_path, one_torch_thread):
    """On the real model: after round 1 each client's B is in its own state; in round 2 a client's adapter holds
    the server's new A and its own B (not another client's, not the server's zeros)."""
    from fedlora.client_state import ClientStateStore
    from fedlora.federated_run import Run
    from fedlora.engines.local import LocalTransport
    from fedlora import lora

    cfg = load_config(None, ["strategy.name=fedsa", "federation.num_clients=2", "federation.rounds=1",
                             "federation.local_steps=2", "federation.batch_size=8", "data.max_length=32",
                             "data.max_eval_examples=50", "output.progress=false", "output.save_adapter=false"])
    run = Run(cfg, tmp_path / "run")
    engine = make_engine(run)
    engine.execute()
    transport = engine.transport
    assert isinstance(transport, LocalTransport) and isinstance(transport.trainer.store, ClientStateStore)
    kept = [transport.trainer.store.load(c, before_round=2) for c in range(2)]
    key = next(k for k in kept[0] if k.endswith(".B"))
    assert np.abs(kept[0][key] - kept[1][key]).max() > 0  # two different personal Bs
    down = run.server.downlink(0)
    assert down.round == 2
    adapter = transport.trainer.load(down, 0)
    got = lora.get_factors(run.host.model, adapter)
    module = key.removeprefix("personal/").removesuffix(".B")
    np.testing.assert_array_equal(got[module].B, kept[0][key])
    np.testing.assert_allclose(got[module].A, down.factors[module].A, atol=1e-7)
    assert "personal_accuracy" in run.finish()


# -- end to end: each method learns on the default data ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["rolora", "fedsb", "fedsa"])
def test_new_method_learns_end_to_end(method, tmp_path, one_torch_thread):
    import fedlora

    result = fedlora.run(None, overrides=[
        f"strategy.name={method}", "federation.num_clients=3", "federation.rounds=3", "federation.local_steps=8",
        "federation.partition=iid", "data.max_eval_examples=300", "data.max_length=48", "output.progress=false",
        "output.save_adapter=false"], out=tmp_path / method)
    s = result.summary
    score = s["personal_accuracy"] if method == "fedsa" else s["final_accuracy"]
    assert score > s["majority_accuracy"] + 0.05, s
    rows = result.metrics
    up = [r["bytes_up"] - r["bytes_up_head"] for r in rows]
    if method == "rolora":  # B (384 x 8) up in odd rounds, A (8 x 384) in even rounds: the same size
        assert up[0] == up[1] == 3 * 12 * 384 * 8 * 4
    if method == "fedsb":
        assert up[0] == 3 * 12 * 8 * 8 * 4  # only R
    if method == "fedsa":
        assert up[0] == 3 * 12 * 8 * 384 * 4  # only A


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rolora", "fedsb", "fedsa"])
def test_flower_carries_each_rounds_parts_as_in_process(method, tmp_path, one_torch_thread):
    """What a round sends and keeps differs per method (RoLoRA: B, then A; Fed-SB: R; FedSA: A up and down, B kept
    in the node's state): over Flower's message path the run must train and score exactly as in process."""
    from test_flower_loop import InProcessGrid, _nodes

    from fedlora.engines.flower import FlowerOptions
    from fedlora.engines.flower_client import make_client_app
    from fedlora.engines.flower_server import run_on_grid
    from fedlora.experiment import make_run_dir
    from fedlora.federated_run import Run
    from fedlora.metrics import read_metrics

    cfg = load_config(None, [f"strategy.name={method}", "federation.num_clients=2", "federation.rounds=3",
                             "federation.local_steps=2", "federation.batch_size=8", "federation.partition=iid",
                             "data.max_length=32", "data.max_eval_examples=100", "output.progress=false",
                             "output.save_adapter=false"])
    execute(Run(cfg, make_run_dir(cfg, str(tmp_path / "local"))))
    run_on_grid(Run(cfg, make_run_dir(cfg, str(tmp_path / "flower"))), InProcessGrid(make_client_app(), _nodes(2)),
                FlowerOptions(node_wait_s=0.0))
    local, flower = read_metrics(tmp_path / "local"), read_metrics(tmp_path / "flower")
    assert len(local) == len(flower) == 3
    for a, b in zip(local, flower):
        # Round 2 on: the losses agree only if every part the method keeps or derives arrived where it should.
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and abs(a["eval_loss"] - b["eval_loss"]) < 1e-5
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
