"""LoRA-FAIR: FedIT averaging plus a server-side ridge correction of B towards the exact aggregate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from pydantic import Field

from .base import LoraFactors, Strategy, Update, validate_updates
from .common import PrefixResult
from .fedit import averaged_result
from .registry import Options, register


def b_correction(factors: Sequence[LoraFactors], p: np.ndarray, A_bar: np.ndarray, B_bar: np.ndarray,
                 scale: float, lam: float) -> np.ndarray:
    """ΔB = (ΔW*/s − B̄Ā) Āᵀ (ĀĀᵀ + λI)⁻¹, with ΔW* Āᵀ = Σ p_k s_k B_k (A_k Āᵀ) (never d_out x d_in).

    s is the common scale of the averaged adapter, so s·(B̄ + ΔB)Ā is the corrected update. λ = 0 uses a
    least-squares solve (the pseudo-inverse when ĀĀᵀ is singular).
    """
    target = sum(pk * f.scale * (f.B @ (f.A @ A_bar.T)) for pk, f in zip(p, factors)) / scale
    G = A_bar @ A_bar.T
    rhs = target - B_bar @ G  # (ΔW*/s − B̄Ā) Āᵀ, d_out x r
    if lam > 0:
        return np.linalg.solve(G + lam * np.eye(G.shape[0]), rhs.T).T
    return np.linalg.lstsq(G, rhs.T, rcond=None)[0].T


@dataclass
class LoraFairResult(PrefixResult):
    correction: dict[str, np.ndarray] = field(default_factory=dict)  # ΔB per module


class LoraFairOptions(Options):
    lam: float = Field(0.01, ge=0.0)  # ridge regularisation of the B correction


@register("lora-fair", options=LoraFairOptions)
class LoraFair(Strategy):
    """Down: (Ā, B̄ + ΔB); `result.correction[module]` holds ΔB. Approximate: ΔW* outside Ā's row space is
    unreachable; with λ → 0 the global update tends to ΔW* Ā⁺ Ā (identity 8). Same communication as FedIT.
    Not exact."""

    supports_mixed_ranks = False
    exact = False
    linear = False

    def __init__(self, lam: float = 0.01, scale_for_rank=None, seed: int = 0, initial_factors=None) -> None:
        super().__init__(scale_for_rank=scale_for_rank, seed=seed, initial_factors=initial_factors)
        if not np.isfinite(lam) or lam < 0:
            raise ValueError(f"lora-fair: lam must be finite and >= 0, got {lam}")
        self.lam = float(lam)

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> LoraFairResult:
        ups, p, modules = validate_updates(updates, weights, self.name, same_ranks=True)
        res = averaged_result(self.name, ups, p, modules, self.scale_for_rank, result_cls=LoraFairResult)
        for m in modules:
            dB = b_correction([u[m] for u in ups], p, res.A[m], res.B[m], res.scale[m], self.lam)
            res.correction[m] = dB
            res.B[m] = res.B[m] + dB
        return res
