"""The messages of a round and the wire view of a method's parts. Torch-free: the server, the codecs, secure
aggregation and both engines import it; it imports only the strategies' NumPy types.

- `Downlink`: what the server sends one client for one round.
- `Update`: what one client returns (its trained factors and head, the facts the server logs).
- `SummedRound`: what the server receives under secure aggregation (one sum, each member's metadata only).
- `RoundOutcome`: what one round changed, for the engine (merges) and the metrics row.
- `sent_tensors` / `from_sent`: the arrays a client puts on the wire, flat by "<module>.<part>" and
  "head.<name>", and factors back from them.
- `pad_to` / `slot_axes`: the fixed coordinates client-level DP and SecAgg work in (every rank padded to one width).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from fedlora.strategies.types import LoraFactors


@dataclass
class Downlink:
    """What the server sends a client for one round."""

    rank: int
    factors: dict[str, LoraFactors]  # empty: start from a fresh LoRA (FLoRA)
    head: dict[str, np.ndarray]
    round: int


@dataclass
class Update:
    """What a client returns: its trained factors and head plus the facts the server logs."""

    client_id: int
    rank: int
    factors: dict[str, LoraFactors]
    head: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    steps: int
    samples: int
    train_s: float
    next_rank: int | None = None  # HetLoRA self-pruning: the rank this client uses from the next round
    privacy: dict = field(default_factory=dict)  # the client's accountant state and epsilon (sample-level DP)


@dataclass
class SummedRound:
    """What the server receives under SecAgg: the weighted mean of the members' uploads (never one upload) and
    each member's metadata (id, rank, weight, loss, privacy report; no factors)."""

    mean: dict[str, np.ndarray]  # the unmasked weighted mean, flat by name in the plan's layout
    members: list = field(default_factory=list)  # `Update`s with factors = {} and head = {}
    extra: dict = field(default_factory=dict)
    plan: object = None  # the round's `fedlora.secagg.Plan`


@dataclass
class RoundOutcome:
    """What one round changed, for the engine (merges) and the metrics."""

    base_delta: dict[str, np.ndarray]
    trained: list[int]
    rejected: dict[int, str]
    bytes_up: int
    bytes_up_head: int
    bytes_down: int
    extra: dict = field(default_factory=dict)
    # Client-level DP: the released noisy mean change, flat by name in the fixed coordinates (what the strategy
    # then aggregates, post-processing). For audits and tests; never written to the metrics.
    release: dict | None = None


# -- the wire view of a method's parts --------------------------------------------------------------------------
def sent_tensors(strategy, parts: Sequence[str], factors: Mapping[str, LoraFactors],
                 head: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays a client puts on the wire, flat by "<module>.<part>" and "head.<name>" (FFA: B and head)."""
    out = {}
    for name, f in factors.items():
        for part, arr in strategy.to_parts(name, f, parts).items():
            out[f"{name}.{part}"] = np.asarray(arr, np.float64)
    for name, h in head.items():
        out[f"head.{name}"] = np.asarray(h, np.float64)
    return out


def from_sent(strategy, parts: Sequence[str], tensors: Mapping[str, np.ndarray], like: Mapping[str, LoraFactors],
              head_like: Mapping[str, np.ndarray]) -> tuple[dict[str, LoraFactors], dict[str, np.ndarray]]:
    """Factors and head back from `sent_tensors` arrays (the parts not sent are kept from `like`)."""
    factors = {n: strategy.from_parts(n, {p: tensors[f"{n}.{p}"] for p in parts}, f) for n, f in like.items()}
    return factors, {n: np.asarray(tensors[f"head.{n}"], np.float32) for n in head_like}


def is_head(name: str) -> bool:
    return name.startswith("head.")


def slot_axes(name: str) -> tuple[int, ...]:
    """The axes of a flat sent array that run over LoRA slots: A's rows, B's columns, both of R's; none for
    the head."""
    if is_head(name):
        return ()
    return {"A": (0,), "B": (1,), "R": (0, 1)}.get(name.rsplit(".", 1)[1], ())


def padded_shape(name: str, shape: tuple[int, ...], width: int) -> tuple[int, ...]:
    """`shape` with every slot axis widened to `width`."""
    axes = slot_axes(name)
    return tuple(width if i in axes else s for i, s in enumerate(shape))


def pad_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`x` in the top-left corner of zeros of `shape` (float64)."""
    out = np.zeros(shape, np.float64)
    out[tuple(slice(0, s) for s in np.shape(x))] = x
    return out


def truncate(name: str, x: np.ndarray, rank: int) -> np.ndarray:
    """The first `rank` slots of a padded array."""
    axes = slot_axes(name)
    return x[tuple(slice(0, rank) if i in axes else slice(None) for i in range(x.ndim))]


def contribution(strategy, parts: Sequence[str], factors: Mapping[str, LoraFactors], head: Mapping[str, np.ndarray],
                 coef: float) -> dict[str, np.ndarray]:
    """The sent tensors in the aggregate's coordinates: B times the client's c_k (its scale over the aggregate's),
    A, R and the head as sent."""
    return {n: a * (coef if n.endswith(".B") and not is_head(n) else 1.0)
            for n, a in sent_tensors(strategy, parts, factors, head).items()}


def contribution_coef(strategy, scale, rank: int, width: int) -> float:
    """c_k: how a rank-`rank` client's B enters an aggregate held at rank `width` (the strategy's contribution
    scale of its rank against `width`'s)."""
    return float(strategy.contribution_scales([width, rank], [scale(width), scale(rank)])[1])


def fixed_change(strategy, parts: Sequence[str], now: tuple, start: tuple, coef: float,
                 width: int) -> dict[str, np.ndarray]:
    """A client's change (`now` minus `start`, each a (factors, head) pair) in client-level DP's fixed
    coordinates: B times c_k, every slot axis padded to the federation's widest rank `width`."""
    a, b = contribution(strategy, parts, *now, coef), contribution(strategy, parts, *start, coef)
    return {k: pad_to(a[k] - b[k], padded_shape(k, a[k].shape, width)) for k in a}
