"""Nothing lost after a kill: a `fedlora run` killed with SIGKILL at a random round and continued with
`fedlora resume` ends with the same adapter (1e-6), the same metrics and the same epsilon as a run that was
never interrupted. Plus the checkpoint file itself: atomic writes, damaged files, a round trip of its contents.

The real embedded MiniLM and data at tiny sizes; the killed run and the resume are real subprocesses.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora.engines import execute
from fedlora import checkpoint
from fedlora.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from fedlora.config import load_config
from fedlora.federated_run import Run
from fedlora.metrics import read_metrics
from fedlora.progress import RunProgress
from fedlora.runner import run_experiment
from fedlora.strategies import LoraFactors
from fedlora.verify_run import verify_run

TINY = [
    "federation.num_clients=3", "federation.local_steps=2", "federation.batch_size=8", "privacy.batch_size=8",
    "privacy.local_steps=2", "federation.partition=iid", "data.max_eval_examples=100", "data.max_length=32",
    "output.progress=false", "seed=7",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("FEDLORA_DEBUG", None)


# The reference runs in this process: one thread, as in the subprocesses (OMP_NUM_THREADS=1).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fedlora(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedlora.cli", *args], cwd=cwd, env=ENV,
                                stdout=fh, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def checkpoint_round(run_dir: Path) -> int:
    try:
        return int(load_checkpoint(run_dir / "checkpoint")["server"]["round"])
    except ValueError:  # not written yet
        return 0


def kill_at_round(run_dir: Path, overrides: list[str], rounds: int, tmp: Path) -> tuple[int, int]:
    """Start `fedlora run`, SIGKILL it once its checkpoint reaches a random round r in [1, rounds-1] (plus a
    random moment inside the next round). Returns (r, the checkpoint's round after the kill)."""
    r = random.randint(1, rounds - 1)
    proc = fedlora(["run", "--out", str(run_dir), *overrides], tmp, tmp / "killed.log")
    try:
        deadline = time.monotonic() + 300
        while checkpoint_round(run_dir) < r:
            assert proc.poll() is None, f"run ended before round {r}: {(tmp / 'killed.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint progress"
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.5))  # anywhere in round r+1: training, eval, metrics, checkpoint write
        assert proc.poll() is None, f"run finished before the kill (r={r})"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop(proc)
    at = checkpoint_round(run_dir)
    assert r <= at < rounds, (r, at)
    assert not (run_dir / "summary.json").exists()
    return r, at


def resume(run_dir: Path, tmp: Path) -> None:
    proc = fedlora(["resume", str(run_dir), "--quiet"], tmp, tmp / "resume.log")
    try:
        rc = proc.wait(timeout=400)
    finally:
        stop(proc)
    assert rc == 0, (tmp / "resume.log").read_text()[-3000:]


def assert_same_run(resumed: Path, reference: Path, rounds: int, context) -> None:
    a, b = load_file(resumed / "adapter" / "adapter_model.safetensors"), load_file(
        reference / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape
        assert np.max(np.abs(a[k].astype(np.float64) - b[k])) <= 1e-6, (k, context)
    rows, ref = read_metrics(resumed), read_metrics(reference)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1)), context  # each round exactly once
    # Digests, kept rounds and the adapter's manifest agree across the kill (the state came back exactly).
    assert verify_run(resumed).startswith("ok: "), context
    for x, y in zip(rows, ref):
        assert x["clients"] == y["clients"] and x["sampled"] == y["sampled"], context
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], abs=1e-6), (x["round"], context)
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-6), (x["round"], context)
        if "epsilon" in y:
            assert x["epsilon"] == pytest.approx(y["epsilon"], rel=1e-9), (x["round"], context)
    s, t = (json.loads((d / "summary.json").read_text()) for d in (resumed, reference))
    assert s["rounds"] == t["rounds"] == rounds
    if "final_epsilon" in t:
        assert s["final_epsilon"] == pytest.approx(t["final_epsilon"], rel=1e-9), context
    if "personal_accuracy" in t:
        assert s["personal_accuracy"] == pytest.approx(t["personal_accuracy"], abs=1e-9), context
        for c in range(3):  # every client's kept B after the last round it trained in
            from fedlora.client_state import CLIENT_STATE_DIR, ClientStateStore

            x, y = (ClientStateStore(d / CLIENT_STATE_DIR).load(c, rounds + 1) for d in (resumed, reference))
            assert sorted(x) == sorted(y), context
            for k in y:
                assert np.max(np.abs(x[k] - y[k])) <= 1e-6, (c, k, context)


CASES = {
    "plain": (4, ["output.keep_rounds=true"]),
    # Two of three clients a round and simulated failures: the sampler's RNG must continue where it stopped.
    # (Reproducible noise: the killed run is compared with a separate uninterrupted one, which must draw the same
    # noise; the default OS-entropy noise is checked by test_resume_is_exact_with_os_entropy_noise.)
    "sample-dp": (3, ["privacy.mode=sample", "privacy.epsilon=3", "federation.clients_per_round=2",
                      "privacy.reproducible_noise=true"]),
    "flora-base-deltas": (3, ["strategy.name=flora", "federation.dropout=0.3"]),
    # FedSA: each client's B lives only in its own state (client-state/), never in the server's checkpoint.
    "fedsa-personal-B": (3, ["strategy.name=fedsa", "federation.clients_per_round=2"]),
    # Top-k uploads: each client's error-feedback residual (ef/ in client-state/) and int8-style seeded rounding.
    "topk-error-feedback": (3, ["federation.compression=topk", "federation.clients_per_round=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_kill_and_resume_equals_an_uninterrupted_run(case, tmp_path):
    rounds, extra = CASES[case]
    overrides = TINY + [f"federation.rounds={rounds}"] + extra
    run_dir = tmp_path / "killed"
    # The run to kill (a subprocess) and the uninterrupted reference (here) at once: one thread each.
    killed: dict = {}

    def watch():
        try:
            killed["at"] = kill_at_round(run_dir, overrides, rounds, tmp_path)
        except BaseException as exc:  # re-raised in the test's thread
            killed["error"] = exc

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        reference = run_experiment(load_config(None, overrides), out=tmp_path / "reference", quiet=True)
    finally:
        watcher.join()
    if "error" in killed:
        raise killed["error"]
    r, at = killed["at"]
    if case == "sample-dp":
        assert json.loads((reference / "summary.json").read_text())["final_epsilon"] > 0
    if case == "flora-base-deltas":
        assert load_checkpoint(reference / "checkpoint")["server"]["base_delta"], "FLoRA merges into the base"

    resume(run_dir, tmp_path)
    assert_same_run(run_dir, reference, rounds, f"{case}: killed after checkpoint round {at} (aimed at {r})")

    if case == "plain":
        # Killed after the last round's checkpoint, before the adapter and summary: resume only exports.
        cut = tmp_path / "cut"
        (cut / "checkpoint").mkdir(parents=True)
        (cut / "rounds").mkdir()
        kept = [f"rounds/round-{r:04d}.safetensors" for r in range(1, rounds + 1)]
        for name in ("config.toml", "metrics.jsonl", f"checkpoint/{CHECKPOINT_FILE}", *kept):
            (cut / name).write_bytes((reference / name).read_bytes())
        execute(Run.resume(cut, RunProgress(enabled=False)))
        assert_same_run(cut, reference, rounds, "resumed from the final checkpoint")


@pytest.mark.slow
def test_flower_sim_killed_and_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """engine=flower-sim with sample-level DP: SIGKILL the whole simulation (ServerApp, Ray and its actors)
    after a checkpoint; `fedlora resume` starts a new simulation whose nodes hold nothing, and still ends with
    the same adapter and epsilon. Reproducible noise: the uninterrupted reference is another run, and with OS
    entropy a node that lost its state (as these do) rightly continues with fresh noise of its own."""
    from flower_procs import TAG_VAR, ProcessTag

    rounds = 2
    overrides = TINY + [f"federation.rounds={rounds}", "engine=flower-sim", "strategy.name=fedit",
                        "privacy.mode=sample", "privacy.epsilon=3", "privacy.reproducible_noise=true"]
    tag = ProcessTag()  # the killed run's Ray processes are orphaned by SIGKILL: stopped by pid below
    monkeypatch.setitem(ENV, TAG_VAR, tag.value)
    run_dir = tmp_path / "killed"
    try:
        r, at = kill_at_round(run_dir, overrides, rounds, tmp_path)
        tag.stop_all()
        reference = run_experiment(load_config(None, overrides), out=tmp_path / "reference", quiet=True)
        resume(run_dir, tmp_path)
    finally:
        tag.stop_all()
    assert json.loads((reference / "summary.json").read_text())["final_epsilon"] > 0
    assert_same_run(run_dir, reference, rounds, f"flower-sim: killed after checkpoint round {at} (aimed at {r})")


# -- the checkpoint file -------------------------------------------------------------------------------------


def nested_state() -> dict:
    rng = np.random.default_rng(0)
    f = LoraFactors(A=rng.normal(size=(4, 6)), B=rng.normal(size=(5, 4)).astype(np.float32), scale=0.5)
    return {
        "round": 3,
        "fresh": False,
        "name": "flora ✓",
        "nothing": None,
        "eps": float("inf"),
        "scalar": np.float32(1.25),
        "ids": [np.int64(2), 5],
        "rng": np.random.default_rng([7, 1]).bit_generator.state,  # 128-bit ints
        "downlinks": {4: {"q": f, "v": f}, 8: {}},
        "privacy": {np.int64(0): {"history": [[1.1, 0.25, 2]], "epsilon": 0.7}, 2: {"history": []}},
        "mixed": {1: "a", "b": [np.zeros((0, 3)), np.array(3.0), np.array([True, False])]},
        "head": {"classifier.weight": rng.normal(size=(2, 3)).astype(np.float32)},
        "nested": [{"x": (1, 2)}, [np.arange(4, dtype=np.int64)]],
    }


def assert_equal_tree(a, b, path="state"):
    if isinstance(b, LoraFactors):
        assert isinstance(a, LoraFactors) and a.scale == b.scale, path
        assert_equal_tree(a.A, b.A, path + ".A")
        assert_equal_tree(a.B, b.B, path + ".B")
    elif isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, path
        assert np.array_equal(a, b), path
    elif isinstance(b, dict):
        assert isinstance(a, dict), path
        assert sorted(map(str, a)) == sorted(map(str, b)), path
        assert all(type(k) is int for k in a if not isinstance(k, str)), path
        for k in b:
            assert_equal_tree(a[int(k) if isinstance(k, np.integer) else k], b[k], f"{path}[{k!r}]")
    elif isinstance(b, (list, tuple)):
        assert isinstance(a, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{path}[{i}]")
    elif isinstance(b, np.generic):
        assert a == b.item(), path
    else:
        assert a == b and type(a) is type(b), path


def test_checkpoint_round_trip_of_nested_state(tmp_path):
    state = nested_state()
    save_checkpoint(tmp_path, state)
    back = load_checkpoint(tmp_path)
    assert_equal_tree(back, state)
    gen = np.random.default_rng()
    gen.bit_generator.state = back["rng"]
    assert gen.random() == np.random.default_rng([7, 1]).random()  # the sampler continues where it stopped


def test_a_truncated_temp_file_leaves_the_previous_checkpoint_loadable(tmp_path):
    save_checkpoint(tmp_path, nested_state())
    good = (tmp_path / CHECKPOINT_FILE).read_bytes()
    tmp = tmp_path / f".{CHECKPOINT_FILE}.tmp"
    tmp.write_bytes(good[: len(good) // 3])  # a kill in the middle of the next write
    assert_equal_tree(load_checkpoint(tmp_path), nested_state())
    save_checkpoint(tmp_path, {"round": 4})  # the next save overwrites the leftover
    assert load_checkpoint(tmp_path) == {"round": 4} and not tmp.exists()


def test_a_kill_before_the_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"round": 1, "w": np.ones(3)})

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between the fsync and the rename

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"round": 2, "w": np.zeros(3)})
    monkeypatch.undo()
    back = load_checkpoint(tmp_path)
    assert back["round"] == 1 and np.array_equal(back["w"], np.ones(3))


@pytest.mark.parametrize("cut", [0, 10, 0.5, -5])
def test_a_damaged_checkpoint_is_one_clear_error(tmp_path, cut):
    save_checkpoint(tmp_path, nested_state())
    data = (tmp_path / CHECKPOINT_FILE).read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    (tmp_path / CHECKPOINT_FILE).write_bytes(data[:n])
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_resume_of_a_damaged_checkpoint_is_one_line(tmp_path, capsys):
    from fedlora.cli import main

    (tmp_path / "config.toml").write_text(load_config(None, TINY).to_toml())
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["resume", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable" in err


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["client", "sample"])
def test_resume_is_exact_with_os_entropy_noise(mode, tmp_path):
    """Default noise (OS entropy): nobody can rerun the config to get the same noise, so the uninterrupted run
    itself is the reference. Its folder is copied right after round 1's checkpoint (what a kill then leaves) and
    the copy resumed: the generators' state in the checkpoint makes the rest identical (adapter to 1e-6, same
    epsilon). (That two runs of one config add different noise is measured on the server's path in
    test_client_dp_invariants.py.)"""
    import shutil

    import fedlora

    rounds = 2
    overrides = TINY + [f"federation.rounds={rounds}", f"privacy.mode={mode}", "privacy.epsilon=8"] + (
        ["federation.num_clients=6", "federation.clients_per_round=3", "privacy.clip=0.5"] if mode == "client" else [])
    cfg = load_config(None, overrides)
    snapshot = tmp_path / "after-round-1"

    def keep_round_1(row):
        if row["round"] == 1:
            shutil.copytree(tmp_path / "reference", snapshot)

    reference = fedlora.run(cfg, out=tmp_path / "reference", callbacks=[keep_round_1]).run_dir
    (snapshot / "summary.json").unlink(missing_ok=True)
    fedlora.resume(snapshot)
    assert_same_run(snapshot, reference, rounds, f"{mode}: resumed after round 1")
