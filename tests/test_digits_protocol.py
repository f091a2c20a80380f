"""The offline RBLA protocol on scikit-learn's digits (`fedlora bench paper-rbla-digits`) and the issue-18 text
study's plan (`paper-rbla-scaling`): sizes, partitions, rank assignment, the real strategies doing the
aggregation, and a one-line refusal without scikit-learn."""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest

from fedlora.bench import paper_rbla_digits as digits
from fedlora.bench import paper_rbla_scaling as scaling
from fedlora.errors import UserError


def test_ranks_by_ratio_and_their_assignment():
    assert digits.client_ranks_by_ratio(16) == [1, 3, 4, 6, 8, 9, 11, 12, 14, 16]
    assert digits.client_ranks_by_ratio(10) == list(range(1, 11))
    sizes = [5, 50, 20, 80]
    ranks = [1, 2, 3, 4]
    assert digits.assign_ranks(sizes, ranks, "aligned") == [1, 3, 2, 4]  # largest client (80) gets 4
    assert digits.assign_ranks(sizes, ranks, "reversed") == [4, 2, 3, 1]  # largest gets 1


def test_partitions():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 30)
    one = digits.partition(y, "one-label", rng)
    assert [set(y[p]) for p in one] == [{k} for k in range(10)]
    dirichlet = digits.partition(y, "dirichlet-0.1", rng)
    flat = np.concatenate(dirichlet)
    assert sorted(flat) == list(range(len(y))) and min(len(p) for p in dirichlet) >= 10
    assert max(len(p) for p in dirichlet) > 2 * min(len(p) for p in dirichlet)  # very unequal, as intended


def test_alpha_puts_the_widest_client_at_scale_one():
    from fedlora.config import LoraConfigSection

    for rule in ("alpha/r", "rslora", "constant"):
        cfg = LoraConfigSection(rank=16, alpha=digits.alpha_for(rule, 16), scaling=rule)
        assert cfg.scale(16) == pytest.approx(1.0)
    assert LoraConfigSection(alpha=digits.alpha_for("alpha/r", 16), scaling="alpha/r").scale(1) == 16.0


def test_refuses_in_one_line_without_scikit_learn(monkeypatch, tmp_path):
    real = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError("No module named 'sklearn'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    from fedlora.bench import run_suite

    with pytest.raises(UserError) as err:
        run_suite("paper-rbla-digits", tmp_path / "out", size="smoke")
    assert str(err.value) == digits.SKLEARN_MISSING and "\n" not in str(err.value)
    assert "pip install 'fedlora[bench]'" in str(err.value)


def test_cli_refusal_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(digits, "load_digits_split", lambda: (_ for _ in ()).throw(UserError(digits.SKLEARN_MISSING)))
    from fedlora.cli import main

    rc = main(["bench", "paper-rbla-digits", "--quick", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].endswith(digits.SKLEARN_MISSING)


def test_a_run_aggregates_through_the_registered_strategies(monkeypatch):
    """Every round goes through the registered class's `aggregate` (spied), the result is a real accuracy, and
    FFA's shared A survives the torch round trip bit for bit (FFA refuses any other A)."""
    pytest.importorskip("sklearn")
    from fedlora.strategies import strategy_class

    calls = []
    for name in ("rbla", "ffa"):
        cls = strategy_class(name)
        real = cls.aggregate
        monkeypatch.setattr(cls, "aggregate", lambda self, u, w, _real=real: calls.append(self.name) or _real(self, u, w))
    data = digits.load_digits_split()
    data = (data[0][:300], data[1][:300], data[2], data[3])  # a small training set: the test stays fast
    for method in ("rbla", "ffa", "rbla γ=1"):
        spec = digits.DigitsRun(method, "constant", "dirichlet-0.1", "aligned", 0, rounds=2, hidden=8, r_max=4,
                                local_epochs=1)
        res = digits.run_one(spec, data)
        assert not res["diverged"] and len(res["accuracy_curve"]) == 2
        assert 0.0 <= res["final_accuracy"] <= 1.0 and sum(res["pred_fractions"]) == res["test_examples"]
        assert sorted(map(int, res["cutoff_accuracy"])) == sorted(set(res["client_ranks"]))
        assert res["cutoff_accuracy"]["4"] == pytest.approx(res["final_accuracy"])  # uncut = the global model
    assert calls == ["rbla"] * 2 + ["ffa"] * 2 + ["rbla"] * 2


def test_the_suite_smoke_writes_its_report_and_reuses_its_cache(tmp_path):
    pytest.importorskip("sklearn")
    import json

    from fedlora.bench import run_suite

    report = run_suite("paper-rbla-digits", tmp_path, size="smoke")
    text = report.read_text()
    assert "rbla − zeropad" in text and (tmp_path / "plots" / "digits_accuracy_vs_rounds.png").exists()
    log = json.loads((tmp_path / "results.json").read_text())["run_log"]
    assert {e["status"] for e in log} == {"ran"}
    run_suite("paper-rbla-digits", tmp_path, size="smoke")
    assert {e["status"] for e in json.loads((tmp_path / "results.json").read_text())["run_log"]} == {"cached"}


def test_text_study_plan():
    """paper-rbla-scaling: every method under every rule, RBLA's gammas, both placements; the widest client's
    scale is the same under every rule, and the rank-16 client holds the skewed or the balanced fractions."""
    size = scaling.SIZES["full"]
    plan = scaling.specs(size)
    assert len(set(plan)) == len(plan) == 3 * (3 * 3 + 2) + 3 * 2 * 2
    for rule in ("alpha/r", "rslora", "constant"):
        cfg = [s for s in plan if ("scaling", rule) in s.labels][0].config()
        assert cfg.lora.scaling == rule and cfg.lora.scale(16) == pytest.approx(scaling.WIDEST_SCALE)
    methods = {s.spec if hasattr(s, "spec") else s.label("method") for s in plan if s.label("part") == "scaling"}
    assert {"rbla", "zeropad", "hetlora", "rbla γ=0.5", "rbla γ=1"} <= methods
    g = [s for s in plan if s.label("part") == "scaling" and s.label("method") == "rbla γ=0.5"][0].config()
    assert g.strategy.options == {"gamma": 0.5}
    for place, rows in scaling.PLACEMENTS.items():
        cfg = [s for s in plan if ("placement", place) in s.labels][0].config()
        top = cfg.client_ranks().index(16)
        assert cfg.federation.label_fractions[top] == (scaling.SKEWED if "skewed" in place else scaling.BALANCED)
        assert sorted(map(tuple, cfg.federation.label_fractions)) == sorted(
            map(tuple, scaling.PLACEMENTS["top rank to the most skewed client"]))
    assert math.isclose(scaling.alpha_for("rslora"), 2.0)
