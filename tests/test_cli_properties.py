"""Property tests of config and CLI input: whatever a user types, `fedlora run --dry-run` either prints the
resolved config (exit 0) or prints exactly one line on stderr and exits 2. Never a traceback.

No training here: `--dry-run` validates and prints the resolved TOML only.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import tomllib
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedlora.cli import main
from fedlora.config import ExperimentConfig, load_config
from fedlora.strategies import available_strategies, get_strategy

# FEDLORA_HYPOTHESIS_EXAMPLES=2000 for a longer soak; the default keeps the file near 15 s on 2 shared cores.
SETTINGS = settings(max_examples=int(os.environ.get("FEDLORA_HYPOTHESIS_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

SECTIONS = {name: type(field.default_factory()) for name, field in ExperimentConfig.model_fields.items()
            if field.default_factory is not None}
KNOWN = {f"{s}.{k}" for s, model in SECTIONS.items() for k in model.model_fields} | {"seed", "engine"}


def cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `fedlora ARGV`; anything else escaping main() fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc: int, err: str) -> None:
    assert rc == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith("fedlora: error: ") and "Traceback" not in err


def assert_round_trips(out: str, overrides: list[str]) -> None:
    """The printed TOML is the resolved config: loading it gives what the overrides gave."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.toml"
        path.write_text(out, encoding="utf-8")
        assert load_config(path) == load_config(None, overrides)


def toml_value(v) -> str:
    """A Python value as the right-hand side of a dotted override."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return tomli_w.dumps({"v": v}).removeprefix("v = ").strip()  # escapes quotes and control characters
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return str(v)


# -- valid input ---------------------------------------------------------------------------------------------

MIXED = sorted(n for n in available_strategies() if get_strategy(n).supports_mixed_ranks)
name_text = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF, blacklist_categories=("Cs",)),
                    min_size=1, max_size=12)
VALID = {
    "seed": st.integers(0, 2**32 - 1),
    "engine": st.sampled_from(["local", "flower-sim"]),
    "model.name": name_text,
    "data.max_length": st.integers(8, 512),
    "data.test_fraction": st.floats(0.01, 0.99),
    "data.max_eval_examples": st.integers(1, 10**6),
    "federation.rounds": st.integers(1, 10**6),
    "federation.local_steps": st.integers(1, 10**4),
    "federation.batch_size": st.integers(1, 4096),
    "federation.num_clients": st.integers(1, 10_000),
    "federation.partition": st.sampled_from(["iid", "dirichlet", "label-skew"]),
    "federation.alpha": st.floats(1e-6, 1e6),
    "federation.dropout": st.floats(0.0, 0.99),
    "federation.max_update_norm": st.floats(1e-6, 1e9),
    "lora.rank": st.integers(1, 1024),
    "lora.alpha": st.floats(1e-3, 1e4),
    "lora.targets": st.lists(st.sampled_from(["query", "key", "value", "dense"]), min_size=1, max_size=3),
    "lora.train_head": st.booleans(),
    "lora.scaling": st.sampled_from(["alpha/r", "rslora", "constant"]),
    "strategy.name": st.sampled_from(available_strategies()),
    "optim.name": st.sampled_from(["sgd", "adamw"]),
    "optim.lr": st.floats(1e-8, 10.0),
    "optim.momentum": st.floats(0.0, 0.99),
    "privacy.delta": st.floats(1e-12, 0.5),
    "privacy.clip": st.floats(1e-4, 1e4),
    "privacy.accountant": st.sampled_from(["rdp", "prv"]),
    "output.progress": st.booleans(),
    "output.name": name_text,
}


@st.composite
def valid_overrides(draw) -> tuple[list[str], dict]:
    keys = draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=8))
    chosen = {k: draw(VALID[k]) for k in keys}
    if draw(st.booleans()):  # mixed ranks, with a method that takes them
        chosen["federation.ranks"] = draw(st.lists(st.integers(1, 64), min_size=1, max_size=5))
        chosen["strategy.name"] = draw(st.sampled_from(MIXED))
    if draw(st.booleans()):
        strategy = get_strategy(chosen.get("strategy.name", "ffa"))
        # client-level DP releases one noisy sum: only methods whose aggregate is a sum take it (fedlora.compat)
        modes = ([] if strategy.sample_dp_refusal else ["sample"]) + (["client"] if strategy.linear else [])
        if modes:
            chosen["privacy.mode"] = draw(st.sampled_from(modes))
            chosen["privacy.epsilon"] = draw(st.floats(0.01, 100.0))
    return [f"{k}={toml_value(v)}" for k, v in chosen.items()], chosen


@SETTINGS
@given(valid_overrides())
def test_valid_overrides_parse_and_print_the_resolved_config(case):
    overrides, chosen = case
    rc, out, err = cli(["run", "--dry-run", *overrides])
    assert rc == 0, err
    assert err == ""
    resolved = tomllib.loads(out)
    for key, value in chosen.items():
        section, _, name = key.rpartition(".")
        got = resolved[section][name] if section else resolved[key]
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key
    assert_round_trips(out, overrides)


@SETTINGS
@given(valid_overrides())
def test_a_config_file_and_the_same_overrides_agree(case):
    overrides, _ = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "exp.toml"
        path.write_text(load_config(None, overrides).to_toml(), encoding="utf-8")
        rc, out, err = cli(["run", "--dry-run", str(path)])
    assert rc == 0, err
    assert tomllib.loads(out) == tomllib.loads(load_config(None, overrides).to_toml())


# -- invalid input -------------------------------------------------------------------------------------------

ident = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,10}", fullmatch=True)


@SETTINGS
@given(st.lists(ident, min_size=1, max_size=3), st.integers(-5, 5))
def test_unknown_keys_are_one_line(parts, value):
    key = ".".join(parts)
    assume(key not in KNOWN and not (len(parts) == 1 and parts[0] in SECTIONS))
    rc, _, err = cli(["run", "--dry-run", f"{key}={value}"])
    assert_one_line_error(rc, err)


NUMBER_KEYS = {  # key -> values that are out of its range
    "seed": [-1, 2**32, 10**30],
    "data.max_length": [0, 7, 513, -3],
    "data.test_fraction": [0.0, 1.0, -0.5, 2.0],
    "data.max_eval_examples": [0, -1],
    "federation.num_clients": [0, -2, 10_001],
    "federation.rounds": [0, -1],
    "federation.local_steps": [0],
    "federation.batch_size": [0, -8],
    "federation.clients_per_round": [0, 10**6],
    "federation.alpha": [0.0, -1.0],
    "federation.dropout": [-0.1, 1.0, 1.5],
    "federation.min_clients": [0, 10**6],
    "federation.max_update_norm": [0.0, -1.0],
    "lora.rank": [0, 1025, -4],
    "lora.alpha": [0.0, -1.0],
    "optim.lr": [0.0, -1e-3],
    "optim.momentum": [-0.1, 1.0],
    "optim.weight_decay": [-1.0],
    "privacy.epsilon": [0.0, -3.0],
    "privacy.delta": [0.0, 1.0, 2.0],
    "privacy.clip": [0.0, -1.0],
    "privacy.noise_multiplier": [-0.5],
    "eval.batch_size": [0],
}
NON_FINITE = [math.nan, math.inf, -math.inf]
WRONG_TYPE = st.one_of(
    st.booleans(),
    st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=6).map(lambda s: f"'{s}'"),
    st.lists(st.integers(-3, 3), max_size=3),
    st.just({"a": 1}),
)


@SETTINGS
@given(st.data())
def test_out_of_range_numbers_are_one_line(data):
    key = data.draw(st.sampled_from(sorted(NUMBER_KEYS)))
    value = data.draw(st.sampled_from(NUMBER_KEYS[key] + (NON_FINITE if "." in key else [])))
    rc, _, err = cli(["run", "--dry-run", f"{key}={toml_value(value)}"])
    assert_one_line_error(rc, err)
    assert key.split(".")[-1] in err


@SETTINGS
@given(st.sampled_from(sorted(NUMBER_KEYS)), WRONG_TYPE)
def test_wrong_types_for_numbers_are_one_line(key, value):
    raw = "{a = 1}" if isinstance(value, dict) else (value if isinstance(value, str) else toml_value(value))
    rc, _, err = cli(["run", "--dry-run", f"{key}={raw}"])
    assert_one_line_error(rc, err)


@pytest.mark.parametrize(
    "override",
    [
        "federation.ranks=[]", "federation.ranks=[0, 4]", "federation.ranks=[true]", "federation.ranks=4",
        "federation.ranks=['a']", "federation.num_clients=[1, 2]", "federation.rounds=1.5",
        "federation.rounds=true", "lora.targets=[]", "lora.targets=['']", "lora.targets=3",
        "privacy.accountant=gdp", "privacy.mode=maybe", "privacy.mode=sample",
        "privacy.mode=sample privacy.epsilon=inf", "privacy.mode=client privacy.noise_multiplier=nan",
        "strategy.name=nope", "strategy.options=3", "strategy.options={foo=1}",
        "strategy.options={scale_for_rank=1}", "strategy.options={initial_factors=1}", "strategy.options={seed='x'}",
        "strategy.name=hetlora strategy.options={gamma='x'}", "strategy.name=hetlora strategy.options={lam=inf}",
        "strategy.name=lora-fair strategy.options={lam=[1]}", "strategy.name=hetlora strategy.options={min_rank=0}",
        "strategy.name=fedit federation.ranks=[4,8]", "data.name=csv", "data.name=csv data.path=/",
        "data.name=''", "model.name=''", "model=3", "federation=1", "federation.rounds.x=1",
        "federation.label_fractions=[[1.0]]", "federation.partition=fractions",
        "federation.partition=fractions federation.num_clients=1 federation.label_fractions=[[-1.0, 2]]",
        "federation.partition=fractions federation.num_clients=1 federation.label_fractions=[[nan]]",
        "federation.clients_per_round=2 federation.num_clients=1",
        "federation.min_clients=3 federation.clients_per_round=2", "engine=ray", "output.dir=[1]",
        "=", "=3", ".a=1", "a..b=1", "seed", "output.name='unclosed", "lora.targets=['query'", "seed=1\nrounds=2",
    ],
)
def test_known_bad_inputs_are_one_line(override):
    rc, _, err = cli(["run", "--dry-run", *override.split(" ")])
    assert_one_line_error(rc, err)


garbage = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@SETTINGS
@given(st.one_of(st.sampled_from(sorted(KNOWN)), ident), garbage)
def test_any_value_text_is_parsed_or_one_line(key, raw):
    """TOML-looking garbage on the right of `=`: either a valid config or one line, exit 2."""
    rc, out, err = cli(["run", "--dry-run", f"{key}={raw}"])
    if rc == 0:
        assert_round_trips(out, [f"{key}={raw}"])
    else:
        assert_one_line_error(rc, err)


@SETTINGS
@given(st.one_of(st.binary(max_size=200), garbage.map(lambda s: s.encode("utf-8")),
                 st.lists(st.sampled_from(["[federation]", "[lora]", "rounds = 2", "rank = 0", "seed = -1",
                                           "[[x]]", "name = 'rbla'", "[strategy]", "a = [", "seed = 3",
                                           "\xff", "rank = 'eight'", "= 1", "[federation.ranks]"]),
                          max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))))
def test_random_config_files_are_parsed_or_one_line(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "exp.toml"
        path.write_bytes(content)
        rc, out, err = cli(["run", "--dry-run", str(path)])
    if rc == 0:
        assert tomllib.loads(out)
    else:
        assert_one_line_error(rc, err)


@SETTINGS
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12), max_size=4))
def test_random_argv_never_raises(argv):
    """Any words after `fedlora`: an exit code of 0 (a valid dry run) or 2 with one line, never a traceback."""
    assume(argv[:1] != ["bench"])  # a real benchmark: minutes
    rc, _, err = cli(argv[:1] + ["--dry-run"] + argv[1:] if argv[:1] == ["run"] else argv)
    if rc != 0:
        assert_one_line_error(rc, err)


def test_missing_config_file_and_folders(tmp_path):
    for argv in (["run", "--dry-run", str(tmp_path / "nope.toml")], ["run", "--dry-run", str(tmp_path)],
                 ["resume", str(tmp_path / "nope")], ["resume", str(tmp_path)], ["report", str(tmp_path)]):
        rc, _, err = cli(argv)
        assert_one_line_error(rc, err)
    (tmp_path / "config.toml").write_text("seed = 1\n")
    rc, _, err = cli(["resume", str(tmp_path)])  # a run folder killed before its first checkpoint
    assert_one_line_error(rc, err)
    assert "no checkpoint" in err


def test_a_relative_data_path_is_resolved_for_resume_from_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "d.csv").write_text("text,label\na,0\n")
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(["run", "--dry-run", "data.name=csv", "data.path=d.csv"])
    assert rc == 0, err
    assert tomllib.loads(out)["data"]["path"] == str((tmp_path / "d.csv").resolve())


def test_non_utf8_config_is_one_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[model]\nname = "café"\n'.encode("latin-1"))
    rc, _, err = cli(["run", "--dry-run", str(path)])
    assert_one_line_error(rc, err)
    assert "not valid TOML" in err
