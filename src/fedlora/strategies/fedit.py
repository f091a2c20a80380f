"""FedIT: plain weighted averaging of A and B (the inexact baseline; equal ranks only)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import LoraFactors, Strategy, Update, validate_updates
from .common import PrefixResult, at_scale, scale_ratios
from .registry import register


def average_factors(
    updates: Sequence[dict[str, LoraFactors]], p: np.ndarray, module: str
) -> tuple[np.ndarray, np.ndarray]:
    """(Ā, B̄) = (Σ p_k A_k, Σ p_k B̃_k) for one module (equal shapes, validated by the caller), B̃_k = B_k at the
    first client's scale (equal ranks have equal scales, so B̃_k = B_k bit for bit; folded in case they differ)."""
    s = updates[0][module].scale
    A_bar = sum(pk * u[module].A for pk, u in zip(p, updates))
    B_bar = sum(pk * at_scale(u[module], s).B for pk, u in zip(p, updates))
    return A_bar, B_bar


def averaged_result(method: str, updates: Sequence[dict[str, LoraFactors]], p: np.ndarray,
                    modules: Sequence[str], scale_for_rank=None,
                    result_cls: type[PrefixResult] = PrefixResult) -> PrefixResult:
    """The FedIT global adapter (Ā, B̄, s) for every module; FedEx and LoRA-FAIR start from it."""
    res = result_cls(method=method, fixed_rank=True, scale_for_rank=scale_for_rank)
    for m in modules:
        res.A[m], res.B[m] = average_factors(updates, p, m)
        res.scale[m] = updates[0][m].scale
        res.seen_scales[m] = {updates[0][m].rank: updates[0][m].scale}
    return res


@register("fedit")
class FedIT(Strategy):
    """Ā = Σ p_k A_k, B̄ = Σ p_k B_k; global ΔW = s·B̄Ā, which misses Σ p_k (B_k − B̄)(A_k − Ā).

    Not exact (that covariance term is lost); linear in the sent factors.
    """

    supports_mixed_ranks = False
    exact = False
    linear = True

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> PrefixResult:
        ups, p, modules = validate_updates(updates, weights, self.name, same_ranks=True)
        return averaged_result(self.name, ups, p, modules, self.scale_for_rank)

    def contribution_scales(self, ranks: Sequence[int], scales: Sequence[float]) -> list[float]:
        return scale_ratios(ranks, scales)  # all 1 with one rank and one scale rule
