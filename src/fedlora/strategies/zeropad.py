"""Zero-padding: pad A rows / B columns to the widest rank, weighted mean over all clients, truncate down."""

from __future__ import annotations

from typing import Sequence

from .base import Strategy, Update, validate_updates
from .common import PrefixResult, SlotMemory, scale_ratios, slotwise_result
from .registry import register


@register("zeropad")
class ZeroPad(Strategy):
    """Slot j of A and of B is Σ_k p_k pad(X_k)[j]: diluted by c_j = Σ_{k: r_k>j} p_k per factor. B_k enters at
    the widest client's scale s_g (B_k·s_k/s_g; see `slotwise_result`), so mixed ranks average one ΔW per slot.

    State: the last global slots, used for slots that no weighted client held this round (see SlotMemory);
    checkpoint it with `state_dict()`. Not exact (factor averaging, diluted slots: identity 6); linear.
    """

    exact = False
    linear = True
    per_slot_mean = False

    def __init__(self, scale_for_rank=None, seed: int = 0, initial_factors=None) -> None:
        super().__init__(scale_for_rank=scale_for_rank, seed=seed, initial_factors=initial_factors)
        self.memory = SlotMemory(self.seed)
        for m, f in self.initial_factors.items():
            self.memory.remember(m, f.A, f.B, f.scale)

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> PrefixResult:
        ups, p, modules = validate_updates(updates, weights, self.name)
        return slotwise_result(self.name, ups, modules, lambda m: p, self.per_slot_mean, self.memory,
                               self.scale_for_rank)

    def contribution_scales(self, ranks: Sequence[int], scales: Sequence[float]) -> list[float]:
        """s_k / s_g: the factor B_k enters the average with (A enters as sent); client-level DP clips there."""
        return scale_ratios(ranks, scales)

    def state_dict(self) -> dict:
        return {"global": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state.get("global", {}))
