"""Fed-SB (LoRA-SB): B0 and A0 fixed from an initialisation; clients train and send only the r x r core R.

ΔW_k = s·B0·R_k·A0, so the average of the cores is exact: Σ p_k s·B0·R_k·A0 = s·B0·(Σ p_k R_k)·A0, and only
r² values per module travel each way (independent of the layer's width). fedlora holds R inside lora_A as
A = R·A0 (lora.trained_through_core trains R alone), so every reader of an adapter sees ordinary LoRA factors.

Initialisation: data-free and derived from the seed on every client: A0 = the seeded PEFT A with its rows
orthonormalised (QR), B0 = a seeded Gaussian matrix with orthonormal columns, R = 0 (ΔW = 0 at the start).
The paper initialises B0, A0 from an SVD of a first full-gradient estimate on client data; fedlora does not,
so that nothing about any client's data is fixed into the shared factors before training.
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import numpy as np

from .base import LoraFactors, Roles, Strategy, Update, validate_updates
from .common import PrefixResult
from .registry import register


def orthonormal_rows(A: np.ndarray) -> np.ndarray:
    """The rows of A orthonormalised (same row space for a full-rank A), via QR of Aᵀ."""
    Q, R = np.linalg.qr(np.asarray(A, np.float64).T)
    return (Q * np.sign(np.diag(R))).T  # signs fixed so the result is unique


def seeded_B0(seed: int, module: str, d_out: int, rank: int) -> np.ndarray:
    """d_out x rank with orthonormal columns, from (seed, module) alone."""
    rng = np.random.default_rng([seed, zlib.crc32(module.encode()), 0x5B])
    Q, R = np.linalg.qr(rng.normal(size=(d_out, rank)))
    return Q * np.sign(np.diag(R))


@register("fedsb")
class FedSB(Strategy):
    """R̄ = Σ p_k R_k with R_k = A_k·A0ᵀ; global (A, B) = (R̄·A0, B0). Exact, linear in what is sent (R)."""

    supports_mixed_ranks = False
    mixed_ranks_refusal = "its clients share one r x r core"
    sample_dp_refusal = ("its core R is trained through a parametrized lora_A, which Opacus' per-example "
                         "gradients do not support; use privacy.mode=client")
    exact = True
    linear = True

    def __init__(self, scale_for_rank=None, seed: int = 0,
                 initial_factors: Mapping[str, LoraFactors] | None = None) -> None:
        super().__init__(scale_for_rank=scale_for_rank, seed=seed, initial_factors=initial_factors)
        for m, f in self.initial_factors.items():
            if f.rank > min(f.B.shape[0], f.A.shape[1]):
                raise ValueError(f"{self.name}: module {m!r}: rank {f.rank} above min(d_out, d_in) = "
                                 f"{min(f.B.shape[0], f.A.shape[1])}: A0 cannot have that many orthonormal rows")
        self.A0 = {m: orthonormal_rows(f.A) for m, f in self.initial_factors.items()}
        self.B0 = {m: seeded_B0(self.seed, m, f.B.shape[0], f.rank) for m, f in self.initial_factors.items()}

    def roles(self, round_idx: int) -> Roles:
        return Roles(train=("R",), up=("R",), down=("R",))

    def _basis(self, module: str, rank: int) -> tuple[np.ndarray, np.ndarray]:
        if module not in self.A0:
            raise ValueError(f"{self.name}: no fixed factors for module {module!r}: construct fedsb with "
                             "initial_factors= the seeded init (fedlora runs always do)")
        if rank != self.A0[module].shape[0]:
            raise ValueError(f"{self.name}: module {module!r}: rank {rank} differs from the fixed factors' rank "
                             f"{self.A0[module].shape[0]}")
        return self.A0[module], self.B0[module]

    def starting_factors(self, init: Mapping[str, LoraFactors]) -> dict[str, LoraFactors]:
        out = {}
        for m, f in init.items():
            A0, B0 = self._basis(m, f.rank)
            out[m] = LoraFactors(A=np.zeros_like(A0), B=B0.copy(), scale=f.scale)
        return out

    def core_basis(self) -> dict[str, np.ndarray]:
        return dict(self.A0)

    def to_parts(self, module: str, f: LoraFactors, parts: Sequence[str]) -> dict[str, np.ndarray]:
        out = super().to_parts(module, f, [p for p in parts if p != "R"])
        if "R" in parts:
            out["R"] = f.A @ self._basis(module, f.rank)[0].T
        return out

    def from_parts(self, module: str, arrays: Mapping[str, np.ndarray], ref: LoraFactors) -> LoraFactors:
        if "R" not in arrays:
            return super().from_parts(module, arrays, ref)
        A0, B0 = self._basis(module, ref.rank)
        return LoraFactors(A=np.asarray(arrays["R"], np.float64) @ A0, B=B0, scale=ref.scale)

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> PrefixResult:
        ups, p, modules = validate_updates(updates, weights, self.name, same_ranks=True)
        res = PrefixResult(method=self.name, fixed_rank=True, scale_for_rank=self.scale_for_rank)
        for m in modules:
            A0, B0 = self._basis(m, ups[0][m].rank)
            for k, u in enumerate(ups):
                if not np.allclose(u[m].B, B0, rtol=0, atol=1e-6):
                    raise ValueError(f"{self.name}: client {k}, module {m!r}: B is not the fixed B0; only R trains")
            R_bar = sum(pk * (u[m].A @ A0.T) for pk, u in zip(p, ups))
            res.A[m], res.B[m] = R_bar @ A0, B0.copy()
            res.scale[m] = ups[0][m].scale
            res.seen_scales[m] = {ups[0][m].rank: ups[0][m].scale}
        return res
