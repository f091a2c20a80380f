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


def test_dp_sgd_trains_with_its_own_recipe_only_under_sample_level_dp():
    plain = load_config(None, ["federation.batch_size=16", "federation.local_steps=25", "optim.lr=0.01"])
    assert (plain.local_batch_size(), plain.local_steps(), plain.local_optim()) == (16, 25, plain.optim)
    client = load_config(None, ["privacy.mode=client", "privacy.epsilon=3"])
    assert (client.local_batch_size(), client.local_steps(), client.local_optim()) == (16, 25, client.optim)
    sample = load_config(None, ["privacy.mode=sample", "privacy.epsilon=3"])
    assert (sample.local_batch_size(), sample.local_steps()) == (128, 10)
    dp = sample.local_optim()
    assert (dp.name, dp.lr, dp.head_lr, dp.momentum) == ("sgd", 0.2, 1.0, 0.9)
    # A partial override keeps the DP defaults of the other optimizer fields.
    tuned = load_config(None, ["privacy.mode=sample", "privacy.epsilon=3", "privacy.optim.lr=0.5",
                               "privacy.batch_size=96", "privacy.local_steps=7"])
    dp = tuned.local_optim()
    assert (dp.name, dp.lr, dp.head_lr, dp.momentum) == ("sgd", 0.5, 1.0, 0.9)
    assert (tuned.local_batch_size(), tuned.local_steps()) == (96, 7)
    for bad in ("privacy.batch_size=0", "privacy.local_steps=0", "privacy.optim.lr=-1", "privacy.optim.name=lion",
                "optim.head_lr=0", "privacy.clipping=per-layer", "privacy.lora_clip=0"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


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


def test_optimizer_gives_the_head_its_own_learning_rate_when_set():
    import torch

    from fedlora.client import make_optimizer

    lora_p, head_p = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    dp = load_config(None, ["privacy.mode=sample", "privacy.epsilon=3"])
    opt = make_optimizer(dp, [lora_p, head_p], head=[head_p])
    assert isinstance(opt, torch.optim.SGD)
    groups = [(g["params"], g["lr"], g["momentum"]) for g in opt.param_groups]
    assert groups == [([lora_p], 0.2, 0.9), ([head_p], 1.0, 0.9)]
    plain = make_optimizer(load_config(None, []), [lora_p, head_p], head=[head_p])  # head_lr None: one group
    assert isinstance(plain, torch.optim.AdamW) and len(plain.param_groups) == 1
    assert plain.param_groups[0]["lr"] == pytest.approx(6e-3)


def test_strategy_section_validates_its_options_through_the_methods_model():
    from pydantic import ValidationError

    from fedlora.config import StrategyConfig

    assert StrategyConfig(name="hetlora", options={"gamma": 0.5}).options == {"gamma": 0.5}
    with pytest.raises(ValidationError) as err:
        StrategyConfig(name="hetlora", options={"gamma": "x"})
    first = err.value.errors()[0]
    assert first["loc"] == ("options",) and "strategy 'hetlora': bad options: gamma" in first["msg"]
    with pytest.raises(ConfigError) as err:
        load_config(None, ["strategy.name=zeropad", "strategy.options={gamma=0.5}"])
    assert str(err.value) == ("invalid config: strategy.options: strategy 'zeropad': bad options: gamma: "
                              "unknown option (accepted options: none)")
