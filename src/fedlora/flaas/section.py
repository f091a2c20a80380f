"""`[flaas]`, the config section of federated learning as a service (docs/flaas.md): beside fedlora.flaas, whose
profiles it validates, and above config_sections, whose strict base section it shares."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fedlora.config_sections import _Section
from fedlora.flaas.profiles import POPULATIONS, ClientProfile


class FlaasConfig(_Section):
    """`[flaas]`: federated learning as a service (docs/flaas.md). Present: the server plans each client's rank
    from its profile (federation.ranks becomes the plan, written into the run's config.toml) and, with
    `simulate`, every round runs on a simulated clock with stragglers dropped at the deadline."""

    # Where the profiles come from (one of the three): a named population (fedlora.flaas.profiles.POPULATIONS),
    # a list cycled over clients, or a .json / .toml / .csv file (a FedScale-style trace too). A Flower SuperNode
    # that declares `flaas-*` keys in its --node-config replaces its client's profile.
    population: str | None = None
    profiles: list[ClientProfile] | None = Field(None, min_length=1)
    profiles_file: str | None = None
    ranks: list[int] = Field(default_factory=lambda: [2, 4, 8, 16], min_length=1)  # what the planner may assign
    deadline_s: float | None = Field(None, gt=0.0)  # a round's deadline in simulated seconds; None: none
    simulate: bool = True  # simulated round times (and the deadline's stragglers) in the metrics
    # How much a device's speed varies from round to round on the simulated clock: each round's times are
    # multiplied by a log-normal factor of this sigma (0: exactly as profiled, so a planned client is never late).
    jitter: float = Field(0.0, ge=0.0, le=2.0)

    @field_validator("ranks")
    @classmethod
    def _rank_bounds(cls, v):
        if any(r < 1 or r > 1024 for r in v):
            raise ValueError(f"every rank must be in 1..1024, got {v}")
        return sorted(set(v))

    @field_validator("profiles_file")
    @classmethod
    def _absolute_file(cls, v):
        # like data.path: the run folder's config.toml must still find it when `fedlora resume` runs elsewhere
        return str(Path(v).expanduser().resolve()) if v and Path(v).expanduser().is_file() else v

    @field_validator("population")
    @classmethod
    def _known_population(cls, v):
        if v is not None and v not in POPULATIONS:
            raise ValueError(f"unknown population {v!r}; available: {', '.join(sorted(POPULATIONS))}")
        return v

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo):
        given = [k for k in ("population", "profiles", "profiles_file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of population, profiles, profiles_file"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.profiles_file and (info.context or {}).get("check_files", True) \
                and not Path(self.profiles_file).is_file():
            raise ValueError(f"profiles_file: no such file: {self.profiles_file}")
        return self
