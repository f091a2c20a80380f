"""One validation of (config, strategy) for every entry point: a strategy instance handed to `fedlora.run`, a
config edited in code after loading, and the engines that build the strategy on their nodes. Refusals come before
any model loads."""

from __future__ import annotations

import numpy as np
import pytest

import fedlora
from fedlora.config import ConfigError, checked, load_config
from fedlora.experiment import metrics_row
from fedlora.protocol import RoundOutcome
from fedlora.server import Server
from fedlora.strategies import get_strategy
from fedlora.strategies.fedit import FedIT

DIMS = {"m": (4, 3)}


def test_a_strategy_instance_is_checked_like_its_name(tmp_path):
    cfg = load_config(None, ["privacy.secure_aggregation=true"])  # ffa: fine under SecAgg
    with pytest.raises(ConfigError, match="'flexlora' is not"):
        fedlora.run(cfg, strategy=get_strategy("flexlora"), out=tmp_path / "r")
    with pytest.raises(ConfigError, match="privacy.mode=client needs a method whose aggregate is a sum"):
        fedlora.run(load_config(None, ["privacy.mode=client", "privacy.epsilon=3"]),
                    strategy=get_strategy("hetlora"), out=tmp_path / "r2")


def test_a_config_edited_in_code_is_checked_again(tmp_path):
    cfg = load_config(None, ["strategy.name=flexlora"])
    cfg.privacy.secure_aggregation = True  # one field validated on assignment; the cross-check runs at Run
    with pytest.raises(ConfigError, match="'flexlora' is not"):
        fedlora.run(cfg, out=tmp_path / "r")
    with pytest.raises(ConfigError, match="'flexlora' is not"):
        checked(cfg)


def test_engines_that_build_the_strategy_on_nodes_refuse_an_instance_of_another_class():
    class MyFedIT(FedIT):  # not registered: a node cannot build it from strategy.name
        pass

    cfg = load_config(None, ["engine=flower-sim", "strategy.name=fedit"])
    with pytest.raises(ConfigError, match="builds the strategy on every node"):
        checked(cfg, MyFedIT())
    assert checked(cfg, get_strategy("fedit")).strategy.name == "fedit"
    assert checked(load_config(None, ["strategy.name=fedit"]), MyFedIT()).engine == "local"  # in process: fine


def test_rows_name_the_strategy_that_ran():
    cfg = load_config(None, [])  # strategy.name = ffa
    server = Server(cfg, get_strategy("fedit"), DIMS, {}, [10] * cfg.federation.num_clients)
    outcome = RoundOutcome(base_delta={}, trained=[], rejected={}, bytes_up=0, bytes_up_head=0, bytes_down=0)
    row = metrics_row(cfg, server, outcome, [], [], {}, (0.0, np.nan), 0.0)
    assert row["strategy"] == "fedit"
