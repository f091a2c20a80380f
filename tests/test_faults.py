"""Client dropout and bad updates: the run goes on without them, names them in metrics.jsonl, charges privacy
only to clients that trained, and stops with one clear line when fewer than min_clients valid updates remain.

In-process (fedlora.Run on engine=local), the real embedded MiniLM and rotten_tomatoes data at tiny sizes. Bad updates are
injected where the local engine hands the round's trained updates to the server (`LocalTransport._trained`, which
both the batched and the one-by-one path feed), corrupting chosen clients' updates in chosen rounds.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from fedlora.engines import execute
from fedlora.checkpoint import load_checkpoint, save_checkpoint
from fedlora.cli import main
from fedlora.client import Update
from fedlora.config import RoundFailed, load_config
from fedlora.engines.local import LocalTransport
from fedlora.federated_run import Run
from fedlora.metrics import read_metrics
from fedlora.progress import RunProgress
from fedlora.strategies import LoraFactors

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # the real model, in-process

TINY = [
    "federation.local_steps=2", "federation.batch_size=8", "privacy.batch_size=8", "privacy.local_steps=2",
    "data.max_eval_examples=100", "data.max_length=32", "output.progress=false", "output.save_adapter=false", "federation.partition=iid",
]



def local_run(tmp_path, *overrides: str) -> Run:
    cfg = load_config(None, TINY + list(overrides))
    return Run(cfg, tmp_path, RunProgress(enabled=False))


# -- dropout -------------------------------------------------------------------------------------------------


def test_dropout_run_completes_and_charges_epsilon_only_to_clients_that_trained(tmp_path):
    run = local_run(tmp_path, "federation.num_clients=5", "federation.rounds=3", "federation.dropout=0.3",
                    "privacy.mode=sample", "privacy.epsilon=3")
    summary = execute(run)
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2, 3] and summary["rounds"] == 3
    trained_rounds = {c: 0 for c in range(5)}
    for r in rows:
        assert set(r["dropped"]).isdisjoint(r["clients"])
        assert sorted(r["dropped"] + r["clients"]) == r["sampled"]  # nothing rejected here: all accounted for
        assert r["rejected"] == {}
        for c in r["clients"]:
            trained_rounds[c] += 1
    assert sum(len(r["dropped"]) for r in rows) > 0, "seed chosen so that clients drop out"

    steps = run.cfg.local_steps()
    state = load_checkpoint(tmp_path / "checkpoint")
    for reports in (run.server.privacy, state["server"]["privacy"]):
        charged = {int(c): rep["dp_steps"] for c, rep in reports.items()}
        assert charged == {c: n * steps for c, n in trained_rounds.items() if n > 0}
    # The accountants the clients keep for the whole run agree with what the server recorded.
    for c, dp in state["transport"]["client_privacy"].items():
        assert sum(n for _, _, n in dp["accountant"]["history"]) == trained_rounds[c] * steps, c
    # The reported epsilon is the largest over clients that trained, and nobody else has any.
    eps = {c: rep["epsilon"] for c, rep in run.server.privacy.items()}
    assert rows[-1]["epsilon"] == pytest.approx(max(eps.values()))
    assert 0 < rows[-1]["epsilon"] <= 3.0 + 1e-9


def test_dropout_below_min_clients_stops_with_one_line_naming_the_dropped(tmp_path):
    run = local_run(tmp_path, "federation.num_clients=3", "federation.rounds=2", "federation.min_clients=3",
                    "federation.dropout=0.5")
    run.server.draw_dropouts = lambda sampled: {1}  # deterministic: client 1 fails in round 1
    save_checkpoint(tmp_path / "checkpoint", {"server": {"round": 5}})  # left by another run in this folder
    with pytest.raises(RoundFailed) as err:
        execute(run)
    msg = str(err.value)
    assert "\n" not in msg and "only 2 valid updates" in msg and "min_clients=3" in msg
    assert "client 1: dropped out" in msg
    assert read_metrics(tmp_path) == []  # nothing half-written
    assert not (tmp_path / "checkpoint" / "state.npz").exists()  # and no stale state to resume into this run


# -- bad updates ---------------------------------------------------------------------------------------------


def _first(factors: dict[str, LoraFactors]) -> str:
    return sorted(factors)[0]


def nan_in_B(u: Update) -> Update:
    name = _first(u.factors)
    B = u.factors[name].B.copy()
    B[0, 0] = np.nan
    return replace(u, factors={**u.factors, name: replace(u.factors[name], B=B)})


def inf_in_head(u: Update) -> Update:
    name = sorted(u.head)[0]
    h = u.head[name].copy()
    h.flat[0] = np.inf
    return replace(u, head={**u.head, name: h})


def wrong_shape(u: Update) -> Update:
    name = _first(u.factors)
    f = u.factors[name]
    return replace(u, factors={**u.factors, name: replace(f, A=np.pad(f.A, ((0, 0), (0, 3))))})


def huge_norm(u: Update) -> Update:
    return replace(u, factors={n: replace(f, B=f.B + 1e3) for n, f in u.factors.items()})


def rank_above(u: Update) -> Update:
    return replace(u, factors={n: replace(f, A=np.pad(f.A, ((0, 4), (0, 0))), B=np.pad(f.B, ((0, 0), (0, 4))))
                               for n, f in u.factors.items()})


def wrong_modules(u: Update) -> Update:
    factors = dict(u.factors)
    name = _first(factors)
    factors["bert.encoder.layer.0.attention.self.key"] = factors.pop(name)
    return replace(u, factors=factors)


def lies_about_rank(u: Update) -> Update:
    return replace(u, rank=u.rank * 2)  # factors of rank 8 fit under 16, but 16 is not the client's rank


HONEST_TRAINED = LocalTransport._trained  # captured once: a second `corrupt` replaces the first plan, not stacks


def corrupt(monkeypatch, plan: dict[tuple[int, int], callable]) -> None:
    """Clients whose update of (round, client) `plan` corrupts after training for real; the rest are honest.
    Patched on the transport, so it holds whether the round's clients trained batched or one by one."""
    def _trained(self, run, clients):
        for c, down, out in HONEST_TRAINED(self, run, clients):
            bad = plan.get((down.round, c))
            yield c, down, (bad(out) if bad and not isinstance(out, str) else out)

    monkeypatch.setattr(LocalTransport, "_trained", _trained)


REASONS = {
    nan_in_B: "non-finite values",
    inf_in_head: "head",
    wrong_shape: "expected A",
    huge_norm: "above the bound",
    rank_above: "above the client's rank",
    wrong_modules: "wrong module set",
    lies_about_rank: "differs from the client's assigned rank",
}


def test_bad_updates_are_rejected_with_their_reason_and_the_run_completes(tmp_path, monkeypatch):
    run = local_run(tmp_path, "federation.num_clients=3", "federation.rounds=3", "federation.max_update_norm=100")
    plan = {
        (1, 0): nan_in_B, (1, 1): inf_in_head,
        (2, 0): wrong_shape, (2, 2): huge_norm,
        (3, 1): rank_above, (3, 2): wrong_modules, (3, 0): lies_about_rank,
    }
    corrupt(monkeypatch, plan)
    with pytest.raises(RoundFailed, match=r"round 3: only 0 valid updates"):
        execute(run)  # round 3 corrupts all three clients: min_clients=1 cannot be met
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        expected = {str(c): REASONS[fn] for (rnd, c), fn in plan.items() if rnd == r["round"]}
        assert set(r["rejected"]) == set(expected)
        for c, fragment in expected.items():
            assert fragment in r["rejected"][c], (r["round"], c, r["rejected"][c])
        assert sorted(r["clients"]) == sorted(set(r["sampled"]) - {int(c) for c in expected})
        assert math.isfinite(r["eval_loss"])
    assert load_checkpoint(tmp_path / "checkpoint")["server"]["round"] == 2
    # The global state that went on is finite: no bad update leaked into it.
    assert all(np.isfinite(h).all() for h in run.server.head.values())
    assert all(np.isfinite(f.B).all() for f in run.server.global_eval_factors()[1].values())

    # Round 3 again, with one corrupt client only: rejected, named, and the run completes.
    plan3 = {(3, 1): rank_above}
    corrupt(monkeypatch, plan3)
    resumed = Run.resume(tmp_path, RunProgress(enabled=False), cfg=run.cfg)
    execute(resumed)
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert set(rows[-1]["rejected"]) == {"1"} and REASONS[rank_above] in rows[-1]["rejected"]["1"]
    assert sorted(rows[-1]["clients"]) == [0, 2]


def test_too_few_valid_updates_is_one_line_and_exit_2_from_the_cli(tmp_path, monkeypatch):
    """Through `fedlora run`: round 2 leaves one valid update of three with min_clients=2."""
    corrupt(monkeypatch, {(2, 1): nan_in_B, (2, 2): nan_in_B})
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["run", "--out", str(tmp_path / "run"), *TINY, "federation.num_clients=3", "federation.rounds=2",
                   "federation.min_clients=2"])
    assert rc == 2
    line = err.getvalue()
    assert line.count("\n") == 1 and line.startswith("fedlora: error: round 2: only 1 valid updates")
    assert "min_clients=2" in line and "client 1: module" in line and "Traceback" not in line
    assert [r["round"] for r in read_metrics(tmp_path / "run")] == [1]

    # Nothing lost: once the clients behave, `fedlora resume` finishes the run from round 1's checkpoint.
    monkeypatch.setattr(LocalTransport, "_trained", HONEST_TRAINED)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["resume", str(tmp_path / "run"), "--quiet"]) == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["clients"] == [0, 1, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 2


@pytest.mark.parametrize("clipping", ["flat", "group"])
def test_sample_dp_run_logs_epsilon_an_independent_accountant_reproduces(tmp_path, clipping):
    from opacus.accountants import RDPAccountant

    run = local_run(tmp_path, "federation.num_clients=3", "federation.rounds=3", "privacy.mode=sample",
                    "privacy.epsilon=3", "privacy.batch_size=12", "privacy.local_steps=1",
                    f"privacy.clipping={clipping}")
    summary = execute(run)
    rows = read_metrics(tmp_path)
    assert len(rows) == 3
    for r in rows:
        assert {"epsilon", "delta", "noise_multiplier", "sample_rate", "dp_steps", "accountant"} <= set(r)
        assert r["dp_steps"] == r["round"] * run.cfg.local_steps()
        ref = RDPAccountant()
        ref.history = [(r["noise_multiplier"], r["sample_rate"], r["dp_steps"])]
        assert ref.get_epsilon(r["delta"]) == pytest.approx(r["epsilon"], rel=1e-3)
    sizes = {p["client"]: p["size"] for p in summary["partition"]}
    assert rows[-1]["sample_rate"] == pytest.approx(12 / sizes[rows[-1]["epsilon_client"]])
    # Calibrated for all rounds once: the budget is used up, not overshot and not wasted.
    assert 0.97 * 3.0 <= rows[-1]["epsilon"] <= 3.0
    assert all(np.isfinite(r["train_loss"]) for r in rows)
