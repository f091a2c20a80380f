"""FedSVD: clients train and send B only (as FFA), the server re-factors B̄·A by SVD and sends both down.

Each round every client holds the same A (round 1: the seeded init; later: what the server sent) and trains
B. The server averages B̄ = Σ p_k B_k (exact: ΔW* = s·B̄·A, since A is common), then re-factors B̄·A = U Σ Vᵀ from
the factors, never forming d_out x d_in: B̄ = Q_B R_B, Aᵀ = Q_A R_A, the r x r core R_B R_Aᵀ = U_c Σ V_cᵀ, so
A' = (Q_A V_c)ᵀ has orthonormal rows and B' = Q_B U_c Σ, with B'A' = B̄A. The next round trains B against the
new A: its rows are the principal input directions of the update so far (the FedSVD argument: an orthonormal A
keeps DP noise on B from being amplified and adapts A without ever training or sending it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Strategy, Update, validate_updates
from .common import PrefixResult
from .registry import register


def svd_refactor(B: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B', A') with B'A' = B·A, A' rows orthonormal, B' columns orthogonal with decreasing norms.

    A rank r above d_out or d_in leaves k = min(r, d_out, d_in) directions: the slots past k get a zero B
    column and a zero A row (the product is unchanged; no r x d_in matrix has more than d_in orthonormal rows).
    """
    r = A.shape[0]
    Q_B, R_B = np.linalg.qr(B)
    Q_A, R_A = np.linalg.qr(A.T)
    U_c, sigma, Vt_c = np.linalg.svd(R_B @ R_A.T, full_matrices=False)
    B_new, A_new = Q_B @ (U_c * sigma), (Q_A @ Vt_c.T).T
    k = B_new.shape[1]
    if k < r:
        B_new = np.hstack([B_new, np.zeros((B.shape[0], r - k))])
        A_new = np.vstack([A_new, np.zeros((r - k, A.shape[1]))])
    return B_new, A_new


@register("fedsvd")
class FedSVD(Strategy):
    """B̄ = Σ p_k B_k with one common A, then (B', A') = SVD re-factoring of B̄A; exact, linear in what is sent."""

    trains_A = False
    sends_A = False
    receives_A = True
    supports_mixed_ranks = False
    exact = True
    linear = True  # the aggregate is Σ p_k B_k; the re-factoring is post-processing of that sum

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> PrefixResult:
        ups, p, modules = validate_updates(updates, weights, self.name, same_ranks=True)
        res = PrefixResult(method=self.name, fixed_rank=True, sends_A=True, scale_for_rank=self.scale_for_rank)
        for m in modules:
            A = ups[0][m].A
            for k, u in enumerate(ups[1:], start=1):
                if not np.array_equal(u[m].A, A):
                    raise ValueError(f"{self.name}: client {k}, module {m!r}: A differs from client 0's: every "
                                     "client must train B on the A the server sent")
            B_bar = sum(pk * u[m].B for pk, u in zip(p, ups))
            res.B[m], res.A[m] = svd_refactor(B_bar, A)
            res.scale[m] = ups[0][m].scale
            res.seen_scales[m] = {ups[0][m].rank: ups[0][m].scale}
        return res
