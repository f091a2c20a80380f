"""Config loading, dotted overrides and validation: every mistake is one line naming the key."""

from __future__ import annotations

import pytest

from fedlora.cli import main
from fedlora.config import ConfigError, load_config, parse_override


def test_defaults_are_the_documented_experiment():
    cfg = load_config()
    assert cfg.strategy.name == "ffa"
    assert cfg.data.name == "rotten_tomatoes"
    assert cfg.lora.rank == 8 and cfg.lora.targets == ["query", "value"]
    assert 5 <= cfg.federation.num_clients <= 10
    assert cfg.federation.partition == "dirichlet"
    assert cfg.engine == "local"


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('seed = 3\n[federation]\nnum_clients = 4\nranks = [4, 8]\n[strategy]\nname = "rbla"\n')
    cfg = load_config(path, ["federation.rounds=2", "optim.lr=0.01", "lora.targets=['query']", "privacy.mode=none"])
    assert cfg.seed == 3 and cfg.federation.num_clients == 4 and cfg.federation.rounds == 2
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.lora.targets == ["query"]
    assert cfg.client_ranks() == [4, 8, 4, 8]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["strategy.name=flexlora", "federation.ranks=[2,4]", "privacy.mode=sample", "privacy.epsilon=3"])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[1,2]") == (["a"], [1, 2])
    assert parse_override("a.b=rbla") == (["a", "b"], "rbla")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("lora.rank=0", "lora.rank"),
        ("optim.lr=-1", "optim.lr"),
        ("strategy.name=nope", "unknown strategy"),
        ("federation.bogus=1", "federation.bogus"),
        ("nosection.key=1", "nosection"),
        ("privacy.epsilon=0", "privacy.epsilon"),
        ("privacy.delta=1", "privacy.delta"),
        ("privacy.clip=0", "privacy.clip"),
        ("federation.ranks=[4,0]", "federation.ranks"),
        ("federation.clients_per_round=99", "clients_per_round"),
        ("data.name=csv", "data.path"),
        ("noequals", "key=value"),
    ],
)
def test_bad_values_are_one_clear_line(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg


@pytest.mark.parametrize("strategy", ["fedit", "fedex", "lora-fair"])
def test_mixed_ranks_refused_for_methods_that_cannot_take_them(strategy):
    with pytest.raises(ConfigError, match="different ranks"):
        load_config(None, [f"strategy.name={strategy}", "federation.ranks=[4,8]"])


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "lora.rank=0"],
        ["run", "optim.lr=-0.1"],
        ["run", "strategy.name=unknown"],
        ["run", "/no/such/config.toml"],
        ["run", "data.name=csv", "data.path=/no/such.csv"],
        ["resume", "/no/such/run"],
    ],
)
def test_cli_errors_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlora: error:") and "\n" not in err and "Traceback" not in err
