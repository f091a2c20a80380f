"""Servers and updates for the client-level DP tests: tiny modules, no model, the server's real round path."""

from __future__ import annotations

import numpy as np

from fedlora import secagg
from fedlora.config import load_config
from fedlora.federated_run import build_strategy
from fedlora.protocol import Update, sent_tensors
from fedlora.server import Server
from fedlora.strategies import LoraFactors, available_strategies, get_strategy

DIMS = {"enc.0.query": (6, 5), "enc.0.value": (7, 5)}
HEAD = {"classifier.weight": np.zeros((2, 5), np.float32), "classifier.bias": np.zeros(2, np.float32)}
K, M = 20, 10  # clients, expected clients per round (Poisson q = M / K)
LINEAR = [m for m in available_strategies() if get_strategy(m).linear]


def ranks_for(method: str) -> list[int]:
    """Mixed ranks wherever the method takes them (Fed-SB's core needs r <= d_in = 5)."""
    return [2, 4, 4, 5] if get_strategy(method).supports_mixed_ranks else [4]


def dp_server(method: str, ranks: list[int], sigma: float, clip: float, seed: int = 0, secure: bool = False,
              extra: tuple[str, ...] = ()) -> Server:
    """A client-level DP server with the default settings otherwise (norm bounds included)."""
    cfg = load_config(None, [f"strategy.name={method}", f"federation.num_clients={K}",
                             f"federation.clients_per_round={M}", f"federation.ranks={ranks}", "privacy.mode=client",
                             f"privacy.noise_multiplier={sigma}", f"privacy.clip={clip}", f"seed={seed}",
                             f"privacy.secure_aggregation={str(secure).lower()}", *extra])
    return Server(cfg, build_strategy(cfg, DIMS), DIMS, {k: v.copy() for k, v in HEAD.items()}, [10] * K)


def unchanged(server: Server, c: int) -> Update:
    """Client c sends back exactly what it was sent (a zero change)."""
    down = server.downlink(c)
    factors = {m: LoraFactors(A=np.array(f.A, np.float32), B=np.array(f.B, np.float32), scale=f.scale)
               for m, f in server.sent_factors(c).items()}
    return Update(c, down.rank, factors, {k: v.copy() for k, v in down.head.items()}, 10, 0.5, 1, 10, 0.1)


def moved(server: Server, c: int, rng: np.random.Generator, size: float) -> Update:
    """Client c moves every part it sends (and its head) by `size` times a random direction."""
    u = unchanged(server, c)
    parts = server.up_parts()
    factors = {}
    for m, f in u.factors.items():
        sent = {p: a + size * rng.normal(size=a.shape) for p, a in server.strategy.to_parts(m, f, parts).items()}
        factors[m] = server.strategy.from_parts(m, {p: np.asarray(a, np.float32) for p, a in sent.items()}, f)
    head = {k: (h + size * rng.normal(size=h.shape)).astype(np.float32) for k, h in u.head.items()}
    return Update(c, u.rank, factors, head, u.num_examples, 0.5, 1, 10, 0.1)


def finish(server: Server, updates: list[Update], sampled: list[int], rng_seed: int = 1):
    """One round on the server's path: the plain pipeline, or SecAgg's in-process sum when the config asks."""
    if server.cfg.privacy.secure_aggregation:
        summed = secagg.in_process_round(server, updates, np.random.default_rng(rng_seed))
        if isinstance(summed, str):
            return server.finish_round([], sampled, failed=summed)
        return server.finish_round([], sampled, summed=summed)
    return server.finish_round(updates, sampled)


def expected_counts(ranks: list[int], q: float, per_slot: bool, width: int) -> np.ndarray:
    """m_j, from the federation's ranks alone: q times the clients holding slot j (per-slot means), else q·K."""
    ranks = np.asarray(ranks)
    if not per_slot:
        return np.full(width, q * len(ranks))
    return np.array([q * np.sum(ranks > j) for j in range(width)])


def divisor(name: str, shape: tuple, m_j: np.ndarray, m: float) -> np.ndarray | float:
    """The expected count behind each coordinate of a released array (slot axes: A's rows, B's columns)."""
    part = name.rsplit(".", 1)[1]
    if name.startswith("head.") or part == "R" or np.all(m_j == m):
        return m
    return m_j[None, :shape[1]] if part == "B" else m_j[:shape[0], None]


def released_global(server: Server) -> dict[str, np.ndarray]:
    """The global adapter's sent tensors at the federation's widest rank (B at its scale) and the head."""
    return sent_tensors(server.strategy, server.up_parts(), server.global_factors(), server.head)
