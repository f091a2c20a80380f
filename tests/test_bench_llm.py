"""`fedlora bench paper-ffa-llm --quick`: FFA vs FedIT on the embedded LLM and the generated benchmark writes its
report (zero-shot row, both methods with and without DP, finite numbers) and results.json, whole task families per
client, FFA's upload the B factors only; a second call trains nothing."""

from __future__ import annotations

import json
import math
import re

import pytest

from fedlora.bench import run_suite
from fedlora.cli import main


def _numbers(obj):
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Full backward hook")  # Opacus on the frozen embeddings
def test_paper_ffa_llm_quick_reports_both_methods_with_and_without_dp(tmp_path):
    out = tmp_path / "paper-ffa-llm"
    assert main(["bench", "paper-ffa-llm", "--quick", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| zero-shot (no training) |" in report and "ε = 3" in report and "ε = ∞ (no DP)" in report
    assert not re.search(r"\b(nan|inf)\b", report, re.IGNORECASE)
    assert (out / "plots" / "exact_match_vs_rounds.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert all(math.isfinite(v) for v in _numbers(results))
    runs = results["runs"]
    assert len(runs) == 4 and {(r["method"], r["epsilon"]) for r in runs} == {
        ("ffa", 3.0), ("ffa", None), ("fedit", 3.0), ("fedit", None)}
    assert all(r["client_sizes"] == [850, 850] for r in runs)  # two whole families each
    dp = [r for r in runs if r["epsilon"] is not None]
    assert all(0 < r["final_epsilon"] <= 3.0 + 1e-6 for r in dp)
    # SmolLM2: q_proj 576x576, v_proj 576x192 (grouped KV heads). FFA sends B only: (576 + 192) / (2 * 576 + 576
    # + 192) of FedIT's A and B.
    up = {r["method"]: r["bytes_up_per_round"][0] for r in runs if r["epsilon"] is None}
    assert up["ffa"] / up["fedit"] == pytest.approx(768 / 1920, rel=1e-3)

    run_suite("paper-ffa-llm", out, quick=True)
    again = json.loads((out / "results.json").read_text())
    assert [e["status"] for e in again["run_log"]] == ["cached"] * 4
