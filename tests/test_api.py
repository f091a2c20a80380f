"""The Python API (`fedlora.run`), a strategy registered from outside the package, and the CLI's error
contract (user errors: one line, exit 2; bugs: traceback, a line saying so, exit 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pytest

import fedlora
from fedlora.cli import main
from fedlora.strategies import AggregationResult, LoraFactors, Strategy, register

TINY = {
    "federation": {"num_clients": 2, "rounds": 2, "local_steps": 2, "batch_size": 8, "partition": "iid"},
    "data": {"max_eval_examples": 60, "max_length": 32},
    "output": {"progress": False},
}


# -- a method written by a user, in plain Python, outside fedlora -----------------------------------------------
@dataclass
class MedianOfB(AggregationResult):
    A: dict = field(default_factory=dict)
    B: dict = field(default_factory=dict)
    scale: float = 1.0

    def effective_delta(self, module: str) -> np.ndarray:
        return self.scale * self.B[module] @ self.A[module]

    def downlink(self, rank: int) -> dict[str, LoraFactors]:
        return {m: LoraFactors(A=self.A[m][:rank], B=self.B[m][:, :rank], scale=self.scale) for m in self.A}

    def downlink_nbytes(self, rank: int) -> int:
        return 4 * sum(b[:, :rank].size for b in self.B.values())


class ToyMedianFFA(Strategy):
    """FFA's protocol (A frozen and shared, only B sent) with the coordinate-wise median of B."""

    trains_A: ClassVar[bool] = False
    sends_A: ClassVar[bool] = False
    supports_mixed_ranks: ClassVar[bool] = False
    calls: ClassVar[int] = 0

    def aggregate(self, updates, weights):
        type(self).calls += 1
        first = updates[0]
        return MedianOfB(
            A={m: np.asarray(f.A, np.float64) for m, f in first.items()},
            B={m: np.median(np.stack([u[m].B for u in updates]), axis=0) for m in first},
            scale=next(iter(first.values())).scale,
        )


@pytest.fixture
def toy_registered():
    """Register the toy method as a user would; forget it afterwards (the registry is process-wide)."""
    from fedlora.strategies.registry import unregister

    register("toy-median-ffa")(ToyMedianFFA)
    ToyMedianFFA.calls = 0
    yield
    unregister("toy-median-ffa")


@pytest.mark.slow
def test_a_strategy_registered_outside_fedlora_runs_through_fedlora_run(tmp_path, one_torch_thread, toy_registered):
    rows_seen = []
    cfg = {**TINY, "strategy": {"name": "toy-median-ffa"}}
    result = fedlora.run(cfg, out=tmp_path / "toy", callbacks=[rows_seen.append])
    assert ToyMedianFFA.calls == 2
    assert [r["round"] for r in result.metrics] == [1, 2] == [r["round"] for r in rows_seen]
    assert result.metrics[-1]["strategy"] == "toy-median-ffa"
    # FFA's protocol: nothing but B (and the head) went up.
    row = result.metrics[0]
    assert row["bytes_up"] == row["bytes_up_head"] + 2 * 12 * 384 * 8 * 4  # 2 clients x 12 modules x B (384 x 8)
    assert result.adapter_path is not None and (result.adapter_path / "adapter_config.json").exists()
    assert result.epsilon is None and 0.0 <= result.final_accuracy <= 1.0
    assert json.loads((tmp_path / "toy" / "summary.json").read_text())["rounds"] == 2


@pytest.mark.slow
def test_a_strategy_instance_and_dp_through_the_api(tmp_path, one_torch_thread):
    ToyMedianFFA.calls = 0  # not registered: an instance needs no name
    instance = ToyMedianFFA()
    result = fedlora.run(fedlora.load_config(None, ["privacy.mode=sample", "privacy.epsilon=3", "privacy.batch_size=8",
                                                    "privacy.local_steps=2"]),
                         overrides=["federation.num_clients=2", "federation.rounds=1", "federation.partition=iid",
                                    "data.max_eval_examples=60", "data.max_length=32", "output.save_adapter=false"],
                         out=tmp_path / "inst", strategy=instance)
    assert ToyMedianFFA.calls == 1
    assert result.adapter_path is None and 0 < result.epsilon <= 3.0


def test_registering_a_name_twice_is_refused(toy_registered):
    with pytest.raises(ValueError, match="already registered"):
        register("toy-median-ffa")(ToyMedianFFA)
    with pytest.raises(ValueError, match="already registered"):
        register("ffa")(ToyMedianFFA)
    with pytest.raises(ValueError, match="not a Strategy"):
        register("not-a-strategy")(dict)


def test_unknown_and_mistyped_options_are_refused_in_one_line():
    from fedlora.strategies import get_strategy

    for options, fragment in (({"gama": 0.5}, "gama: unknown option"), ({"gamma": "x"}, "gamma"),
                              ({"gamma": 1.5}, "gamma"), ({"min_rank": True}, "min_rank")):
        with pytest.raises(ValueError, match=fragment) as err:
            get_strategy("hetlora", **options)
        assert "\n" not in str(err.value) and "accepted options: gamma, lam, min_rank" in str(err.value)
    with pytest.raises(fedlora.ConfigError, match="strategy .ffa.: bad options: lam: unknown option"):
        fedlora.load_config(None, ["strategy.options={lam = 1}"])
    assert get_strategy("hetlora", gamma=0.5).gamma == 0.5


def test_configs_from_a_dict_a_path_or_an_object(tmp_path):
    from fedlora.api import as_config

    path = tmp_path / "c.toml"
    path.write_text('[federation]\nrounds = 3\n')
    assert as_config(path).federation.rounds == 3
    assert as_config({"federation": {"rounds": 4}}, ["federation.num_clients=3"]).federation.num_clients == 3
    cfg = as_config(None)
    assert as_config(cfg) is cfg and as_config(cfg, ["seed=5"]).seed == 5
    with pytest.raises(fedlora.ConfigError, match="federation.rounds"):
        as_config({"federation": {"rounds": 0}})
    with pytest.raises(fedlora.ConfigError, match="config must be"):
        as_config(3.5)


def test_import_changes_no_environment_variable_and_no_warning_filter():
    # numpy adds its own filters when it is first imported: import the dependencies first, then compare.
    code = ("import os, warnings, numpy, pydantic, tomli_w; env = dict(os.environ); filters = list(warnings.filters); "
            "import fedlora; "
            "fedlora.run; fedlora.strategies.get_strategy('ffa'); "
            "assert dict(os.environ) == env, set(os.environ) ^ set(env); assert warnings.filters == filters; "
            "import sys; assert 'torch' not in sys.modules; print(fedlora.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and out.stdout.strip()[0].isdigit()


def test_user_errors_are_one_line_exit_2_and_bugs_exit_1_with_traceback(monkeypatch, capsys):
    assert main(["run", "federation.rounds=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "federation.rounds" in err

    import fedlora.cli as cli

    def numpy_error(args):
        np.linalg.inv(np.zeros((2, 2)))  # LinAlgError, a ValueError: a library's, not the user's

    def value_error(args):
        raise ValueError("operands could not be broadcast together")

    for broken in (numpy_error, value_error):
        monkeypatch.setitem(cli.COMMANDS, "run", broken)
        assert main(["run"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "a bug" in err


def test_the_docs_method_table_is_the_registry():
    from pathlib import Path

    from fedlora.strategies.registry import METHOD_TABLE_HEADER, method_table_rows

    readme = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    lines = readme.splitlines()
    header = METHOD_TABLE_HEADER.splitlines()
    at = lines.index(header[0])
    assert lines[at: at + len(header)] == header
    rows = lines[at + len(header): at + len(header) + len(method_table_rows()) + 1]
    assert rows[:-1] == method_table_rows() and not rows[-1].startswith("| `")
    # The table's cells really come from the declarations: FedSA keeps B, RoLoRA alternates, Fed-SB moves R.
    by_name = {r.split("|")[1].strip(): r for r in method_table_rows()}
    assert "| A | A | B |" in by_name["`fedsa`"] and "(odd / even rounds)" in by_name["`rolora`"]
    assert "| no | R | R | R |" in by_name["`fedsb`"]
