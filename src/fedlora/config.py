"""One validated experiment config: loaded from TOML, overridden by dotted `key=value` pairs.

Every user mistake becomes a `ConfigError` with one line that names the key; the CLI prints it and exits 2.
The sections and their keys are in `fedlora.config_sections`; what spans features is checked in `fedlora.compat`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import Field, ValidationError, field_validator, model_validator

from fedlora.architectures import (  # noqa: F401  (EMBEDDED_* re-exported)
    EMBEDDED_LLM,
    EMBEDDED_MODEL,
    known_targets,
)
from fedlora.compat import refusal
from fedlora.config_sections import (  # noqa: F401  (re-exported)
    SCALING_FOR_MIXED_RANKS,
    DataConfig,
    DPOptimConfig,
    EvalConfig,
    FederationConfig,
    LoraConfigSection,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    PrivacyConfig,
    StrategyConfig,
    _Section,
)
from fedlora.errors import ConfigError, RoundFailed, UserError  # noqa: F401  (re-exported)
from fedlora.flaas.section import FlaasConfig  # noqa: F401  (re-exported)
from fedlora.strategies import get_strategy
from fedlora.task_names import TASK_NAMES

class ExperimentConfig(_Section):
    seed: int = Field(0, ge=0, lt=2**32)  # numpy rejects negative seeds; offsets are added per round/client
    engine: Literal["local", "flower-sim"] = "local"
    task: str = "classification"  # what is learned: fedlora.tasks (data, model class, head, score)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    flaas: FlaasConfig | None = None  # planned ranks, simulated devices (docs/flaas.md); absent: off

    @field_validator("task")
    @classmethod
    def _known_task(cls, v):
        if v not in TASK_NAMES:
            raise ValueError(f"unknown task {v!r}; available: {', '.join(TASK_NAMES)}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data):
        # A causal-LM run without a model name gets the embedded LLM, not the embedded classifier.
        if isinstance(data, dict) and data.get("task") == "causal-lm":
            model = data.get("model")
            if model is None or (isinstance(model, dict) and "name" not in model):
                data = {**data, "model": {**(model or {}), "name": EMBEDDED_LLM}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.lora.targets is None and (known := known_targets(self.model.name)):
            # Resolved once, written into config.toml. An architecture fedlora cannot tell without loading the
            # model is resolved (or refused in one line) when the model loads.
            self.lora.targets = known
        ranks = set(self.federation.client_ranks(self.lora.rank))
        if self.lora.scaling == "auto":  # resolved once and written into config.toml
            self.lora.scaling = self.lora.resolved_scaling(len(ranks) > 1)
        try:
            strategy = get_strategy(self.strategy.name, **self.strategy.options)
        except (TypeError, AttributeError, ValueError) as exc:  # unknown option, wrong type (gamma = "x"), range
            raise ValueError(f"strategy.options: {exc}") from None
        why = refusal(self, strategy)  # every cross-feature rule, in one place (fedlora.compat)
        if why:
            raise ValueError(why)
        return self

    def client_ranks(self) -> list[int]:
        return self.federation.client_ranks(self.lora.rank)

    def local_batch_size(self) -> int:
        """Examples per local step: DP-SGD's expected Poisson batch under sample-level DP, else the federation's."""
        return self.privacy.batch_size if self.privacy.mode == "sample" else self.federation.batch_size

    def local_steps(self) -> int:
        """Local optimizer steps per client per round: DP-SGD's under sample-level DP, else the federation's."""
        return self.privacy.local_steps if self.privacy.mode == "sample" else self.federation.local_steps

    def local_optim(self) -> OptimConfig:
        """The clients' optimizer: DP-SGD's under sample-level DP, else `optim`."""
        return self.privacy.optim if self.privacy.mode == "sample" else self.optim

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.model_dump()))


def _drop_none(obj):
    """TOML has no null: leave unset optional keys out (they come back as their defaults)."""
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is read as TOML (numbers, booleans, lists), else a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        doc = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError as exc:
        # Bare words are strings (strategy.name=rbla); a quoted string, list or table that does not parse is
        # a typo, not a string with its quotes and brackets in it.
        if raw.strip()[:1] in ("'", '"', "[", "{"):
            raise ConfigError(f"override {key}: {raw.strip()!r} is not a valid TOML value ({exc})") from None
        return key.split("."), raw
    if set(doc) != {"v"}:  # `a=1\nb=2`: one override is one value
        raise ConfigError(f"override {key}: {raw!r} is more than one value")
    return key.split("."), doc["v"]


def _set_dotted(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    msg = " ".join(msg.split())  # one line, whatever the message
    return f"invalid config: {where}: {msg}" if where else f"invalid config: {msg}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a TOML file (optional), apply dotted overrides, validate. Raises ConfigError with one line."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file is a folder: {p}" if p.is_dir() else f"config file not found: {p}")
        try:
            tree = tomllib.loads(p.read_text(encoding="utf-8"))  # TOML is UTF-8 whatever the locale
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {' '.join(str(exc).split())}") from None
        except OSError as exc:  # unreadable (permissions, a FIFO gone away)
            raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    return validate_tree(tree)


def validate_tree(tree: dict[str, Any], check_files: bool = True) -> ExperimentConfig:
    """A config from a nested dict. `check_files=False`: data files need not exist here (a Flower node that
    was sent the server's config and reads its own data)."""
    try:
        return ExperimentConfig.model_validate(tree, context={"check_files": check_files})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def checked(cfg: ExperimentConfig, strategy=None) -> ExperimentConfig:
    """The one validation of (config, strategy) every entry point runs before a run starts: the config again
    (it may have been edited in code after loading: assignment checks one field, not what spans sections), and
    every cross-feature rule against the strategy instance the run will use (`fedlora.compat`)."""
    cfg = validate_tree(cfg.model_dump(), check_files=False)
    if strategy is not None:
        why = refusal(cfg, strategy)
        if why:
            raise ConfigError(why)
        if cfg.engine != "local" and type(strategy) is not type(get_strategy(cfg.strategy.name)):
            given = strategy.name or type(strategy).__name__
            raise ConfigError(f"engine={cfg.engine} builds the strategy on every node from strategy.name "
                              f"({cfg.strategy.name!r}), not from the instance given ({given}): "
                              "register its class and name it in strategy.name, or use engine=local")
    return cfg
