"""One tiny real run with output.report_to = ["tensorboard", "mlflow"] and output.keep_rounds: the trackers hold
metrics.jsonl row for row (read back with each tool's own reader), and `fedlora verify` passes on the run and
fails in one line once a single byte of its adapter or of a kept round changes."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from fedlora import tracking
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.metrics import read_metrics
from fedlora.runner import run_experiment

pytestmark = pytest.mark.slow  # trains the real embedded model (two rounds, three clients)

TINY = ["federation.num_clients=3", "federation.rounds=2", "federation.local_steps=3", "data.max_eval_examples=200",
        "data.max_length=32", "output.progress=false", "output.keep_rounds=true"]
HAS_MLFLOW = all(importlib.util.find_spec(m) for m in tracking.TRACKERS["mlflow"].modules)
TRACKERS = ["tensorboard", "mlflow"] if HAS_MLFLOW else ["tensorboard"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run's own local store
        cfg = load_config(None, [*TINY, f"output.report_to={','.join(TRACKERS)}"])
        return run_experiment(cfg, out=tmp_path_factory.mktemp("tracked") / "run", quiet=True)


def test_every_row_field_is_classified_for_dp(tracked_run):
    known = tracking.AGGREGATE_FIELDS | tracking.PER_CLIENT_FIELDS
    for row in read_metrics(tracked_run):
        assert set(row) <= known, set(row) - known
        assert len(row["global_adapter_sha256"]) == 64 and row["global_delta_norm"] > 0
        assert set(row["update_norms"]) == {str(c) for c in row["clients"]}


def test_tensorboard_holds_metrics_jsonl_row_for_row(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "tensorboard"))
    acc.Reload()
    rows = read_metrics(tracked_run)
    expected = {r["round"]: tracking.publishable(r, private=False) for r in rows}
    tags = set(acc.Tags()["scalars"])
    assert tags == set().union(*(set(m) for m in expected.values()))
    for tag in tags:
        got = {e.step: e.value for e in acc.Scalars(tag)}
        want = {step: m[tag] for step, m in expected.items() if tag in m}
        assert got.keys() == want.keys(), tag
        for step, value in want.items():  # event files keep float32
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install 'fedlora[mlflow]')")
def test_mlflow_run_holds_metrics_jsonl_row_for_row(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == tracked_run.name
    assert run.data.params["federation.rounds"] == "2" and run.data.params["strategy.name"] == "ffa"
    rows = read_metrics(tracked_run)
    expected = {r["round"]: tracking.publishable(r, private=False) for r in rows}
    assert set(run.data.metrics) == set().union(*(set(m) for m in expected.values()))
    for key in run.data.metrics:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == {step: m[key] for step, m in expected.items() if key in m}, key  # float64: exact


def test_verify_passes_then_fails_in_one_line_after_one_byte(tracked_run, tmp_path, capsys):
    from fedlora.models import load_exported_model
    from fedlora.verify import VerificationError

    run = tmp_path / "copy"
    shutil.copytree(tracked_run, run)
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("ok: ") and "2 kept rounds" in out and "\n" not in out

    weights = run / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert main(["verify", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "adapter_model.safetensors: SHA-256 differs" in err and "\n" not in err
    with pytest.raises(VerificationError, match="SHA-256 differs"):
        load_exported_model(run / "adapter")

    shutil.copy(tracked_run / "adapter" / "adapter_model.safetensors", weights)
    kept = run / "rounds" / "round-0001.safetensors"
    data = bytearray(kept.read_bytes())
    data[-3] ^= 0x01
    kept.write_bytes(bytes(data))
    assert main(["verify", str(run)]) == 2
    assert "round-0001.safetensors: digest differs from round 1" in capsys.readouterr().err
