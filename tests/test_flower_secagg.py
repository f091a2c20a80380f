"""Secure aggregation and compressed uploads on Flower's simulation runtime (Ray, CPU only): the SecAgg+ aggregate
equals the plain one within its quantization error and the server side only ever receives the summed record;
dropouts within the threshold leave a round valid, below it the round changes nothing and the run goes on;
a compressed run gives the same rounds on flower-sim as in process. Every process left behind is stopped."""

from __future__ import annotations

import numpy as np
import pytest
from flower_procs import TAG_VAR, ProcessTag

from fedlora.engines import execute
from fedlora.config import load_config
from fedlora.engines.flower import FlowerSimEngine
from fedlora.experiment import make_run_dir
from fedlora.federated_run import Run
from fedlora.metrics import read_metrics
from fedlora.progress import RunProgress

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

QUIET = RunProgress(enabled=False)
TINY = [
    "data.max_length=32", "data.max_eval_examples=200", "federation.local_steps=3", "federation.batch_size=16",
    "federation.partition=iid", "strategy.name=ffa", "optim.lr=3e-2", "output.save_adapter=false",
    "output.progress=false", "federation.num_clients=3",
]


@pytest.fixture(autouse=True)
def _no_leftover_processes(monkeypatch):
    tag = ProcessTag()
    monkeypatch.setenv(TAG_VAR, tag.value)
    try:
        yield
    finally:
        left = tag.wait_gone(timeout=60.0)  # Ray actors exit slowly on a loaded 2-core machine
        stopped = tag.stop_all() if left else []
    assert not stopped, f"processes outlived the simulation: {stopped}"


def drop_one_in_round_2_and_two_in_round_3(rnd: int, client: int) -> None:
    """Runs inside a Ray actor, during SecAgg+'s collect stage (after the keys were shared)."""
    if (rnd, client) in {(2, 1), (3, 1), (3, 2)}:
        raise RuntimeError(f"boom: client {client} gone in round {rnd}")


def _run(tmp_path, name: str, extra: list[str], fault=None):
    cfg = load_config(None, TINY + extra)
    run = Run(cfg, make_run_dir(cfg, str(tmp_path / name)), QUIET)
    summary = FlowerSimEngine(run, fault=fault).execute() if cfg.engine == "flower-sim" else execute(run)
    return run, summary, read_metrics(tmp_path / name)


def test_secagg_sum_equals_plain_aggregate_and_server_sees_only_the_sum(tmp_path):
    # Both on flower-sim: local and Ray-actor training differ by ~3e-5 in B already (float order), more than the
    # quantization error checked here.
    mixed = ["federation.rounds=1", "federation.ranks=[4, 8, 8]", "engine=flower-sim"]
    plain, _, plain_rows = _run(tmp_path, "plain", mixed)
    secure, _, rows = _run(tmp_path, "secure", mixed + ["privacy.secure_aggregation=true"])
    row = rows[0]
    assert row["clients"] == [0, 1, 2] and row["secure_aggregation"] is True
    # Server side: no reply carried an array (the mod masked the summand into integers and cleared the arrays),
    # and the legacy strategy received one aggregate, the same object in every result.
    assert row["secagg_reply_arrays"] == 0 and row["secagg_sums_received"] == 1
    assert len(row["secagg_stage_s"]) == 4
    for r in (4, 8):
        a, b = plain.server.downlink_factors(r), secure.server.downlink_factors(r)
        for m in a:
            assert np.abs(a[m].B - b[m].B).max() < 2e-5  # SecAgg+'s step: 16 / 2**22 per weighted value
            assert np.array_equal(a[m].A, b[m].A)
    for k in plain.server.head:
        assert np.abs(plain.server.head[k] - secure.server.head[k]).max() < 2e-5
    assert abs(row["eval_accuracy"] - plain_rows[0]["eval_accuracy"]) <= 0.01
    assert row["bytes_up"] > plain_rows[0]["bytes_up"]  # int64 masked values, keys and shares


def test_secagg_dropouts_within_and_below_threshold(tmp_path):
    _, summary, rows = _run(tmp_path, "drop", ["federation.rounds=3", "engine=flower-sim",
                                               "privacy.secure_aggregation=true", "privacy.secagg_threshold=0.5"],
                            fault=drop_one_in_round_2_and_two_in_round_3)
    assert [r["clients"] for r in rows] == [[0, 1, 2], [0, 2], []]
    assert "failed" not in rows[1] and rows[1]["dropped"] == [1] and "boom" in rows[1]["dropped_reasons"]["1"]
    assert "too few to unmask" in rows[2]["failed"] and rows[2]["dropped"] == [1, 2]
    assert rows[2]["eval_accuracy"] == rows[1]["eval_accuracy"]  # the failed round changed nothing
    assert summary["rounds"] == 3


def test_compressed_uploads_same_rounds_local_and_flower_sim(tmp_path):
    comp = ["federation.rounds=2", "federation.compression=topk", "federation.topk_fraction=0.2",
            "federation.num_clients=2"]
    _, _, local = _run(tmp_path, "local", comp)
    _, _, sim = _run(tmp_path, "sim", comp + ["engine=flower-sim"])
    for a, b in zip(local, sim):
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_up_head"] == b["bytes_up_head"]
        assert abs(a["eval_accuracy"] - b["eval_accuracy"]) <= 1e-3 and abs(a["train_loss"] - b["train_loss"]) <= 1e-6


def test_secagg_with_client_level_dp_on_flower_sim(tmp_path):
    """Clients clip their own change before masking; the server noises the sum and accounts the round."""
    _, summary, rows = _run(tmp_path, "dp", ["federation.rounds=1", "engine=flower-sim",
                                             "privacy.secure_aggregation=true", "privacy.mode=client",
                                             "privacy.noise_multiplier=0.5", "privacy.clip=0.5"])
    assert rows[0]["secure_aggregation"] is True and rows[0]["secagg_reply_arrays"] == 0
    assert rows[0]["epsilon"] > 0 and rows[0]["privacy"] == "client"
    assert summary["rounds"] == 1
