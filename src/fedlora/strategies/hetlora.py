"""HetLoRA: zero-padding weighted by update norms, plus the client's rank self-pruning rule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from pydantic import Field

from .base import LoraFactors, Update, product_fro_norm, validate_updates
from .common import PrefixResult, slotwise_result
from .registry import Options, register
from .zeropad import ZeroPad


def norm_weights(factors: Sequence[LoraFactors], fallback: np.ndarray) -> np.ndarray:
    """S_k / Σ S_j with S_k = ‖s_k B_k A_k‖_F (from r x r Grams). All-zero norms (e.g. every B still 0):
    fall back to `fallback` (the data weights) rather than divide by zero."""
    S = np.array([f.scale * product_fro_norm(f.B, f.A) for f in factors])
    total = S.sum()
    return S / total if total > 0 else np.asarray(fallback, dtype=float)


def tail_start(rank: int, gamma: float, min_rank: int = 0) -> int:
    """⌊γ·r⌋, the first slot of the tail, but never below min(min_rank, r) (a tiny epsilon absorbs float error,
    e.g. 0.29·100 = 28.999…)."""
    return max(min(min_rank, rank), int(math.floor(gamma * rank + 1e-9)))


def tail_norm(A: np.ndarray, B: np.ndarray, gamma: float, min_rank: int = 0) -> float:
    """‖B[:, k:]‖_F · ‖A[k:, :]‖_F with k = `tail_start` (⌊γr⌋): what HetLoRA's penalty λ·(...) pushes down."""
    k = tail_start(A.shape[0], gamma, min_rank)
    return float(np.linalg.norm(B[:, k:]) * np.linalg.norm(A[k:, :]))


def pruned_rank(rank: int, tail_before: float, tail_after: float, gamma: float, min_rank: int = 1) -> int:
    """The client's rank after local training: ⌊γ·r⌋ (at least `min_rank`) if the tail norm shrank, else r."""
    return tail_start(rank, gamma, min_rank) if tail_after < tail_before else rank


@dataclass
class HetLoRAResult(PrefixResult):
    client_weights: dict[str, np.ndarray] = field(default_factory=dict)  # S_k / Σ S_j per module


class HetLoRAOptions(Options):
    gamma: float = Field(0.9, gt=0.0, le=1.0)  # kept fraction of the rank: slots [⌊γr⌋, r) are the tail
    lam: float = Field(1e-3, ge=0.0)  # weight of the tail penalty in the client's loss
    min_rank: int = Field(1, ge=1)  # a client never prunes below this rank


@register("hetlora", options=HetLoRAOptions)
class HetLoRA(ZeroPad):
    """Zero-padding with per-module weights S_k / Σ S_j, S_k = ‖s_k B_k A_k‖_F (data sizes ignored).

    Options read by the client: `gamma` (pruning ratio, default 0.9: a rank-8 client drops to 7), `lam`
    (penalty weight on `tail_norm`, default 1e-3; also `client_penalty`), `min_rank` (never prune below,
    default 1). The client-side rule is bound here as `kept_slots(r)`, `tail_norm(A, B)` and
    `pruned_rank(r, tail_before, tail_after)`. `result.client_weights[module]` holds the norm weights.
    The server tracks each client's current rank.
    Not exact: zero-padded factor averaging, with norm weights instead of p_k (identity 7).
    """

    exact = False
    linear = False  # the weights depend on the data (the update norms)
    clients_change_rank = True  # self-pruning

    def __init__(self, gamma: float = 0.9, lam: float = 1e-3, min_rank: int = 1, scale_for_rank=None,
                 seed: int = 0, initial_factors=None) -> None:
        super().__init__(scale_for_rank=scale_for_rank, seed=seed, initial_factors=initial_factors)
        if not 0 < gamma <= 1:
            raise ValueError(f"hetlora: gamma must be in (0, 1], got {gamma}")
        if lam < 0:
            raise ValueError(f"hetlora: lam must be >= 0, got {lam}")
        if min_rank < 1:
            raise ValueError(f"hetlora: min_rank must be >= 1, got {min_rank}")
        self.gamma, self.lam, self.min_rank = float(gamma), float(lam), int(min_rank)

    @property
    def client_penalty(self) -> float:
        """λ, the weight of the tail penalty in the client's loss."""
        return self.lam

    def kept_slots(self, rank: int) -> int:
        """Slots [0, k) are kept, [k, r) are the penalised tail: k = max(min(min_rank, r), ⌊γr⌋)."""
        return tail_start(rank, self.gamma, self.min_rank)

    def tail_norm(self, A: np.ndarray, B: np.ndarray) -> float:
        """`tail_norm` with this strategy's γ and min_rank (a rank-1 client has no tail)."""
        return tail_norm(A, B, self.gamma, self.min_rank)

    def pruned_rank(self, rank: int, tail_before: float, tail_after: float) -> int:
        """`pruned_rank` with this strategy's γ and min_rank."""
        return pruned_rank(rank, tail_before, tail_after, self.gamma, self.min_rank)

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> HetLoRAResult:
        ups, p, modules = validate_updates(updates, weights, self.name)
        w = {m: norm_weights([u[m] for u in ups], p) for m in modules}
        res = slotwise_result(self.name, ups, modules, w.__getitem__, False, self.memory, self.scale_for_rank,
                              result_cls=HetLoRAResult)
        res.client_weights = w
        return res
