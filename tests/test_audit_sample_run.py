"""`fedlora audit privacy.mode=sample` end to end (issue 27): white-box gradient canaries in client 0's DP-SGD and
mislabelled-sentence canaries in its data, on the embedded MiniLM and a small generated csv. Without noise
(clipping on) the white-box bound is near the ceiling its guesses allow; at epsilon = 3 every bound stays at or
below client 0's accountant."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlora.audit import audit
from fedlora.audit.stats import one_run_epsilon_lower_bound
from fedlora.metrics import read_metrics

WORDS = {0: ["dull", "boring", "weak", "flat", "tired", "bland"], 1: ["great", "fun", "sharp", "warm", "bold", "rich"]}


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for i in range(120):
        label = i % 2
        words = rng.choice(WORDS[label], 4).tolist() + rng.choice(WORDS[1 - label], 1).tolist()
        rows.append(f"{' '.join(rng.permutation(words))} film {i},{label}")
    path = tmp_path_factory.mktemp("audit-data") / "small.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny(csv) -> list[str]:
    # One client (the audited one) of 90 sentences, 20 DP steps at q ~ 0.24: an inserted canary is sampled at
    # least once in all but ~0.4% of cases; the 20 held-out sentences beyond the 10 evaluated are the black-box ones.
    return ["privacy.mode=sample", "data.name=csv", f"data.path={csv}", "data.test_fraction=0.25",
            "data.max_eval_examples=10", "data.max_length=16", "federation.num_clients=1", "federation.rounds=2",
            "federation.partition=iid", "privacy.batch_size=24", "privacy.local_steps=10", "privacy.clipping=group",
            "output.progress=false"]


@pytest.mark.slow
def test_without_noise_the_gradient_canaries_are_found(tmp_path, small_csv, one_torch_thread):
    result = audit(None, overrides=[*tiny(small_csv), "privacy.noise_multiplier=0"], canaries=300,
                   out=tmp_path / "a")
    rep = result.report
    w = rep["white_box"]
    coins = np.zeros(300, bool)
    coins[:w["canaries"]["inserted"]] = True
    ceiling = one_run_epsilon_lower_bound(coins.astype(float), coins, rep["delta"])["epsilon"]  # every guess right
    assert w["epsilon_lower_bound"]["epsilon"] >= 0.8 * ceiling > 2.0
    assert w["epsilon_one_shot"]["epsilon"] > 5.0
    assert w["ever_sampled"] >= 0.95 * w["canaries"]["inserted"] and w["steps"] == rep["dp_steps"] == 20
    assert rep["epsilon_accountant"] == float("inf")
    b = rep["black_box"]
    assert b["canaries"]["total"] == 20 and 0 < b["canaries"]["inserted"] < 20
    for name in ["report.md", "audit.json", "scores.png"]:
        assert (result.audit_dir / name).is_file(), name
    assert json.loads((result.audit_dir / "audit.json").read_text())["white_box"]["canaries"]["total"] == 300
    assert not (tmp_path / "a" / "adapter").exists()  # the audited run exports no adapter


@pytest.mark.slow
def test_at_epsilon_3_the_bounds_stay_below_client_0s_accountant(tmp_path, small_csv, one_torch_thread):
    result = audit(None, overrides=[*tiny(small_csv), "privacy.epsilon=3"], canaries=300, out=tmp_path / "b")
    rep = result.report
    assert rep["epsilon_accountant"] == pytest.approx(3.0, rel=0.05)
    for bound in [rep["white_box"]["epsilon_lower_bound"], rep["white_box"]["epsilon_lower_bound_raw"],
                  rep["black_box"]["epsilon_lower_bound"]]:
        assert bound["epsilon"] <= rep["epsilon_accountant"]
    assert all(r.get("epsilon", 0) <= 3.0 + 1e-6 for r in read_metrics(tmp_path / "b"))
