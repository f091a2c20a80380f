"""FL as a service inside a run: measure the model's LoRA geometry, plan every client's rank from its profile,
keep the plan current (a Flower node that reconnects with another profile is re-planned), keep clients that
sit out or are offline out of the round, and put each round on the simulated population's clock.

`Run` calls it at four points (setup, before sampling, after sampling, after training); the planning and the
clock are the pure functions of `planner` and `simulate`. The plan decides: a client's reply at any other rank
is refused by the round's validation, whatever its profile says.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fedlora.config import ConfigError, ExperimentConfig, validate_tree
from fedlora.flaas.planner import Geometry, Plan, plan_ranks
from fedlora.flaas.profiles import (
    ClientProfile,
    ProfileError,
    load_profiles_file,
    population_profiles,
    profile_from_node_fields,
)
from fedlora.flaas.simulate import SimulatedRound, offline, simulate_round, slowdowns
from fedlora.strategies import WIRE_BYTES, Strategy
from fedlora.strategies.types import parts_nbytes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def codec_ratio(cfg: ExperimentConfig) -> float:
    """Upload bytes per float32 byte at the configured codec, for planning (the clock uses the real bytes)."""
    f = cfg.federation
    return {"none": 1.0, "fp16": 0.5, "int8": 0.25, "topk": 2.0 * f.topk_fraction}[f.compression]


def optimizer_state_bytes(cfg: ExperimentConfig) -> int:
    """Bytes of optimizer state per trained parameter (AdamW: two moments; SGD: momentum or nothing)."""
    opt = cfg.local_optim()
    return 8 if opt.name == "adamw" else (4 if opt.momentum > 0 else 0)


class ModelCounts:
    """What the planner needs to know of the model: frozen linear work, activations kept, the trained head."""

    def __init__(self, model: torch.nn.Module, dims: dict[str, tuple[int, int]], head_numel: int):
        linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
        self.linear_params = sum(m.in_features * m.out_features for m in linears)
        self.linear_inputs = sum(m.in_features for m in linears)  # per token: the inputs backward keeps
        self.base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        self.lora_per_rank = sum(d_in + d_out for d_out, d_in in dims.values())
        self.modules = len(dims)
        self.head_numel = head_numel

    def flops_per_token(self, rank: int) -> float:
        """Training FLOPs per token: the frozen base's forward and its input-gradient backward (2 + 2 per
        weight), the LoRA path's forward and backward with weight gradients (6 per parameter)."""
        return 4.0 * self.linear_params + 6.0 * self.lora_per_rank * rank


def measure_geometry(cfg: ExperimentConfig, counts: ModelCounts, dims, strategy: Strategy,
                     choices: list[int]) -> Geometry:
    tokens = cfg.data.max_length  # an upper bound: batches are padded to their longest example
    batch = cfg.local_batch_size()
    samples = batch * cfg.local_steps()
    state = 4 + 4 + optimizer_state_bytes(cfg)  # weight, gradient, optimizer state (float32)
    head_bytes = counts.head_numel * WIRE_BYTES
    roles = strategy.roles(1)
    return Geometry(
        fixed_memory=(counts.base_params * DTYPE_BYTES[cfg.model.dtype]
                      + batch * tokens * counts.linear_inputs * DTYPE_BYTES[cfg.model.dtype]
                      + counts.head_numel * state),
        memory_per_rank=counts.lora_per_rank * state + batch * tokens * counts.modules * 4,
        flops_fixed=samples * tokens * 4.0 * counts.linear_params,
        flops_per_rank=samples * tokens * 6.0 * counts.lora_per_rank,
        up_bytes={r: parts_nbytes(roles.up, r, dims) * codec_ratio(cfg) + head_bytes for r in choices},
        down_bytes={r: parts_nbytes(roles.down, r, dims) + head_bytes for r in choices},
    )


def config_profiles(cfg: ExperimentConfig, flops_per_sample: float) -> dict[int, ClientProfile]:
    f, n = cfg.flaas, cfg.federation.num_clients
    try:
        if f.population is not None:
            listed = population_profiles(f.population, n, cfg.seed)
        elif f.profiles is not None:
            listed = list(f.profiles)
        else:
            listed = load_profiles_file(f.profiles_file, flops_per_sample)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from None
    return {c: listed[c % len(listed)] for c in range(n)}  # cycled over clients, like federation.ranks


class FlaasService:
    """One run's plan and clock: built by `Run` before its server (the plan becomes federation.ranks)."""

    def __init__(self, cfg: ExperimentConfig, model: torch.nn.Module, dims, head_numel: int, strategy: Strategy):
        self.cfg, self.dims, self.mixed = cfg, dims, strategy.supports_mixed_ranks
        self.counts = ModelCounts(model, dims, head_numel)
        self.choices = list(cfg.flaas.ranks)
        self.geometry = measure_geometry(cfg, self.counts, dims, strategy, self.choices)
        self.profiles = config_profiles(cfg, cfg.data.max_length * self.counts.flops_per_token(min(self.choices)))
        self.declared: dict[int, dict] = {}  # what each Flower node last declared (raw), to notice a change
        self.plan = self._plan()
        if not self.plan.ranks:
            first = min(self.plan.sit_out)
            raise ConfigError(f"flaas: no client can take part (client {first}: {self.plan.sit_out[first]})")
        if not self.mixed:  # one rank for the whole run: re-plans may only keep it or sit a client out
            self.choices = [min(self.plan.ranks.values())]
        self.server = None
        self.last: SimulatedRound | None = None

    def _plan(self) -> Plan:
        plan = plan_ranks(self._plan_profiles(), self.geometry, self.choices, self.cfg.flaas.deadline_s, self.mixed)
        bad = {c: "its node declared an invalid profile" for c, p in self.profiles.items() if p is None}
        return replace(plan, sit_out={**plan.sit_out, **bad})

    def planned_config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """The config with federation.ranks = the plan (a client that sits out keeps the smallest rank: it
        never trains, and the server never sends it anything)."""
        tree = cfg.model_dump()
        tree["federation"]["ranks"] = [self.plan.ranks.get(c, min(self.choices))
                                       for c in range(cfg.federation.num_clients)]
        return validate_tree(tree, check_files=False)

    def attach(self, server) -> None:
        """The server keeps downlinks for every rank a re-plan may assign (no wider than its r_max, the
        federation's fixed width)."""
        self.server = server
        self.choices = [r for r in self.choices if r <= server.r_max]
        server.plannable_ranks = set(self.choices)

    # -- every round ---------------------------------------------------------------------------------------------
    def observe(self, node_fields: dict[int, dict], note) -> None:
        """Profiles Flower nodes declared (`flaas-*` node config keys); re-plan when one changed."""
        changed = False
        for c, fields in sorted(node_fields.items()):
            if not fields or self.declared.get(c) == fields:
                continue
            self.declared[c] = dict(fields)
            try:
                self.profiles[c] = profile_from_node_fields(fields)
            except ProfileError as exc:  # hostile or broken: this client sits out until it declares a good one
                self.profiles[c] = None
                note(f"client {c}: {exc}")
            changed = True
        if changed:
            self.plan = self._plan()
            for c, r in self.plan.ranks.items():
                self.server.client_ranks[c] = r
            note(f"flaas: re-planned ranks {self.plan.to_json()['ranks']}")

    def _plan_profiles(self) -> dict[int, ClientProfile]:
        return {c: p for c, p in self.profiles.items() if p is not None}

    def excluded(self, round_idx: int, clients: list[int]) -> dict[int, str]:
        """Clients of this round that take no part: nothing fits them, or (simulated) they are offline."""
        out = {c: f"sits out: {self.plan.sit_out[c]}" for c in clients if c in self.plan.sit_out}
        if self.cfg.flaas.simulate:
            rest = [c for c in clients if c not in out]
            out.update(offline(self._plan_profiles(), rest, self.cfg.seed, round_idx))
        return out

    def settle(self, replies, traffic_up: int | None):
        """After training: each participant's simulated time from the work it really did; stragglers past the
        deadline leave the round with their reason. Returns the replies the server aggregates."""
        server, cfg = self.server, self.cfg
        row = {"flaas_plan": self.plan.to_json()}
        if not cfg.flaas.simulate:
            replies.extra.update(row)
            return replies
        updates = replies.updates or (replies.summed.members if replies.summed is not None else [])
        heads = self.counts.head_numel * WIRE_BYTES
        est = {u.client_id: (server.strategy.uplink_nbytes(u.factors, server.round + 1) + heads) if u.factors
               else self.geometry.up_bytes.get(u.rank, 0.0) for u in updates}
        total = sum(est.values())
        scale = traffic_up / total if traffic_up and total else 1.0  # the real bytes, shared as estimated
        work = {u.client_id: (u.samples * cfg.data.max_length * self.counts.flops_per_token(u.rank),
                              est[u.client_id] * scale, server.downlink_nbytes(u.rank)) for u in updates}
        sim = simulate_round(self._plan_profiles(), work, cfg.flaas.deadline_s,
                             slowdowns(sorted(work), cfg.seed, server.round + 1, cfg.flaas.jitter))
        self.last = sim
        row.update(sim.to_json())
        replies.extra.update(row)
        if sim.late and replies.summed is None:
            replies = replace(replies, updates=[u for u in replies.updates if u.client_id not in sim.late],
                              dropped={**replies.dropped, **sim.late})
        return replies
