"""The one registry of methods: a name, the Strategy subclass, and the pydantic model of its user options.

    from fedlora.strategies import Options, Strategy, register

    class MyOptions(Options):
        mu: float = Field(0.5, ge=0.0)

    @register("my-method", options=MyOptions)
    class MyMethod(Strategy):
        def __init__(self, mu=0.5, scale_for_rank=None, seed=0, initial_factors=None):
            super().__init__(scale_for_rank=scale_for_rank, seed=seed, initial_factors=initial_factors)
            self.mu = mu

        def aggregate(self, updates, weights): ...

`get_strategy("my-method", mu=0.1)` then validates `mu` through MyOptions, and `strategy.options = {mu = 0.1}`
in a config is checked at load time. Every mistake is a ValueError of one line naming the method.
"""

from __future__ import annotations

import inspect
from typing import Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from .base import _OPTIONS, _REGISTRY, Strategy

# What fedlora passes every method itself (see Strategy); never user options (the config refuses them there).
INTERNAL_OPTIONS = ("scale_for_rank", "seed", "initial_factors")


class Options(BaseModel):
    """Base of a method's user options: typed, bounded, nothing unknown (`strategy.options` in the config).
    Strict: "0.5" is not a float and True is not an int; an int is accepted for a float field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class NoOptions(Options):
    """A method without user options (the default of `register`)."""


def register(name: str, options: type[BaseModel] = NoOptions):
    """Class decorator: registers a Strategy subclass under `name` with the pydantic model of its options.

    Refused with ValueError: an empty name, a name already taken, a class already registered (under another
    name), a class that is not a concrete Strategy subclass, an options model that is not a pydantic model
    forbidding unknown fields, an option named like one fedlora passes itself, or an option `__init__` does not
    accept.
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"register: a strategy name is a non-empty string without surrounding spaces, got {name!r}")
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        raise ValueError(f"register({name!r}): options must be a pydantic model class (subclass "
                         f"fedlora.strategies.Options), got {options!r}")
    if options.model_config.get("extra") != "forbid":
        raise ValueError(f"register({name!r}): options model {options.__qualname__} must forbid unknown fields "
                         "(extra='forbid'; subclass fedlora.strategies.Options)")
    reserved = sorted(set(options.model_fields) & set(INTERNAL_OPTIONS))
    if reserved:
        raise ValueError(f"register({name!r}): options {reserved} are passed by fedlora itself, not user options")

    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ValueError(f"register({name!r}): {cls!r} is not a Strategy subclass")
        if name in _REGISTRY:
            raise ValueError(f"strategy name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        for other, known in _REGISTRY.items():
            if known is cls:
                raise ValueError(f"register({name!r}): {cls.__qualname__} is already registered as {other!r}")
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise ValueError(f"register({name!r}): {cls.__qualname__} does not implement {missing}")
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            missing = [k for k in (*options.model_fields, *INTERNAL_OPTIONS) if k not in params]
            if missing:
                raise ValueError(f"register({name!r}): {cls.__qualname__}.__init__ does not accept {missing}")
        cls.name = name
        _REGISTRY[name] = cls
        _OPTIONS[name] = options
        return cls

    return wrap


def unregister(name: str) -> None:
    """Forget a registered method (tests, notebooks that redefine a method); unknown names raise ValueError."""
    _known(name)
    del _REGISTRY[name], _OPTIONS[name]


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)


def _known(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(available_strategies())}")


def strategy_class(name: str) -> type[Strategy]:
    """The Strategy subclass registered as `name` (its class flags: exact, linear, ... without building it)."""
    _known(name)
    return _REGISTRY[name]


def strategy_options(name: str) -> type[BaseModel]:
    """The pydantic model of a registered method's user options."""
    _known(name)
    return _OPTIONS[name]


def validate_options(name: str, options: Mapping[str, object]) -> dict:
    """A method's user options checked by its model, with the defaults filled in; otherwise a ValueError of one
    line naming the method, the first bad option and the accepted ones."""
    model = strategy_options(name)
    try:
        return model.model_validate(dict(options)).model_dump()
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "options"
        accepted = ", ".join(model.model_fields) or "none"
        if err["type"] == "extra_forbidden":
            msg = "unknown option"
        else:
            got = repr(err.get("input"))
            msg = f"{' '.join(err['msg'].split())}, got {got if len(got) <= 40 else got[:37] + '...'}"
        raise ValueError(f"strategy {name!r}: bad options: {key}: {msg} (accepted options: {accepted})") from None


def get_strategy(name: str, **options) -> Strategy:
    """Instantiate the method registered as `name`. User options are validated by its options model; the
    keyword arguments fedlora passes itself (`INTERNAL_OPTIONS`) go to `__init__` unchecked here. Unknown
    names and bad options raise ValueError."""
    cls = strategy_class(name)
    internal = {k: options[k] for k in INTERNAL_OPTIONS if k in options}
    user = validate_options(name, {k: v for k, v in options.items() if k not in INTERNAL_OPTIONS})
    return cls(**internal, **user)


METHOD_TABLE_HEADER = ("| method | exact | linear in what is sent (client-level DP, SecAgg) | mixed ranks "
                       "| sample-level DP | trains | up | down | kept on the client |\n|---|---|---|---|---|---|---|---|---|")


def method_table_rows() -> list[str]:
    """The docs/methods.md's table, one markdown row per registered method, from the classes' own declarations
    (flags and `roles` of rounds 1 and 2: a method whose roles alternate shows both)."""
    yes = lambda b: "yes" if b else "no"  # noqa: E731

    def moved(parts_1: tuple[str, ...], parts_2: tuple[str, ...]) -> str:
        text = lambda parts: ", ".join(parts) or "nothing"  # noqa: E731
        return text(parts_1) if parts_1 == parts_2 else f"{text(parts_1)} / {text(parts_2)} (odd / even rounds)"

    rows = []
    for name in available_strategies():
        cls = strategy_class(name)
        s = get_strategy(name)
        r1, r2 = s.roles(1), s.roles(2)
        cells = [f"`{name}`", yes(cls.exact), yes(cls.linear), yes(cls.supports_mixed_ranks),
                 yes(cls.sample_dp_refusal is None), moved(r1.train, r2.train), moved(r1.up, r2.up),
                 moved(r1.down, r2.down), moved(r1.personal, r2.personal)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows
