"""FedEx-LoRA: FedIT averages plus the exact residual merged into every client's base weights."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import LoraFactors, Strategy, Update, validate_updates
from .fedit import averaged_result
from .common import PrefixResult
from .registry import register


def residual_factors(factors: Sequence[LoraFactors], p: np.ndarray, A_bar: np.ndarray,
                     scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Factors (B_res, A_res) of s·(Σ p_k B_k A_k − B̄Ā) with at most (K−1)·r columns.

    Σ p_k (B_k − B̄)(A_k − Ā) = Σ_{k≠K} p_k (B_k − B_K)(A_k − Ā) for any pivot K, because
    Σ_k p_k (A_k − Ā) = 0; zero-weight clients drop out. Pivot = the heaviest client.
    """
    live = [k for k in range(len(factors)) if p[k] > 0]
    K = max(live, key=lambda k: p[k])
    others = [k for k in live if k != K]
    d_out, d_in = factors[0].B.shape[0], factors[0].A.shape[1]
    if not others:
        return np.zeros((d_out, 0)), np.zeros((0, d_in))
    B_res = np.hstack([scale * p[k] * (factors[k].B - factors[K].B) for k in others])
    A_res = np.vstack([factors[k].A - A_bar for k in others])
    return B_res, A_res


@register("fedex")
class FedEx(Strategy):
    """Clients continue from (Ā, B̄); base_delta[m] = s·(Σ p_k B_k A_k − B̄Ā), so base + s·B̄Ā = base + ΔW*.

    Every client, sampled or not, must merge every round's residual (`fedlora.lora.merge_base_delta`,
    respecting fan_in_fan_out). Down: the averaged factors plus the residual factors (K−1)·r wide.
    Exact: the global model (base + residual + s·B̄Ā) moves by ΔW* (identity 4), though the adapter alone does not.
    """

    supports_mixed_ranks = False
    exact = True
    merges_into_base = True
    linear = False

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> PrefixResult:
        ups, p, modules = validate_updates(updates, weights, self.name, same_ranks=True)
        res = averaged_result(self.name, ups, p, modules, self.scale_for_rank)
        for m in modules:
            B_res, A_res = residual_factors([u[m] for u in ups], p, res.A[m], res.scale[m])
            res.base_delta_factors[m] = (B_res, A_res)
            res.base_delta[m] = B_res @ A_res
        return res
