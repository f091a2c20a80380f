"""`fedlora audit` end to end (issue 27): one audited client-DP run with canary clients on the embedded MiniLM.
Without noise (clip on) the canaries are found and the lower bound is near what the guesses allow; at the
default client-DP settings with epsilon = 3 the lower bound stays at or below the accountant's epsilon."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlora.audit import audit
from fedlora.audit.stats import epsilon_from_guesses
from fedlora.cli import main
from fedlora.metrics import read_metrics

TINY = ["privacy.mode=client", "federation.num_clients=4", "federation.rounds=2", "federation.local_steps=1",
        "data.max_eval_examples=50", "data.max_length=32", "output.progress=false"]


@pytest.mark.slow
def test_without_noise_the_canaries_are_found(tmp_path, one_torch_thread):
    # q = 1: every inserted canary is in every round, so every one of them is in the final model.
    result = audit(None, overrides=[*TINY, "privacy.noise_multiplier=0", "federation.clients_per_round=4"],
                   canaries=100, out=tmp_path / "a")
    rep = result.report
    lb, c = rep["epsilon_lower_bound"], rep["canaries"]
    assert c["inserted"] + c["unseen"] == 100 and c["inserted_ever_sampled"] == c["inserted"]
    assert lb["correct"] == lb["guesses"] >= 50  # every guess right
    assert lb["epsilon"] == pytest.approx(epsilon_from_guesses(100, lb["guesses"], lb["guesses"], rep["delta"],
                                                               1 - 0.05 / 6), rel=1e-6)
    assert lb["epsilon"] > 2.0
    for name in ["report.md", "audit.json", "scores.png"]:
        assert (result.audit_dir / name).is_file(), name
    assert json.loads((result.audit_dir / "audit.json").read_text())["canaries"]["total"] == 100
    assert not (tmp_path / "a" / "adapter").exists()  # the audited run exports no adapter
    rows = read_metrics(tmp_path / "a")
    assert all(int(c) < 4 for r in rows for c in (r.get("rejected") or {}))  # no canary was refused
    assert max(r["audit_canaries_sampled"] for r in rows) == c["inserted"]


@pytest.mark.slow
def test_at_epsilon_3_the_lower_bound_stays_below_the_accountant(tmp_path, one_torch_thread):
    result = audit(None, overrides=[*TINY, "privacy.epsilon=3", "federation.clients_per_round=2"], canaries=200,
                   out=tmp_path / "b")
    rep = result.report
    assert rep["epsilon_accountant"] == pytest.approx(3.0, rel=0.05)
    assert rep["epsilon_lower_bound"]["epsilon"] <= rep["epsilon_accountant"]
    assert rep["epsilon_lower_bound_all_iterates"]["epsilon"] <= rep["epsilon_accountant"]
    assert np.isfinite(rep["epsilon_one_shot"]["epsilon"])


@pytest.mark.parametrize("args,message", [
    (["privacy.epsilon=3"], "privacy.mode=client or privacy.mode=sample"),
    (["privacy.mode=sample", "privacy.epsilon=3", "engine=flower-sim"], "engine=local"),
    (["privacy.mode=client", "privacy.epsilon=3", "privacy.secure_aggregation=true"], "secure_aggregation"),
    (["privacy.mode=client", "privacy.epsilon=3", "--canaries", "1"], "at least 2"),
    (["privacy.mode=client", "privacy.epsilon=3", "--confidence", "1.5"], "confidence"),
])
def test_audit_refuses_what_it_cannot_audit_in_one_line(args, message, capsys):
    assert main(["audit", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
