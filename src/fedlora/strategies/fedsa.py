"""FedSA-LoRA: clients train A and B; only A is sent and averaged; each client keeps its own B.

The FedSA argument: A learns what the clients share, B what is particular to each. The server averages
Ā = Σ p_k A_k and sends Ā down; B never leaves a client (`Roles.personal`): the client keeps it across rounds
in its state store (fedlora.client_state) and puts it back under the new Ā. The server holds no B, so its
global adapter is (Ā, B = 0): the global view is the shared part alone (base model and head), and the method's
real output is the personalised view, client k's (Ā, B_k), which the run evaluates on the clients' side.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Roles, Strategy, Update, validate_updates
from .common import PrefixResult
from .registry import register


@register("fedsa")
class FedSA(Strategy):
    """Ā = Σ p_k A_k; B stays on each client. Not exact (no single global ΔW); linear in what is sent (A)."""

    supports_mixed_ranks = False
    mixed_ranks_refusal = "it averages A element-wise at one rank"
    exact = False
    linear = True

    def roles(self, round_idx: int) -> Roles:
        return Roles(train=("A", "B"), up=("A",), down=("A",), personal=("B",))

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> PrefixResult:
        ups, p, modules = validate_updates(updates, weights, self.name, same_ranks=True)
        res = PrefixResult(method=self.name, fixed_rank=True, scale_for_rank=self.scale_for_rank)
        for m in modules:
            res.A[m] = sum(pk * u[m].A for pk, u in zip(p, ups))
            res.B[m] = np.zeros_like(ups[0][m].B)  # the server never sees a B
            res.scale[m] = ups[0][m].scale
            res.seen_scales[m] = {ups[0][m].rank: ups[0][m].scale}
        return res
