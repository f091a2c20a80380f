"""FlexLoRA: exact weighted aggregate, then each client gets its best rank-r approximation (SVD from factors)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .base import (WIRE_BYTES, AggregationResult, LoraFactors, ScaleForRank, Strategy, Update, resolve_scale,
                   scales_by_rank, validate_updates)
from .registry import register


def stacked_factors(factors: Sequence[LoraFactors], p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B_cat, A_cat) = ([p_1 s_1 B_1, …], [A_1; …]) over the clients with p_k > 0: B_cat A_cat = ΔW_g."""
    live = [(pk, f) for pk, f in zip(p, factors) if pk > 0]
    return np.hstack([pk * f.scale * f.B for pk, f in live]), np.vstack([f.A for _, f in live])


def factored_svd(factors: Sequence[LoraFactors], p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (U, σ, V) of ΔW_g = Σ p_k s_k B_k A_k without forming the d_out x d_in matrix.

    B_cat = [p_1 s_1 B_1, …] = Q_B R_B and A_catᵀ = [A_1; …]ᵀ = Q_A R_A, so ΔW_g = Q_B (R_B R_Aᵀ) Q_Aᵀ; the SVD of
    the small core (≤ Σr_k square) rotated back by Q_B, Q_A is the SVD of ΔW_g. Cost O((d_out + d_in) R²).
    """
    B_cat, A_cat = stacked_factors(factors, p)
    Q_B, R_B = np.linalg.qr(B_cat)
    Q_A, R_A = np.linalg.qr(A_cat.T)
    U_c, sigma, Vt_c = np.linalg.svd(R_B @ R_A.T, full_matrices=False)
    return Q_B @ U_c, sigma, Q_A @ Vt_c.T


def right_svd_of_stack(B_cat: np.ndarray, A_cat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(σ, V) of ΔW_g = B_cat A_cat, which is all the server needs: B for a client is ΔW_g V_r / s_r, computed
    from the factors, so U (and Q_B) are never formed; B_cat's QR keeps only R (Q_B has orthonormal columns
    and changes neither σ nor V). While Σr_k < min(d_out, d_in) this goes through the R x R core; from there
    on the core would be as large as ΔW_g itself (measured 1.5-2x slower at d = 384), so ΔW_g is SVD'd."""
    R = B_cat.shape[1]
    if R >= min(B_cat.shape[0], A_cat.shape[1]):
        _, sigma, Vt = np.linalg.svd(B_cat @ A_cat, full_matrices=False)
        return sigma, Vt.T
    R_B = np.linalg.qr(B_cat, mode="r")
    Q_A, R_A = np.linalg.qr(A_cat.T)
    _, sigma, Vt_c = np.linalg.svd(R_B @ R_A.T, full_matrices=False)
    return sigma, Q_A @ Vt_c.T


def dense_svd(factors: Sequence[LoraFactors], p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference way (form ΔW_g densely, full thin SVD): for benchmarks and tests only."""
    delta = sum(pk * f.scale * (f.B @ f.A) for pk, f in zip(p, factors))
    U, sigma, Vt = np.linalg.svd(delta, full_matrices=False)
    return U, sigma, Vt.T


def orthonormal_completion(V: np.ndarray, extra: int, rng: np.random.Generator) -> np.ndarray:
    """`extra` unit columns orthogonal to V's columns and to each other (random, seeded)."""
    G = rng.standard_normal((V.shape[0], extra))
    for _ in range(2):  # project twice: one Gram-Schmidt pass can lose orthogonality
        G -= V @ (V.T @ G)
        G, _ = np.linalg.qr(G)
    return G


@dataclass
class FlexLoRAResult(AggregationResult):
    """ΔW_g = B_cat A_cat = U diag(σ) Vᵀ per module; a rank-r client starts from B = U_r Σ_r / s_r = ΔW_g V_r / s_r
    and A = V_rᵀ. Holds the stacked factors, σ (`singular_values`) and V; U is never needed."""

    B_cat: dict[str, np.ndarray] = field(default_factory=dict)
    A_cat: dict[str, np.ndarray] = field(default_factory=dict)
    singular_values: dict[str, np.ndarray] = field(default_factory=dict)
    V: dict[str, np.ndarray] = field(default_factory=dict)
    seen_scales: dict[str, dict[int, float]] = field(default_factory=dict)
    scale_for_rank: ScaleForRank | None = None
    seed: int = 0

    def effective_delta(self, module: str) -> np.ndarray:
        """The full aggregate ΔW_g (= ΔW*), before any client's truncation."""
        return self.B_cat[module] @ self.A_cat[module]

    def _scaled_left(self, module: str, rank: int) -> np.ndarray:
        """U_r Σ_r = ΔW_g V_r, from the factors (d_out x r)."""
        return self.B_cat[module] @ (self.A_cat[module] @ self.V[module][:, :rank])

    def truncated_delta(self, module: str, rank: int) -> np.ndarray:
        """U_r Σ_r V_rᵀ, what a rank-r client's model starts from."""
        return self._scaled_left(module, rank) @ self.V[module][:, :rank].T

    def truncation_error(self, module: str, rank: int) -> float:
        """‖ΔW_g − U_r Σ_r V_rᵀ‖_F = sqrt(Σ_{i>r} σ_i²) (Eckart–Young)."""
        return math.sqrt(float(np.sum(self.singular_values[module][rank:] ** 2)))

    def _check_rank(self, rank: int) -> None:
        for m, V in self.V.items():
            limit = min(self.B_cat[m].shape[0], V.shape[0])
            if int(rank) != rank or not 1 <= rank <= limit:
                raise ValueError(f"flexlora: module {m!r}: rank must be in 1..{limit}, got {rank!r}")

    def downlink(self, rank: int) -> dict[str, LoraFactors]:
        """Ranks above the number of singular values get extra A rows orthonormal to V (seeded) and zero B
        columns: ΔW is unchanged and, as with a dense SVD's null-space vectors, every slot stays trainable."""
        self._check_rank(rank)
        out = {}
        for m, V in self.V.items():
            s_r = resolve_scale(rank, self.seen_scales[m], self.scale_for_rank, "flexlora")
            k = min(rank, V.shape[1])
            A = V[:, :k].T
            B = self._scaled_left(m, k) / s_r
            if rank > k:
                rng = np.random.default_rng([self.seed, zlib.crc32(m.encode())])
                A = np.vstack([A, orthonormal_completion(V, rank - k, rng).T])
                B = np.hstack([B, np.zeros((B.shape[0], rank - k))])
            out[m] = LoraFactors(A=A.copy(), B=B, scale=s_r)
        return out

    def downlink_nbytes(self, rank: int) -> int:
        self._check_rank(rank)
        return WIRE_BYTES * rank * sum(self.B_cat[m].shape[0] + V.shape[0] for m, V in self.V.items())


@register("flexlora")
class FlexLoRA(Strategy):
    """Server: ΔW_g = Σ p_k s_k B_k A_k, SVD from factors (`right_svd_of_stack`); down: the best rank-r
    approximation. `result.singular_values[module]` holds σ.

    The scale of the receiving client enters B (B = U_r Σ_r / s_r): pass `scale_for_rank` (e.g.
    `lambda r: alpha / r`) to serve ranks absent from the round; otherwise the scale seen for that rank is used.

    Exact: the global ΔW_g (`effective_delta`) is ΔW* before truncation; a rank-r client then starts from its
    best rank-r approximation, off by sqrt(Σ_{i>r} σ_i²) (identity 5).
    """

    exact = True
    linear = False

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> FlexLoRAResult:
        ups, p, modules = validate_updates(updates, weights, self.name)
        res = FlexLoRAResult(scale_for_rank=self.scale_for_rank, seed=self.seed)
        for m in modules:
            B_cat, A_cat = stacked_factors([u[m] for u in ups], p)
            res.B_cat[m], res.A_cat[m] = B_cat, A_cat
            res.singular_values[m], res.V[m] = right_svd_of_stack(B_cat, A_cat)
            res.seen_scales[m] = scales_by_rank(ups, m)
        return res
