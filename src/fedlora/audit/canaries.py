"""Canary clients for the client-level DP audit (Andrew et al., ICLR 2024), as a `Transport` wrapper: the run's
own engine trains the real clients; each inserted canary that the server samples returns the reference it was
sent plus a large multiple of its own fixed unit vector c_i, in client-level DP's fixed coordinates, so the
clip leaves exactly S along c_i. The wrapper also records the global model after every round, which is all the
audit scores: cos(theta_T - theta_0, c_i), and the largest per-round cos(theta_t - theta_{t-1}, c_i).

Coordinates: every part any round of the method sends (FFA: B; FedIT, zero-padding, RBLA: A and B; Fed-SB: R;
RoLoRA: both, one per round; FedSA: A), at the federation's widest rank, restricted to the slots every client
rank holds (so every canary can move all of them, whatever its rank), and the head. A canary's vector is
regenerated from (seed, index) when needed: 500 canaries of ~10^5 coordinates are never held at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlora.federated_run import RoundReplies, Run, Transport
from fedlora.protocol import Update, contribution_coef, sent_tensors, slot_axes

CANARY_SIZE = 100.0  # the canary's change in clip units before the clip (clipping then leaves exactly S)


def audited_parts(strategy, rounds: int) -> tuple[str, ...]:
    """Every part the method sends up in some round (RoLoRA alternates: both)."""
    seen: list[str] = []
    for t in range(1, min(rounds, 2) + 1):
        seen += [p for p in strategy.roles(t).up if p not in seen]
    return tuple(seen)


@dataclass
class CanaryLayout:
    """Which coordinates of the global model the canaries live in: name -> the slice of each array."""

    slices: dict[str, tuple[slice, ...]]
    dim: int

    @classmethod
    def of(cls, server, parts: tuple[str, ...]) -> "CanaryLayout":
        r_min = min(server.client_ranks)
        tensors = sent_tensors(server.strategy, parts, server.global_factors(), server.head)
        slices, dim = {}, 0
        for name, a in tensors.items():
            axes = slot_axes(name)
            sl = tuple(slice(0, r_min) if i in axes else slice(None) for i in range(a.ndim))
            slices[name] = sl
            dim += int(a[sl].size)
        return cls(slices, dim)

    def flatten(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(tensors[k], np.float64)[sl].ravel() for k, sl in self.slices.items()])

    def unflatten(self, flat: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out, at = {}, 0
        for k, sl in self.slices.items():
            full = np.zeros(np.shape(like[k]), np.float64)
            n = int(full[sl].size)
            full[sl] = flat[at:at + n].reshape(full[sl].shape)
            out[k], at = full, at + n
        return out


def canary_vector(seed: int, index: int, dim: int) -> np.ndarray:
    """Canary `index`'s fixed unit vector (inserted or not: the unseen ones are drawn the same way)."""
    v = np.random.default_rng([seed, 0xCA7, index]).normal(size=dim)
    return v / np.linalg.norm(v)


def canary_update(server, client_id: int, vector: dict[str, np.ndarray], clip: float) -> Update:
    """What an inserted canary returns: its reference plus a large multiple of its vector, restricted to the
    round's sent parts (renormalized), B divided by the client's c_k so its fixed-coordinate change is exactly
    that multiple; within federation.max_update_norm, so the own-norm bound keeps it."""
    parts, rank = server.up_parts(), server.client_ranks[client_id]
    ref, head = server.sent_factors(client_id), server.head
    keys = [k for k in vector if k.startswith("head.") or k.rsplit(".", 1)[1] in parts]
    norm = float(np.sqrt(sum(np.sum(vector[k] ** 2) for k in keys)))
    coef = contribution_coef(server.strategy, server.cfg.lora.scale, rank, server.r_max)
    size = CANARY_SIZE * clip
    bound = server.cfg.federation.max_update_norm
    if bound is not None:
        size = min(size, 0.5 * bound * min(coef, 1.0))
    factors = {}
    for m, f in ref.items():
        sent = server.strategy.to_parts(m, f, parts)
        for p, a in sent.items():
            step = vector[f"{m}.{p}"] / norm / (coef if p == "B" else 1.0)
            step = step[tuple(slice(0, s) for s in np.shape(a))]  # the client's own rank
            sent[p] = np.asarray(np.asarray(a, np.float64) + size * step, np.float32)
        factors[m] = server.strategy.from_parts(m, sent, f)
    new_head = {k: np.asarray(h + size * vector[f"head.{k}"] / norm, np.float32) for k, h in head.items()}
    # One nominal example (the server refuses a count of 0); client-level DP weighs every client alike.
    return Update(client_id, rank, factors, new_head, 1, 0.0, 1, 1, 0.0)


class CanaryTransport(Transport):
    """Wraps the run's transport: clients from `first_canary` on are the inserted canaries (client
    first_canary + k carries vector `vectors[k]`), answered here; the rest go to `inner`. Records the global
    model (in the canaries' coordinates) after every round."""

    def __init__(self, inner: Transport, first_canary: int, seed: int, parts: tuple[str, ...], vectors: list[int]):
        self.inner, self.first_canary, self.seed, self.parts = inner, first_canary, seed, parts
        self.vectors = list(vectors)
        self.layout: CanaryLayout | None = None
        self.models: list[np.ndarray] = []  # theta_0, theta_1, ... flat in the layout
        self.sampled: dict[int, int] = {}  # canary index -> rounds it was sampled in
        self.this_round = 0  # canaries in the round being run

    def snapshot(self, run: Run) -> None:
        s = run.server
        self.models.append(self.layout.flatten(sent_tensors(s.strategy, self.parts, s.global_factors(), s.head)))

    def open(self, run: Run) -> None:
        self.inner.open(run)
        self.layout = CanaryLayout.of(run.server, self.parts)
        self.snapshot(run)

    def begin_round(self, run: Run) -> None:
        self.inner.begin_round(run)

    def train(self, run: Run, clients: list[int]) -> RoundReplies:
        real = [c for c in clients if c < self.first_canary]
        replies = self.inner.train(run, real)
        s = run.server
        like = sent_tensors(s.strategy, self.parts, s.global_factors(), s.head)
        self.this_round = len(clients) - len(real)
        for c in clients:
            if c < self.first_canary:
                continue
            i = self.vectors[c - self.first_canary]
            self.sampled[i] = self.sampled.get(i, 0) + 1
            vector = self.layout.unflatten(canary_vector(self.seed, i, self.layout.dim), like)
            replies.updates.append(canary_update(s, c, vector, run.cfg.privacy.clip))
        return replies

    def merged(self, run: Run, base_delta: dict[str, np.ndarray]) -> None:
        self.inner.merged(run, base_delta)

    def round_metrics(self, run: Run) -> dict:
        self.snapshot(run)
        return {**self.inner.round_metrics(run), "audit_canaries_sampled": self.this_round}

    def personal_eval(self, run: Run):
        return self.inner.personal_eval(run)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def canary_scores(models: list[np.ndarray], seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(final, all-iterates) scores of canaries 0..count-1: cos(theta_T - theta_0, c_i) and the largest
    cos(theta_t - theta_{t-1}, c_i) over rounds."""
    total = models[-1] - models[0]
    steps = np.stack([b - a for a, b in zip(models, models[1:])])
    final, best = np.zeros(count), np.zeros(count)
    total_norm = np.linalg.norm(total)
    step_norms = np.maximum(np.linalg.norm(steps, axis=1), 1e-300)
    for i in range(count):
        c = canary_vector(seed, i, len(total))
        final[i] = float(total @ c) / total_norm if total_norm > 0 else 0.0
        best[i] = float(np.max(steps @ c / step_norms))
    return final, best
