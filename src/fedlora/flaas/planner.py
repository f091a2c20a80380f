"""The server's rank planner: from each client's profile and the LoRA geometry, the widest rank that fits the
client's memory and the round deadline, or why the client sits out. Pure arithmetic on numbers the run measured
from its own model (`Geometry`); deterministic (no randomness at all), so the same profiles give the same plan on
every engine.

What it plans: a rank per client. It does not drop modules or layers for a client whose memory binds (PEFT's
`rank_pattern` / `layers_to_transform` could carry that, but a client training a subset of modules would need
every method's aggregation to accept missing modules): such a client gets a lower rank, or sits out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedlora.flaas.profiles import ClientProfile

MB = 1024 * 1024


@dataclass(frozen=True)
class Geometry:
    """What one round costs a client, per candidate rank, for this model, method and codec."""

    fixed_memory: float  # bytes whatever the rank: base weights, activations, the trained head and its state
    memory_per_rank: float  # bytes per unit of rank: LoRA weights, gradients, optimizer state, LoRA activations
    flops_fixed: float  # training FLOPs per round whatever the rank (the frozen base's forward and backward)
    flops_per_rank: float  # training FLOPs per round per unit of rank (the LoRA path)
    up_bytes: dict[int, float]  # bytes a client of each candidate rank uploads (at the codec's size)
    down_bytes: dict[int, float]  # bytes it downloads

    def memory(self, rank: int) -> float:
        return self.fixed_memory + self.memory_per_rank * rank

    def flops(self, rank: int) -> float:
        return self.flops_fixed + self.flops_per_rank * rank


@dataclass(frozen=True)
class ClientCost:
    """Seconds of one round for one client at one rank: compute, upload, download."""

    compute_s: float
    upload_s: float
    download_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.upload_s + self.download_s

    def describe(self) -> str:
        return (f"{self.total_s:.1f} s (compute {self.compute_s:.1f}, up {self.upload_s:.1f}, "
                f"down {self.download_s:.1f})")


def seconds(profile: ClientProfile, flops: float, up_bytes: float, down_bytes: float) -> ClientCost:
    """A round's time on `profile`: the work at its sustained throughput, the bytes at its link speeds."""
    return ClientCost(compute_s=flops / (profile.gflops * 1e9), upload_s=up_bytes * 8 / (profile.upload_mbps * 1e6),
                      download_s=down_bytes * 8 / (profile.download_mbps * 1e6))


def expected_cost(profile: ClientProfile, geometry: Geometry, rank: int) -> ClientCost:
    return seconds(profile, geometry.flops(rank), geometry.up_bytes[rank], geometry.down_bytes[rank])


@dataclass(frozen=True)
class Plan:
    ranks: dict[int, int]  # client -> planned rank (clients that sit out are not in it)
    sit_out: dict[int, str]  # client -> why nothing fits
    note: str = ""  # e.g. the single rank chosen for a method that cannot mix ranks, and why
    costs: dict[int, str] = field(default_factory=dict)  # client -> its expected round time at its rank

    def to_json(self) -> dict:
        return {"ranks": {str(c): r for c, r in sorted(self.ranks.items())},
                "sit_out": {str(c): w for c, w in sorted(self.sit_out.items())},
                **({"note": self.note} if self.note else {})}


def best_rank(profile: ClientProfile, geometry: Geometry, choices: list[int],
              deadline_s: float | None) -> tuple[int | None, str]:
    """The widest of `choices` this client can afford, or (None, why not): memory first, then the deadline."""
    fits_memory = [r for r in sorted(choices) if geometry.memory(r) <= profile.memory_mb * MB]
    if not fits_memory:
        r = min(choices)
        return None, (f"memory: rank {r} needs {geometry.memory(r) / MB:.0f} MiB, the device has "
                      f"{profile.memory_mb:.0f} MiB")
    if deadline_s is None:
        return fits_memory[-1], ""
    in_time = [r for r in fits_memory if expected_cost(profile, geometry, r).total_s <= deadline_s]
    if not in_time:
        r = fits_memory[0]
        return None, (f"deadline: rank {r} takes {expected_cost(profile, geometry, r).describe()}, "
                      f"past the {deadline_s:g} s deadline")
    return in_time[-1], ""


def plan_ranks(profiles: dict[int, ClientProfile], geometry: Geometry, choices: list[int],
               deadline_s: float | None, mixed: bool) -> Plan:
    """Each client's rank. `mixed=False` (a method that cannot aggregate different ranks): one rank for every
    client that can take part, the widest the weakest of them affords."""
    if not choices:
        raise ValueError("the planner needs at least one candidate rank")
    ranks, sit_out = {}, {}
    for c, profile in sorted(profiles.items()):
        r, why = best_rank(profile, geometry, choices, deadline_s)
        if r is None:
            sit_out[c] = why
        else:
            ranks[c] = r
    note = ""
    if not mixed and ranks:
        one = min(ranks.values())
        weakest = min(c for c, r in ranks.items() if r == one)
        note = f"one rank for all ({one}): the method cannot mix ranks; client {weakest} affords no more"
        ranks = {c: one for c in ranks}
    costs = {c: expected_cost(profiles[c], geometry, r).describe() for c, r in ranks.items()}
    return Plan(ranks=ranks, sit_out=sit_out, note=note, costs=costs)
