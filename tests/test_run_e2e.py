"""End to end on the real embedded model and data, with tiny sizes: run folder, adapter reload, determinism,
FFA freezing, bytes on the wire; the run's trackers read back with their own readers, `fedlora verify`."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from fedlora import lora, tracking
from fedlora.cli import main
from fedlora.client import ClientTrainer, evaluate
from fedlora.config import load_config
from fedlora.federated_run import build_strategy
from fedlora.experiment import prepare_data
from fedlora.metrics import read_metrics
from fedlora.host import ModelHost, load_tokenizer
from fedlora.runner import run_experiment
from fedlora.server import Server

pytestmark = pytest.mark.slow  # every test trains, or loads, the real embedded model

TINY = [
    "federation.num_clients=3",
    "federation.rounds=2",
    "federation.local_steps=3",
    "data.max_eval_examples=200",
    "data.max_length=32",
    "output.progress=false",
]
NONDETERMINISTIC = {"wall_s", "train_s", "samples_per_s"}  # timings


def _test_batches(test, size: int = 64):
    """The held-out set in order, collated as the evaluator does."""
    from fedlora.client import collate

    for s in range(0, len(test), size):
        yield collate(test, np.arange(s, min(s + size, len(test))), 0)


# The module's one run also logs to the trackers and keeps every round (read back and verified below).
HAS_MLFLOW = all(importlib.util.find_spec(m) for m in tracking.TRACKERS["mlflow"].modules)
TRACKED = ["output.keep_rounds=true", "output.report_to=" + ("tensorboard,mlflow" if HAS_MLFLOW else "tensorboard")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run's own local store
        cfg = load_config(None, TINY + TRACKED)
        return cfg, run_experiment(cfg, out=tmp_path_factory.mktemp("run") / "a", quiet=True)


def test_run_folder_has_everything(tiny_run):
    _, run_dir = tiny_run
    for name in ["config.toml", "metrics.jsonl", "summary.json", "plots/accuracy.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoint/state.npz"]:
        assert (run_dir / name).exists(), name
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        for key in ["round", "strategy", "clients", "train_loss", "eval_loss", "eval_accuracy", "bytes_up",
                    "bytes_down", "wall_s", "samples_per_s"]:
            assert r[key] is not None, key
        assert np.isfinite(r["train_loss"]) and 0.0 <= r["eval_accuracy"] <= 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_accuracy"] == rows[-1]["eval_accuracy"]
    assert summary["train_samples_per_s"] > 0


def test_ffa_uploads_exactly_half_of_fedit_plus_head(tiny_run):
    cfg, run_dir = tiny_run
    row = read_metrics(run_dir)[0]
    # 12 square 384x384 q/v modules at rank 8, float32, per client; FFA sends B only.
    n_clients = len(row["clients"])
    lora_b_only = 12 * 384 * 8 * 4 * n_clients
    assert row["bytes_up"] - row["bytes_up_head"] == lora_b_only
    assert row["bytes_up_head"] == (2 * 384 + 2) * 4 * n_clients


def test_adapter_reload_reproduces_final_accuracy(tiny_run):
    from peft import PeftModel

    from fedlora.host import load_base_model, load_exported_model

    cfg, run_dir = tiny_run
    data = prepare_data(cfg, load_tokenizer(cfg.model.name))
    # A different head init: the adapter must carry the head.
    base = load_base_model(cfg.model.name, 2, seed=12345, pooling=cfg.model.pooling)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    model.eval()
    exported = load_exported_model(run_dir / "adapter")  # the same, from fedlora.json alone
    correct = 0
    with torch.inference_mode():
        for batch in _test_batches(data.test):
            logits = model(**batch).logits
            torch.testing.assert_close(exported(**batch).logits, logits)
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    final = read_metrics(run_dir)[-1]["eval_accuracy"]
    assert abs(correct / len(data.test) - final) <= 0.005


def test_same_seed_same_metrics(tiny_run, tmp_path):
    cfg, run_dir = tiny_run
    again = run_experiment(cfg, out=tmp_path / "b", quiet=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in NONDETERMINISTIC} for r in rows]  # noqa: E731
    assert strip(read_metrics(again)) == strip(read_metrics(run_dir))


def test_ffa_freezes_A_bit_identical_across_clients():
    cfg = load_config(None, TINY + ["federation.ranks=[4,8]"])
    data = prepare_data(cfg, load_tokenizer(cfg.model.name))
    host = ModelHost(cfg, len(data.label_names), set(cfg.client_ranks()))
    dims = lora.module_dims(host.model)
    strategy = build_strategy(cfg, dims)
    trainer = ClientTrainer(cfg, host, strategy)
    server = Server(cfg, strategy, dims, lora.get_head(host.model, "r8"), [len(c) for c in data.clients])
    updates = [trainer.train(c, server.downlink(c), data.clients[c]) for c in range(3)]
    init8 = lora.initial_factors(cfg.seed, dims, 8, cfg.lora.scale(8))
    for u in updates:
        for name, f in u.factors.items():
            # A never moves, and every client's A is the prefix of one seeded A_max, bit for bit.
            assert np.array_equal(f.A, init8[name].A[: u.rank])
        assert any(np.abs(f.B).max() > 0 for f in u.factors.values())  # B did train
    outcome = server.finish_round(updates, [0, 1, 2])
    assert outcome.trained == [0, 1, 2] and not outcome.rejected
    # The global model is exactly the weighted mean of the clients' products (FFA is exact).
    w = np.array([u.num_examples for u in updates], float)
    w /= w.sum()
    _, global_factors = server.global_eval_factors()
    for name in dims:
        exact = sum(p * u.factors[name].delta().astype(np.float64) for p, u in zip(w, updates))
        np.testing.assert_allclose(global_factors[name].delta(), exact, rtol=1e-5, atol=1e-7)
    # Evaluation runs on the global adapter.
    lora.set_factors(host.model, "r8", lora.with_scale(global_factors, cfg.lora.scale(8)))
    loss, acc = evaluate(host, "r8", data.test, 64)
    assert np.isfinite(loss) and 0.0 <= acc <= 1.0


def test_frozen_head_is_never_trained_or_sent_and_reloads(tmp_path):
    """lora.train_head=false: only LoRA learns, no head bytes on the wire, the export rebuilds the seeded head."""
    from fedlora.host import load_base_model, load_exported_model

    cfg = load_config(None, TINY + ["lora.train_head=false", "seed=7"])
    run_dir = run_experiment(cfg, out=tmp_path / "frozen", quiet=True)
    rows = read_metrics(run_dir)
    assert all(r["bytes_up_head"] == 0 for r in rows)
    assert rows[0]["bytes_up"] == 12 * 384 * 8 * 4 * len(rows[0]["clients"])  # LoRA B only

    host = ModelHost(cfg, 2, {8})
    assert not any(".modules_to_save." in n for n, _ in host.model.named_parameters())
    trainable = host.activate(8, train_A=False)
    assert trainable and all("lora_B" in n for n, p in host.model.named_parameters() if p.requires_grad)

    exported = load_exported_model(run_dir / "adapter")
    init = load_base_model(cfg.model.name, 2, seed=7, pooling=cfg.model.pooling)
    head = exported.base_model.model.classifier.named_parameters()
    for (n, p), (_, q) in zip(head, init.classifier.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)  # the head is its seeded init, untouched
    assert any(float(p.abs().max()) > 0 for n, p in exported.named_parameters() if "lora_B" in n)  # LoRA learned

    data = prepare_data(cfg, load_tokenizer(cfg.model.name))
    with torch.inference_mode():
        correct = sum(int((exported(**b).logits.argmax(-1) == b["labels"]).sum()) for b in _test_batches(data.test))
    assert abs(correct / len(data.test) - rows[-1]["eval_accuracy"]) <= 0.005


def test_every_row_field_is_classified_for_dp(tiny_run):
    _, tracked_run = tiny_run
    known = tracking.AGGREGATE_FIELDS | tracking.PER_CLIENT_FIELDS
    for row in read_metrics(tracked_run):
        assert set(row) <= known, set(row) - known
        assert len(row["global_adapter_sha256"]) == 64 and row["global_delta_norm"] > 0
        assert set(row["update_norms"]) == {str(c) for c in row["clients"]}


def test_tensorboard_holds_metrics_jsonl_row_for_row(tiny_run):
    _, tracked_run = tiny_run
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
def test_mlflow_run_holds_metrics_jsonl_row_for_row(tiny_run):
    _, tracked_run = tiny_run
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


def test_verify_passes_then_fails_in_one_line_after_one_byte(tiny_run, tmp_path, capsys):
    from fedlora.host import load_exported_model
    from fedlora.verify import VerificationError

    _, tracked_run = tiny_run
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
