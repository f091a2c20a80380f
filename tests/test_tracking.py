"""Experiment trackers without a model: what a row publishes under DP, the refusal when a tracker is missing,
and rows read back with TensorBoard's own reader (live writer and `fedlora export-metrics` replay)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from fedlora import tracking
from fedlora.cli import main
from fedlora.config import ConfigError, load_config
from fedlora.errors import UserError
from fedlora.metrics import MetricsWriter, read_metrics

ROW = {
    "round": 1, "strategy": "ffa", "clients": [0, 2], "sampled": [0, 1, 2], "dropped": [1],
    "dropped_reasons": {"1": "dropped out"}, "rejected": {}, "ranks": {"0": 8, "2": 4},
    "train_loss": 0.61, "eval_loss": 0.55, "eval_accuracy": 0.7, "bytes_up": 1000, "wall_s": 2.5,
    "update_norms": {"0": 1.25, "2": 0.5}, "global_adapter_sha256": "ab" * 32, "global_delta_norm": 3.5,
    "epsilon": 1.5, "delta": 1e-5, "privacy": "client", "accountant": "rdp", "secure_aggregation": True,
    "eval_nan": None, "some_new_field": 4.0,
}


def test_under_dp_only_aggregate_fields_are_published():
    out = tracking.publishable(ROW, private=True)
    assert out == {"eval_loss": 0.55, "eval_accuracy": 0.7, "global_delta_norm": 3.5, "epsilon": 1.5,
                   "delta": 1e-5, "secure_aggregation": 1.0}
    # A field nobody classified yet is treated as per-client (fail closed).
    assert "some_new_field" not in out


def test_per_client_fields_flattened_when_asked_or_without_dp():
    for out in (tracking.publishable(ROW, private=True, per_client=True), tracking.publishable(ROW, private=False)):
        assert out["train_loss"] == 0.61 and out["update_norms/0"] == 1.25 and out["ranks/2"] == 4.0
        assert out["some_new_field"] == 4.0 and out["wall_s"] == 2.5
        # text, lists, nulls and the step itself are not metrics
        assert not {"strategy", "clients", "dropped", "eval_nan", "round", "dropped_reasons/1"} & set(out)


def test_every_listed_field_is_classified_once():
    assert not tracking.AGGREGATE_FIELDS & tracking.PER_CLIENT_FIELDS


def test_config_takes_known_trackers_only():
    assert load_config(None, ["output.report_to=tensorboard,mlflow"]).output.report_to == ["tensorboard", "mlflow"]
    assert load_config(None, []).output.report_to == []  # nothing opened by default
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        load_config(None, ["output.report_to=comet"])


class _Absent(tracking.Tracker):
    name, modules, extra = "absent-tracker", ("fedlora_test_no_such_module",), "absent"


def test_a_missing_tracker_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.TRACKERS, "absent-tracker", _Absent)
    with pytest.raises(UserError) as exc:
        tracking.TrackerSet(["absent-tracker"], tmp_path, {})
    assert str(exc.value) == ("output.report_to includes 'absent-tracker' but fedlora_test_no_such_module is not "
                              "installed: pip install 'fedlora[absent]'")
    for name in ("wandb", "trackio"):  # optional extras that the test install leaves out
        if importlib.util.find_spec(name) is None:
            with pytest.raises(UserError, match=rf"pip install 'fedlora\[{name}\]'"):
                tracking.TrackerSet([name], tmp_path, {})


def _scalars(logdir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _rows(n):
    rng = np.random.default_rng(0)
    return [{**ROW, "round": r, "train_loss": float(rng.random()), "eval_accuracy": float(rng.random()),
             "epsilon": float(r), "update_norms": {"0": float(rng.random())}} for r in range(1, n + 1)]


def _write_run(run_dir, overrides, rows):
    cfg = load_config(None, [f"federation.rounds={len(rows)}", *overrides])
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(cfg.to_toml())
    writer = MetricsWriter(run_dir, cfg=cfg)
    for row in rows:
        writer.write(row)
    return cfg


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_gets_the_rows_and_withholds_per_client_fields_under_dp(tmp_path):
    rows = _rows(3)
    _write_run(tmp_path / "dp", ["privacy.mode=client", "privacy.noise_multiplier=1.0", "output.report_to=tensorboard"],
               rows)
    got = _scalars(tmp_path / "dp" / "tensorboard")
    assert set(got) == set(tracking.publishable(rows[0], private=True))
    for r in rows:  # TensorBoard keeps float32
        assert got["eval_accuracy"][r["round"]] == pytest.approx(r["eval_accuracy"], rel=1e-6)
        assert got["epsilon"][r["round"]] == r["epsilon"]

    _write_run(tmp_path / "asked", ["privacy.mode=client", "privacy.noise_multiplier=1.0",
                                    "output.report_to=tensorboard", "output.report_per_client=true"], rows)
    got = _scalars(tmp_path / "asked" / "tensorboard")
    assert [got["train_loss"][r["round"]] for r in rows] == pytest.approx([r["train_loss"] for r in rows], rel=1e-6)
    assert got["update_norms/0"][2] == pytest.approx(rows[1]["update_norms"]["0"], rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_export_metrics_replays_a_run_into_tensorboard(tmp_path, capsys):
    rows = _rows(4)
    _write_run(tmp_path / "run", [], rows)  # logged to no tracker while it ran
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert main(["export-metrics", str(tmp_path / "run"), "--to", "tensorboard"]) == 0
    assert "4 rounds" in capsys.readouterr().out
    got = _scalars(tmp_path / "run" / "tensorboard")
    for r in read_metrics(tmp_path / "run"):
        for key, value in tracking.publishable(r, private=False).items():
            assert got[key][r["round"]] == pytest.approx(value, rel=1e-6), key
    # Replayed twice: the second replay hides the first one's events (the same step once per tag).
    assert main(["export-metrics", str(tmp_path / "run"), "--to", "tensorboard"]) == 0
    assert sorted(_scalars(tmp_path / "run" / "tensorboard")["eval_accuracy"]) == [1, 2, 3, 4]


def test_export_metrics_refuses_what_is_not_a_run(tmp_path, capsys):
    assert main(["export-metrics", str(tmp_path), "--to", "tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlora: error: not a run folder") and "\n" not in err
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ROW) + "\n")
    (tmp_path / "config.toml").write_text("")
    assert main(["export-metrics", str(tmp_path), "--to", "comet"]) == 2
    assert "unknown tracker 'comet'" in capsys.readouterr().err
