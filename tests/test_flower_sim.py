"""engine=flower-sim on Flower's simulation runtime (Ray, CPU only) against engine=local, and a client that
raises mid-round. Each test starts Ray in this process; every process it leaves behind is stopped by pid."""

from __future__ import annotations

import pytest
from flower_procs import TAG_VAR, ProcessTag

from fedlora.engines import execute
from fedlora.config import load_config
from fedlora.engines.flower import FlowerSimEngine
from fedlora.federated_run import Run
from fedlora.experiment import make_run_dir
from fedlora.metrics import read_metrics
from fedlora.progress import RunProgress

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

QUIET = RunProgress(enabled=False)
TINY = [
    "data.max_length=32", "data.max_eval_examples=200", "federation.rounds=2", "federation.local_steps=3",
    "federation.batch_size=16", "federation.partition=iid", "federation.ranks=[4, 8]", "strategy.name=ffa",
    "optim.lr=3e-2", "output.save_adapter=false", "output.progress=false",
]
# Planned ranks (fedlora.flaas): client 0's slow uplink misses the 2 s deadline at rank 8, so the plan is [4, 8].
FLAAS = ["flaas.profiles=[{memory_mb=4096, upload_mbps=0.5, download_mbps=100, gflops=1000},"
         " {memory_mb=4096, upload_mbps=100, download_mbps=100, gflops=1000}]", "flaas.ranks=[4, 8]",
         "flaas.deadline_s=2.0"]



@pytest.fixture(autouse=True)
def _no_leftover_processes(monkeypatch):
    """Ray's GCS, raylet and workers inherit this tag; none may outlive the run (ray.shutdown stops them)."""
    tag = ProcessTag()
    monkeypatch.setenv(TAG_VAR, tag.value)
    try:
        yield
    finally:
        left = tag.wait_gone(timeout=20.0)
        stopped = tag.stop_all() if left else []
    assert not stopped, f"processes outlived the simulation: {stopped}"


def raise_in_round_2_on_client_1(rnd: int, client: int) -> None:
    """Runs inside a Ray actor (imported there by reference): the client fails after receiving its work."""
    if (rnd, client) == (2, 1):
        raise RuntimeError("boom: client 1 crashed mid-round")


def test_local_and_flower_sim_give_the_same_rounds(tmp_path):
    cfg = load_config(None, TINY + FLAAS + ["federation.num_clients=2"])
    local_sum = execute(Run(cfg, make_run_dir(cfg, str(tmp_path / "local")), QUIET))
    sim_cfg = load_config(None, TINY + FLAAS + ["federation.num_clients=2", "engine=flower-sim"])
    sim_sum = execute(Run(sim_cfg, make_run_dir(sim_cfg, str(tmp_path / "sim")), QUIET))
    local, sim = read_metrics(tmp_path / "local"), read_metrics(tmp_path / "sim")
    assert len(local) == len(sim) == 2
    assert abs(local_sum["accuracy_before"] - sim_sum["accuracy_before"]) <= 1e-3
    for a, b in zip(local, sim):
        assert abs(a["eval_accuracy"] - b["eval_accuracy"]) <= 1e-3
        # Nothing nondeterministic is left: the clients' losses and the payload sizes agree exactly.
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-6 and abs(a["eval_loss"] - b["eval_loss"]) <= 1e-6
        assert (a["bytes_up"], a["bytes_down"], a["clients"]) == (b["bytes_up"], b["bytes_down"], b["clients"])
        # the same profiles give the same plan, and the same simulated clock from the same bytes
        assert a["flaas_plan"] == b["flaas_plan"] == {"ranks": {"0": 4, "1": 8}, "sit_out": {}}
        assert a["ranks"] == b["ranks"] == {"0": 4, "1": 8} and a["sim_client_s"] == b["sim_client_s"]
    assert sim[0]["client_setup_s"] > 0 and sim[1]["client_setup_s"] == 0  # the model loads once per actor


def test_client_raising_mid_round_is_dropped_and_named(tmp_path):
    cfg = load_config(None, TINY + ["federation.num_clients=3", "engine=flower-sim"])
    run = Run(cfg, make_run_dir(cfg, str(tmp_path / "sim")), QUIET)
    summary = FlowerSimEngine(run, fault=raise_in_round_2_on_client_1).execute()
    rows = read_metrics(tmp_path / "sim")
    assert [r["clients"] for r in rows] == [[0, 1, 2], [0, 2]]
    assert rows[1]["dropped"] == [1] and "boom: client 1 crashed mid-round" in rows[1]["dropped_reasons"]["1"]
    assert summary["rounds"] == 2 and summary["dropped_total"] == 1
