"""`fedlora bench`: every suite at its smoke size writes report.md (a table per section, finite numbers), the
plots and results.json; a second call trains nothing (the run log says "cached"); a run folder that lost its
summary is resumed from its checkpoint, not retrained."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from fedlora.bench import available_suites, run_suite
from fedlora.bench.paper_ffa import LORA_ONLY_DP
from fedlora.bench.paper_rbla import rank_bands, slot_norms
from fedlora.checkpoint import save_checkpoint
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.strategies import LoraFactors

PNGS = {
    "paper-ffa": ["accuracy_vs_rounds.png", "accuracy_vs_rounds_lora_only.png", "accuracy_vs_epsilon.png"],
    "paper-rbla": ["rbla_accuracy_vs_rounds.png", "rbla_slot_norms.png"],
    "speed": ["aggregation_time.png"],
    "comm": [],  # one table, no plots
    "flaas": [],
}
TABLES = {"paper-ffa": 4, "paper-rbla": 2, "speed": 4, "comm": 1, "flaas": 1}  # at least this many markdown tables


def _tables(md: str) -> list[str]:
    blocks, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


def _floats(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _floats(v)


def _check_output(out: Path, suite: str) -> dict:
    report = (out / "report.md").read_text()
    tables = _tables(report)
    assert len(tables) >= TABLES[suite], report
    for table in tables:
        assert not re.search(r"\b(nan|inf)\b", table, re.IGNORECASE), table
        assert re.search(r"\d", table.split("\n", 2)[-1]), f"a table without numbers:\n{table}"
    for png in PNGS[suite]:
        path = out / "plots" / png
        assert path.exists() and path.stat().st_size > 1000, path
        assert f"]({path.relative_to(out)})" in report
    results = json.loads((out / "results.json").read_text())  # strict JSON: no NaN/Infinity literals
    values = list(_floats(results))
    assert values and all(math.isfinite(v) for v in values)
    return results


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Full backward hook")  # Opacus on frozen embeddings (speed's DP step)
@pytest.mark.parametrize("suite", sorted(PNGS))
def test_suite_smoke_writes_report_then_reuses_cache(bench_root, suite):
    out = bench_root / suite
    assert run_suite(suite, out, size="smoke") == out / "report.md"
    first = _check_output(out, suite)
    assert first["run_log"] and all(e["status"] == "ran" for e in first["run_log"])

    run_suite(suite, out, size="smoke")
    second = _check_output(out, suite)
    assert [e["status"] for e in second["run_log"]] == ["cached"] * len(first["run_log"])
    assert [e.get("run_dir", e.get("path")) for e in second["run_log"]] == [e.get("run_dir", e.get("path")) for e in first["run_log"]]
    if "runs" in first:
        assert [r["final_accuracy"] for r in second["runs"]] == [r["final_accuracy"] for r in first["runs"]]


def _paper_ffa_smoke(bench_root: Path) -> Path:
    """The smoke paper-ffa output of this module (written by the smoke test when it ran first)."""
    out = bench_root / "paper-ffa"
    if not (out / "results.json").exists():
        run_suite("paper-ffa", out, size="smoke")
    return out


@pytest.mark.slow
def test_interrupted_run_is_resumed_not_retrained(bench_root):
    out = _paper_ffa_smoke(bench_root)
    before = json.loads((out / "results.json").read_text())
    victim = out / before["runs"][0]["run_dir"]
    (victim / "summary.json").unlink()  # as if killed after the last checkpoint, before the summary

    run_suite("paper-ffa", out, size="smoke")
    after = json.loads((out / "results.json").read_text())
    assert [e["status"] for e in after["run_log"]] == ["resumed"] + ["cached"] * (len(after["run_log"]) - 1)
    assert after["runs"][0]["final_accuracy"] == before["runs"][0]["final_accuracy"]
    assert after["runs"][0]["accuracy_curve"] == before["runs"][0]["accuracy_curve"]


@pytest.mark.slow
def test_paper_ffa_lora_alone_variant_sends_no_head_and_clips_for_lora(bench_root):
    out = _paper_ffa_smoke(bench_root)
    results = json.loads((out / "results.json").read_text())
    frozen = [r for r in results["runs"] if r["head"] == "frozen"]
    trained = [r for r in results["runs"] if r["head"] == "trained"]
    assert {r["method"] for r in frozen} == {"ffa", "fedit"} and len(trained) == 4
    assert all(b == 0 for r in frozen for b in r["bytes_up_head_per_round"])
    assert all(b > 0 for r in trained for b in r["bytes_up_head_per_round"])
    for r in frozen:
        cfg = load_config(out / r["run_dir"] / "config.toml")
        assert not cfg.lora.train_head and cfg.privacy.mode == "sample"
        assert cfg.privacy.clip == LORA_ONLY_DP["clip"] and cfg.privacy.optim.lr == LORA_ONLY_DP["lr"]
    assert set(results["lora_only"]["final_accuracy"]) == {"ffa", "fedit"}
    assert "LoRA alone" in (out / "report.md").read_text()


@pytest.mark.slow
def test_parallel_jobs_train_every_run_once_and_report_like_a_serial_bench(tmp_path):
    out = tmp_path / "paper-rbla"
    run_suite("paper-rbla", out, size="smoke", jobs=2)
    first = _check_output(out, "paper-rbla")
    assert len(first["run_log"]) == 2 and all(e["status"] == "ran" for e in first["run_log"])
    assert len({e["run_dir"] for e in first["run_log"]}) == 2
    for e in first["run_log"]:
        assert json.loads((out / e["run_dir"] / "bench.json").read_text())["seconds"] > 0
    run_suite("paper-rbla", out, size="smoke", jobs=2)  # nothing left to train: all cached
    second = json.loads((out / "results.json").read_text())
    assert [e["status"] for e in second["run_log"]] == ["cached", "cached"]
    with pytest.raises(ValueError, match="jobs"):
        run_suite("paper-rbla", out, size="smoke", jobs=0)


def test_slot_norms_read_the_widest_downlink(tmp_path):
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(4, 6)), rng.normal(size=(5, 4))
    B[:, 3] = 0.0  # an empty slot
    factors = {"m1": LoraFactors(A=A, B=B, scale=2.0), "m2": LoraFactors(A=A, B=2 * B, scale=2.0)}
    narrow = {"m1": LoraFactors(A=A[:2], B=B[:, :2], scale=4.0), "m2": LoraFactors(A=A[:2], B=B[:, :2], scale=4.0)}
    save_checkpoint(tmp_path / "run" / "checkpoint", {"server": {"downlinks": {2: narrow, 4: factors}}})
    norms = slot_norms(tmp_path / "run", 4)
    expected = 2.0 * 3.0 * np.linalg.norm(B, axis=0) * np.linalg.norm(A, axis=1)  # scale · (1 + 2) · ‖b_j‖‖a_j‖
    np.testing.assert_allclose(norms, expected)
    assert norms[3] == 0.0

    save_checkpoint(tmp_path / "flora" / "checkpoint", {"server": {"downlinks": {}}})
    assert slot_norms(tmp_path / "flora", 4) is None


def test_rank_bands():
    assert rank_bands((2, 4, 8, 16)) == [(1, 2), (3, 4), (5, 8), (9, 16)]
    assert rank_bands((2, 2, 2, 16)) == [(1, 2), (3, 16)]
    assert rank_bands((8, 8, 8)) == [(1, 8)]


def test_unknown_suite_or_size_is_one_line_exit_2(tmp_path, capsys):
    assert {"paper-ffa", "paper-rbla", "paper-rbla-digits", "paper-rbla-scaling", "speed"} <= set(available_suites())
    assert main(["bench", "no-such-suite", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown bench suite" in err and "paper-ffa" in err
    with pytest.raises(ValueError, match="unknown bench size"):
        run_suite("paper-ffa", tmp_path, size="huge")


def test_bytes_per_round_covers_every_method_with_its_own_parts():
    """Each method's table row comes from updates it accepts (Fed-SB checks that only R moved) and counts what
    the server counts: Fed-SB r² a module each way, FFA B only, FedSA A down."""
    from fedlora.bench.aggregation import MINILM_SHAPES
    from fedlora.bench.speed import bytes_per_round
    from fedlora.strategies import available_strategies

    rows = {r["method"]: r for r in bytes_per_round((4, 4))}
    assert set(rows) == set(available_strategies())
    n_mod = len(MINILM_SHAPES)
    assert rows["fedsb"]["bytes_up"] == rows["fedsb"]["bytes_down"] == 2 * n_mod * 4 * 4 * 4
    b_only = 2 * 4 * 4 * sum(d_out for d_out, _ in MINILM_SHAPES.values())
    assert rows["ffa"]["bytes_up"] == rows["ffa"]["bytes_down"] == b_only
    assert rows["fedit"]["bytes_up"] == 2 * 4 * 4 * sum(d_out + d_in for d_out, d_in in MINILM_SHAPES.values())
    assert rows["fedsa"]["bytes_down"] == rows["fedit"]["bytes_up"] - b_only
