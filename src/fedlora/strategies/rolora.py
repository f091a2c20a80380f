"""RoLoRA: rounds alternate between training and averaging B (A frozen) and A (B frozen); every round exact.

Odd rounds (1, 3, ...) train and send B against the A every client received; even rounds train and send A
against the common B. With one factor common to all clients the average of the other gives the exact
aggregate: Σ p_k s·B_k·A = s·(Σ p_k B_k)·A and Σ p_k s·B·A_k = s·B·(Σ p_k A_k). B goes first: with the PEFT
init B = 0, an A-round would have a zero gradient. Both factors travel down (a client sampled this round may
have missed the last one); only the trained one goes up.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Roles, Strategy, Update, validate_updates
from .common import PrefixResult
from .registry import register


def trained_factor(round_idx: int) -> str:
    """"B" in odd rounds, "A" in even rounds (1-based)."""
    return "B" if round_idx % 2 == 1 else "A"


@register("rolora")
class RoLoRA(Strategy):
    """Ā or B̄ = Σ p_k (the factor trained this round), the other factor common: exact, linear in what is sent."""

    supports_mixed_ranks = False
    mixed_ranks_refusal = "each round averages one factor under a common other factor of one rank"
    exact = True
    linear = True

    def roles(self, round_idx: int) -> Roles:
        part = (trained_factor(round_idx),)
        return Roles(train=part, up=part, down=("A", "B"))

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> PrefixResult:
        ups, p, modules = validate_updates(updates, weights, self.name, same_ranks=True)
        res = PrefixResult(method=self.name, fixed_rank=True, scale_for_rank=self.scale_for_rank)
        for m in modules:
            As, Bs = [u[m].A for u in ups], [u[m].B for u in ups]
            common_A = all(np.array_equal(A, As[0]) for A in As)
            common_B = all(np.array_equal(B, Bs[0]) for B in Bs)
            if not (common_A or common_B):
                raise ValueError(f"{self.name}: module {m!r}: both A and B differ between clients; a RoLoRA round "
                                 "trains one factor and every client keeps the other as it was sent")
            res.A[m] = As[0].copy() if common_A else sum(pk * A for pk, A in zip(p, As))
            res.B[m] = Bs[0].copy() if common_B else sum(pk * B for pk, B in zip(p, Bs))
            res.scale[m] = ups[0][m].scale
            res.seen_scales[m] = {ups[0][m].rank: ups[0][m].scale}
        return res
