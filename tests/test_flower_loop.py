"""The Flower ServerApp loop and ClientApp, run in this process over a Grid double (no Ray, no sockets).

Covers what the real runtimes make slow to reach: base deltas merged on clients (FLoRA) against the local
engine, crashed and silent clients, too few replies, and nodes without a usable partition id.
"""

from __future__ import annotations

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedlora.engines import execute
from fedlora.config import load_config
from fedlora.engines.flower import FlowerOptions, run_deployment
from fedlora.engines.flower_client import make_client_app
from fedlora.engines.flower_server import FlowerRunError, map_nodes, run_on_grid
from fedlora.federated_run import Run
from fedlora.experiment import make_run_dir
from fedlora.metrics import read_metrics
from fedlora.progress import RunProgress

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread", "server_task_identity")]

QUIET = RunProgress(enabled=False)
TINY = [
    "data.max_length=32", "data.max_eval_examples=200", "federation.rounds=2", "federation.local_steps=3",
    "federation.batch_size=16", "federation.partition=iid", "output.save_adapter=false", "output.progress=false",
]


class InProcessGrid(Grid):
    """Delivers each message to the ClientApp of its node right away; `silent` nodes never answer a train
    instruction (they did answer the query that mapped them: they vanished mid-run)."""

    def __init__(self, app, node_configs: list[dict], silent: set[int] = frozenset()):
        self.app, self.silent = app, set(silent)
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config=nc, state=RecordDict(), run_config={})
                         for i, nc in enumerate(node_configs)}

    def set_run(self, run) -> None:  # pragma: no cover - not used by the loop
        pass

    @property
    def run(self):  # pragma: no cover
        return None

    def create_message(self, *args, **kwargs):  # pragma: no cover - deprecated in Flower, not used
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.silent and msg.metadata.message_type == "train":
                continue
            try:
                replies.append(self.app(msg, self.contexts[node]))
            except Exception as exc:  # what a SuperNode reports when its ClientApp raises
                replies.append(Message(Error(code=1, reason=f"{type(exc).__name__}:<'{exc}'>"), reply_to=msg))
        return replies



def _nodes(n: int) -> list[dict]:
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


def _flower_run(cfg, run_dir, grid, options=None) -> list[dict]:
    make_run_dir(cfg, str(run_dir))
    run_on_grid(Run(cfg, run_dir, QUIET), grid, options or FlowerOptions(node_wait_s=0.0))
    return read_metrics(run_dir)


def test_flora_base_deltas_reach_clients_and_match_the_local_engine(tmp_path):
    cfg = load_config(None, TINY + ["federation.num_clients=2", "federation.ranks=[2, 4]", "strategy.name=flora"])
    execute(Run(cfg, make_run_dir(cfg, str(tmp_path / "local")), QUIET))
    grid = InProcessGrid(make_client_app(), _nodes(2))
    rows = _flower_run(cfg, tmp_path / "flower", grid, FlowerOptions(node_wait_s=0.0, federated_eval=True))
    local = read_metrics(tmp_path / "local")
    for a, b in zip(local, rows):
        assert abs(a["eval_accuracy"] - b["eval_accuracy"]) <= 1e-3
        # Clients merge the delta from float32 factors, the local engine from the dense float64 matrix.
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-4 and abs(a["train_loss"] - b["train_loss"]) < 1e-4
        assert a["bytes_up"] == b["bytes_up"]
    # Round 2's instructions carried round 1's merged delta; each node now holds that one entry.
    assert rows[1]["bytes_down"] > rows[0]["bytes_down"]
    assert all("fedlora.base" in ctx.state for ctx in grid.contexts.values())
    # Federated evaluation: the global adapter on each client's own data (capped like the held-out set).
    assert all(0.0 <= r["client_eval_accuracy"] <= 1.0 for r in rows)


def test_crashed_and_silent_clients_are_dropped_and_named(tmp_path):
    cfg = load_config(None, TINY + ["federation.num_clients=3", "federation.ranks=[4, 8]"])

    def fault(rnd: int, client: int) -> None:
        if (rnd, client) == (2, 1):
            raise RuntimeError("boom: client 1 lost its disk")

    grid = InProcessGrid(make_client_app(fault), _nodes(3), silent={102})
    rows = _flower_run(cfg, tmp_path / "run", grid, FlowerOptions(round_timeout_s=5.0, node_wait_s=0.0))
    assert [r["clients"] for r in rows] == [[0, 1], [0]]
    assert [r["dropped"] for r in rows] == [[2], [1, 2]]
    assert "boom: client 1 lost its disk" in rows[1]["dropped_reasons"]["1"]
    assert rows[1]["dropped_reasons"]["2"] == "no reply within 5s"
    assert (tmp_path / "run" / "summary.json").exists()


def test_too_few_valid_replies_end_the_run_with_one_line(tmp_path):
    cfg = load_config(None, TINY + ["federation.num_clients=2", "federation.min_clients=2"])

    def fault(rnd: int, client: int) -> None:
        raise RuntimeError("disk full")

    grid = InProcessGrid(make_client_app(fault), _nodes(2))
    with pytest.raises(FlowerRunError, match="min_clients=2") as err:
        _flower_run(cfg, tmp_path / "run", grid)
    assert "\n" not in str(err.value) and "disk full" in str(err.value)


def test_nodes_must_say_which_client_they_are():
    cfg = load_config(None, ["federation.num_clients=2"])
    app = make_client_app()
    with pytest.raises(FlowerRunError, match="num-partitions=3"):
        map_nodes(InProcessGrid(app, _nodes(3)), cfg, FlowerOptions(node_wait_s=0.0), {}, QUIET)
    with pytest.raises(FlowerRunError, match="only 0 of 2 clients"):
        map_nodes(InProcessGrid(app, [{}, {}]), cfg, FlowerOptions(node_wait_s=0.0), {}, QUIET)
    mapping = map_nodes(InProcessGrid(app, _nodes(2)[::-1]), cfg, FlowerOptions(node_wait_s=0.0), {}, QUIET)
    assert mapping == {1: 100, 0: 101}
    # A SuperNode restarted mid-run comes back under a new node id: only it is asked, and it takes over.
    grid = InProcessGrid(app, _nodes(2) + [{"partition-id": 0, "num-partitions": 2}])
    assert map_nodes(grid, cfg, FlowerOptions(node_wait_s=0.0), {0: 100, 1: 101}, QUIET) == {0: 102, 1: 101}
    # Device profiles (fedlora.flaas): a node's flaas-* keys reach the server; a restarted node's new ones replace
    # them (the run then re-plans); other node config keys do not travel.
    phone = {"flaas-memory-mb": 2048, "flaas-upload-mbps": 5, "flaas-download-mbps": 20, "flaas-gflops": 15}
    profiles: dict = {}
    nodes = [{**n, **phone, "data-path": "/secret"} for n in _nodes(2)]
    map_nodes(InProcessGrid(app, nodes), cfg, FlowerOptions(node_wait_s=0.0), {}, QUIET, profiles)
    assert profiles == {0: phone, 1: phone}
    grid = InProcessGrid(app, nodes + [{**nodes[0], "flaas-upload-mbps": 50}])
    map_nodes(grid, cfg, FlowerOptions(node_wait_s=0.0), {0: 100, 1: 101}, QUIET, profiles)
    assert profiles == {0: {**phone, "flaas-upload-mbps": 50}, 1: phone}


class _Stop(Exception):
    """Raised by a callback after a round's checkpoint: the ServerApp dies there."""


@pytest.mark.parametrize("extra", [
    ["strategy.name=flora", "federation.ranks=[2, 4]"],  # base deltas: fresh nodes must get the whole history
    # DP: fresh nodes continue their accountant from the server's last report. Reproducible noise: the reference
    # is another run, and fresh nodes would otherwise (rightly) draw fresh entropy noise.
    ["strategy.name=fedit", "privacy.mode=sample", "privacy.epsilon=3", "privacy.batch_size=8",
     "privacy.local_steps=2", "privacy.reproducible_noise=true"],
])
def test_resumed_serverapp_on_fresh_nodes_equals_an_uninterrupted_run(tmp_path, extra):
    import numpy as np
    from safetensors.numpy import load_file

    cfg = load_config(None, TINY + ["federation.num_clients=2", "federation.rounds=3", "output.save_adapter=true"]
                      + extra)
    reference = tmp_path / "reference"
    run_on_grid(Run(cfg, make_run_dir(cfg, str(reference)), QUIET), InProcessGrid(make_client_app(), _nodes(2)),
                FlowerOptions(node_wait_s=0.0))

    def stop_after_round_1(row):
        if row["round"] == 1:
            raise _Stop

    cut = tmp_path / "cut"
    with pytest.raises(_Stop):
        run_on_grid(Run(cfg, make_run_dir(cfg, str(cut)), QUIET, callbacks=[stop_after_round_1]),
                    InProcessGrid(make_client_app(), _nodes(2)), FlowerOptions(node_wait_s=0.0))
    assert not (cut / "summary.json").exists()
    # A new ServerApp and new SuperNodes: nothing survives but the run folder. The ServerApp of `flwr run`
    # with run config `resume = true` and `out` = the run folder.
    fresh = InProcessGrid(make_client_app(), _nodes(2))
    run_config = {"config": "", "overrides": "output.progress=false", "out": str(cut), "resume": True,
                  "node-wait": 0.0, "round-timeout": 60.0}
    run_deployment(fresh, Context(run_id=2, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))

    a = load_file(cut / "adapter" / "adapter_model.safetensors")
    b = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.max(np.abs(a[k].astype(np.float64) - b[k])) <= 1e-6, k
    rows, ref = read_metrics(cut), read_metrics(reference)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for x, y in zip(rows, ref):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-6)
        if "epsilon" in y:
            assert y["epsilon"] > 0 and x["epsilon"] == pytest.approx(y["epsilon"], rel=1e-9)
            assert x["dp_steps"] == y["dp_steps"]
