"""FLoRA: stack the clients' fresh LoRAs into one exact low-rank update merged into every client's base."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import AggregationResult, LoraFactors, Strategy, Update, validate_updates
from .registry import register


def stack_factors(factors: Sequence[LoraFactors], p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B_st, A_st) = ([s_1 B_1, …, s_K B_K], [p_1 A_1; …; p_K A_K]), so B_st A_st = Σ p_k s_k B_k A_k exactly.
    The stacked rank is Σ r_k over the clients given (this round's sampled ones)."""
    B_st = np.hstack([f.scale * f.B for f in factors])
    A_st = np.vstack([pk * f.A for pk, f in zip(p, factors)])
    return B_st, A_st


@dataclass
class FLoRAResult(AggregationResult):
    """The whole round lives in the base delta; the adapter is re-initialised, so nothing else goes down."""

    def effective_delta(self, module: str) -> np.ndarray:
        return self.base_delta[module]

    def downlink(self, rank: int) -> dict[str, LoraFactors]:
        return {}  # fresh LoRA every round: the client re-initialises (Strategy.fresh_lora_each_round)

    def downlink_nbytes(self, rank: int) -> int:
        return self.base_delta_nbytes()  # the stacked factors, whatever the client's rank

    def stacked_rank(self, module: str) -> int:
        return int(self.base_delta_factors[module][1].shape[0])


@register("flora")
class FLoRA(Strategy):
    """base_delta[m] = B_st A_st (dense, to merge into W0), base_delta_factors[m] = (B_st, A_st) (sent).

    Exact for any ranks: B_st A_st = Σ p_k s_k B_k A_k (identity 3), merged into every client's base weights.
    """

    fresh_lora_each_round = True
    exact = True
    merges_into_base = True
    linear = False  # the merged delta is a sum of products of what clients send, not a sum of it

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> FLoRAResult:
        ups, p, modules = validate_updates(updates, weights, self.name)
        res = FLoRAResult()
        for m in modules:
            B_st, A_st = stack_factors([u[m] for u in ups], p)
            res.base_delta_factors[m] = (B_st, A_st)
            res.base_delta[m] = B_st @ A_st
        return res
