"""A simulated device population's round: who is online, how long each participant takes (from the real
samples trained and bytes sent), who misses the deadline, and the round's simulated wall time.

The clients really train on this machine; only the clock is simulated: each participant's time is its real
work (training FLOPs of the samples it trained, bytes it uploaded and downloaded) at its profile's speeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlora.flaas.planner import ClientCost, seconds
from fedlora.flaas.profiles import ClientProfile


def offline(profiles: dict[int, ClientProfile], clients: list[int], seed: int, round_idx: int) -> dict[int, str]:
    """Clients that are not online this round, drawn from their availability (deterministic per seed, round)."""
    out = {}
    for c in clients:
        p = profiles.get(c)
        if p is not None and p.availability < 1:
            if np.random.default_rng([seed, round_idx, c, 0xA7A1]).random() >= p.availability:
                out[c] = f"offline (simulated availability {p.availability:g})"
    return out


def slowdowns(clients: list[int], seed: int, round_idx: int, jitter: float) -> dict[int, float]:
    """Each client's slowdown this round (a device is not equally fast every round: load, signal, heat):
    log-normal with sigma `jitter` (0: every round as its profile says), deterministic per seed and round."""
    return {c: float(np.exp(jitter * np.random.default_rng([seed, round_idx, c, 0x51C]).standard_normal()))
            for c in clients} if jitter > 0 else {c: 1.0 for c in clients}


@dataclass(frozen=True)
class SimulatedRound:
    costs: dict[int, ClientCost]  # every client that trained
    late: dict[int, str]  # client -> why its update came after the deadline
    wall_s: float  # the round's simulated wall time: the slowest on-time participant, or the deadline if one was late

    def to_json(self) -> dict:
        return {"sim_round_s": self.wall_s,
                "sim_client_s": {str(c): round(k.total_s, 6) for c, k in sorted(self.costs.items())}}


def simulate_round(profiles: dict[int, ClientProfile], work: dict[int, tuple[float, float, float]],
                   deadline_s: float | None, slowdown: dict[int, float] | None = None) -> SimulatedRound:
    """`work`: client -> (training FLOPs, bytes up, bytes down) it really did this round; `slowdown`: client ->
    the factor this round's times are multiplied by (default 1)."""
    costs = {}
    for c, w in work.items():
        k, f = seconds(profiles[c], *w), (slowdown or {}).get(c, 1.0)
        costs[c] = ClientCost(k.compute_s * f, k.upload_s * f, k.download_s * f)
    late = {c: f"straggler: simulated {k.describe()}, past the {deadline_s:g} s deadline"
            for c, k in costs.items() if deadline_s is not None and k.total_s > deadline_s}
    on_time = [k.total_s for c, k in costs.items() if c not in late]
    wall = max(on_time, default=0.0)
    if late:
        wall = float(deadline_s)  # the server waited until the deadline for them
    return SimulatedRound(costs=costs, late=late, wall_s=float(wall))
