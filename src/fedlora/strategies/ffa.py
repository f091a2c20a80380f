"""FFA-LoRA: A frozen, shared and identical everywhere; only B is trained, sent and averaged (exact)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import LoraFactors, Strategy, Update, validate_updates
from .common import PrefixResult, pad_cols
from .registry import register


def shared_A(method: str, factors: Sequence[LoraFactors], module: str, known: np.ndarray | None) -> np.ndarray:
    """The longest A of the round (or of earlier rounds), after checking every client's A is its bit-identical
    prefix: A_k == A_max[:r_k]. A per-client seed would silently break exactness, so it is refused."""
    widest = max(range(len(factors)), key=lambda k: factors[k].rank)
    ref, ref_name = factors[widest].A, f"client {widest}"
    if known is not None:
        short, long_ = (ref, known) if ref.shape[0] <= known.shape[0] else (known, ref)
        if short.shape[1] != long_.shape[1] or not np.array_equal(short, long_[: short.shape[0]]):
            raise ValueError(
                f"{method}: {ref_name}, module {module!r}: A differs from the shared A (initial_factors or "
                "earlier rounds); A must stay frozen and identical on every client"
            )
        ref, ref_name = long_, "the shared A_max"
    for k, f in enumerate(factors):
        if not np.array_equal(f.A, ref[: f.rank]):
            diff = float(np.max(np.abs(f.A - ref[: f.rank])))
            raise ValueError(
                f"{method}: client {k}, module {module!r}: A is not bit-identical to {ref_name}[:{f.rank}] "
                f"(max |diff| {diff:.3g}); every FFA client must derive A from the same seed"
            )
    return ref


@register("ffa")
class FFA(Strategy):
    """B̄ = Σ p_k s_k pad(B_k) / s_g with one shared A_max: s_g·B̄·A_max = Σ p_k s_k B_k A_max[:r_k] exactly.

    Each client's scale is folded in, so mixed ranks with alpha/r scaling stay exact; with one common scale
    this is plain B̄ = Σ p_k pad(B_k). s_g is the scale of the widest client. Down: (A_max[:r], B̄[:, :r]·s_g/s_r);
    columns past the widest rank are 0 (B's init). Only B travels (A comes from a shared seed).
    State: the shared A (widest seen), to serve larger ranks and to check A never changes across rounds.
    Exact (identity 2), mixed ranks included, as long as every client's A is the bit-identical prefix of the
    shared A — which `aggregate` checks, refusing the round otherwise.
    """

    trains_A = False
    sends_A = False
    exact = True
    linear = True

    def __init__(self, scale_for_rank=None, seed: int = 0, initial_factors=None) -> None:
        super().__init__(scale_for_rank=scale_for_rank, seed=seed, initial_factors=initial_factors)
        self.shared: dict[str, np.ndarray] = {m: f.A for m, f in self.initial_factors.items()}

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> PrefixResult:
        ups, p, modules = validate_updates(updates, weights, self.name)
        res = PrefixResult(method=self.name, rescale_B=True, sends_A=False, scale_for_rank=self.scale_for_rank)
        for m in modules:
            factors = [u[m] for u in ups]
            A_max = shared_A(self.name, factors, m, self.shared.get(m))
            widest = max(range(len(factors)), key=lambda k: factors[k].rank)
            width, s_g = factors[widest].rank, factors[widest].scale
            B_scaled = sum(pk * f.scale * pad_cols(f.B, width) for pk, f in zip(p, factors))
            res.A[m], res.B[m], res.scale[m] = A_max[:width], B_scaled / s_g, s_g
            res.seen_scales[m] = {f.rank: f.scale for f in reversed(factors)}
            self.shared[m] = A_max
        snap = dict(self.shared)
        res.extend = lambda m, lo, hi: _extend(self.name, m, snap[m], lo, hi, res.B[m].shape[0])
        return res

    def contribution_scales(self, ranks: Sequence[int], scales: Sequence[float]) -> list[float]:
        """s_k / s_g: B_k enters B̄ scaled by its client's scale over the widest client's (see the class)."""
        s_g = scales[max(range(len(ranks)), key=lambda k: ranks[k])]
        return [s / s_g for s in scales]

    def state_dict(self) -> dict:
        return {"shared_A": {m: A.copy() for m, A in self.shared.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.shared = {m: np.asarray(A, dtype=float) for m, A in state.get("shared_A", {}).items()}


def _extend(method: str, module: str, A_max: np.ndarray, lo: int, hi: int, d_out: int):
    if hi > A_max.shape[0]:
        raise ValueError(
            f"{method}: module {module!r}: rank {hi} exceeds the shared A seen so far ({A_max.shape[0]} rows); "
            "construct ffa with initial_factors= the seeded init of the widest rank"
        )
    return A_max[lo:hi], np.zeros((d_out, hi - lo))
