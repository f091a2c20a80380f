"""RBLA: rank-based slot-wise averaging; slot j is averaged only over the clients that hold it."""

from __future__ import annotations

from typing import Sequence

from pydantic import Field

from .base import Update, validate_updates
from .common import PrefixResult, slotwise_result
from .registry import Options, register
from .zeropad import ZeroPad


class RBLAOptions(Options):
    # Slot shrinkage (the RBLA authors' variant): B's slot j is multiplied by c_j^gamma, c_j the weight (data)
    # share of the clients holding slot j. 0: plain RBLA; 1: the product's slot j weighs c_j.
    gamma: float = Field(0.0, ge=0.0, le=4.0)


@register("rbla", options=RBLAOptions)
class RBLA(ZeroPad):
    """A_g[j] = Σ_{k: r_k>j} p_k A_k[j] / c_j and B_g[:, j] likewise (B at one scale, see `slotwise_result`), so
    high slots are not diluted; with `gamma` = γ > 0, B_g[:, j] is then multiplied by c_j^γ.

    Down: the prefix (A_g[:r], B_g[:, :r]·s_g/s_r). `result.slot_weights[module]` holds c_j.
    Not exact (factor averaging). Linear in the sent factors with γ = 0; with γ > 0 the shrink factor depends on
    which clients replied, so the instance says `linear = False` (client-level DP then noises each update).
    """

    per_slot_mean = True

    def __init__(self, gamma: float = 0.0, scale_for_rank=None, seed: int = 0, initial_factors=None) -> None:
        super().__init__(scale_for_rank=scale_for_rank, seed=seed, initial_factors=initial_factors)
        if not 0.0 <= gamma <= 4.0:
            raise ValueError(f"rbla: gamma must be in [0, 4], got {gamma}")
        self.gamma = float(gamma)
        if self.gamma > 0:
            self.linear = False

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> PrefixResult:
        ups, p, modules = validate_updates(updates, weights, self.name)
        return slotwise_result(self.name, ups, modules, lambda m: p, self.per_slot_mean, self.memory,
                               self.scale_for_rank, shrink_gamma=self.gamma)
