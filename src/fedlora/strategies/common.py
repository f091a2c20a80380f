"""Building blocks shared by the factor-averaging methods: a result type that serves rank prefixes of one global
adapter, zero-padding, slot-wise averaging, and the memory of slots that no client in a round held."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .base import WIRE_BYTES, AggregationResult, LoraFactors, ScaleForRank, resolve_scale

# (module, lo, hi) -> (A rows lo..hi-1, B columns lo..hi-1): slots beyond what this round aggregated.
Extension = Callable[[str, int, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class PrefixResult(AggregationResult):
    """One global adapter per module, ΔW_g = scale[m] · B[m] @ A[m]; a rank-r client gets its first r slots.

    - `fixed_rank`: only the aggregated rank can be served (FedIT, FedEx, LoRA-FAIR).
    - `rescale_B`: B[m] is expressed at the global scale scale[m]; a rank-r client gets B · scale[m] / s_r so
      that its prefix product s_r·B_r·A_r is the global one (every method that averages B across ranks: FFA,
      zero-padding, HetLoRA, RBLA, FedIT). Otherwise B is handed down as is.
    - `extend`: supplies slots past the aggregated width; without it larger ranks raise ValueError.
    """

    method: str = ""
    A: dict[str, np.ndarray] = field(default_factory=dict)
    B: dict[str, np.ndarray] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    seen_scales: dict[str, dict[int, float]] = field(default_factory=dict)
    scale_for_rank: ScaleForRank | None = None
    fixed_rank: bool = False
    rescale_B: bool = False
    sends_A: bool = True
    extend: Extension | None = None
    slot_weights: dict[str, np.ndarray] = field(default_factory=dict)  # c_j per slot, where meaningful

    @property
    def modules(self) -> list[str]:
        return sorted(self.A)

    def width(self, module: str) -> int:
        """The aggregated rank of `module` (number of slots of the global adapter)."""
        return int(self.A[module].shape[0])

    def effective_delta(self, module: str) -> np.ndarray:
        delta = self.scale[module] * (self.B[module] @ self.A[module])
        if module in self.base_delta:
            delta = delta + self.base_delta[module]
        return delta

    def _check_rank(self, rank: int) -> None:
        if int(rank) != rank or rank < 1:
            raise ValueError(f"{self.method}: rank must be a positive integer, got {rank!r}")
        if self.fixed_rank:
            for m in self.modules:
                if rank != self.width(m):
                    raise ValueError(
                        f"{self.method}: module {m!r} was aggregated at rank {self.width(m)}; "
                        f"cannot serve rank {rank} (no mixed ranks)"
                    )

    def downlink(self, rank: int) -> dict[str, LoraFactors]:
        self._check_rank(rank)
        out: dict[str, LoraFactors] = {}
        for m in self.modules:
            A, B, w = self.A[m], self.B[m], self.width(m)
            if rank > w:
                if self.extend is None:
                    raise ValueError(f"{self.method}: module {m!r} has {w} slots; cannot serve rank {rank}")
                A_ext, B_ext = self.extend(m, w, rank)
                A, B = np.vstack([A, A_ext]), np.hstack([B, B_ext])
            s_r = resolve_scale(rank, self.seen_scales.get(m, {}), self.scale_for_rank, self.method)
            B_r = B[:, :rank] * (self.scale[m] / s_r) if self.rescale_B else B[:, :rank].copy()
            out[m] = LoraFactors(A=A[:rank].copy(), B=B_r, scale=s_r)
        return out

    def downlink_nbytes(self, rank: int) -> int:
        self._check_rank(rank)
        per_slot = sum((self.A[m].shape[1] if self.sends_A else 0) + self.B[m].shape[0] for m in self.modules)
        return WIRE_BYTES * rank * per_slot + self.base_delta_nbytes()


def pad_rows(A: np.ndarray, r: int) -> np.ndarray:
    """A (r_k x d_in) zero-padded to r rows."""
    return np.vstack([A, np.zeros((r - A.shape[0], A.shape[1]))]) if A.shape[0] < r else A


def pad_cols(B: np.ndarray, r: int) -> np.ndarray:
    """B (d_out x r_k) zero-padded to r columns."""
    return np.hstack([B, np.zeros((B.shape[0], r - B.shape[1]))]) if B.shape[1] < r else B


def slot_coverage(ranks: Sequence[int], w: np.ndarray, width: int) -> np.ndarray:
    """c_j = Σ_{k: r_k > j} w_k for j < width: the total weight of the clients that hold slot j."""
    r = np.asarray(ranks)
    return np.array([w[r > j].sum() for j in range(width)])


def slot_sums(factors: Sequence[LoraFactors], w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Σ w_k pad(A_k), Σ w_k pad(B_k), c) over the widest rank: zero-padded weighted sums and slot coverage."""
    width = max(f.rank for f in factors)
    A_sum = sum(wk * pad_rows(f.A, width) for wk, f in zip(w, factors))
    B_sum = sum(wk * pad_cols(f.B, width) for wk, f in zip(w, factors))
    return A_sum, B_sum, slot_coverage([f.rank for f in factors], w, width)


def fresh_A_rows(module: str, lo: int, hi: int, d_in: int, seed: int) -> np.ndarray:
    """Rows lo..hi-1 of a fresh lora_A, uniform in ±1/sqrt(d_in) (PEFT's kaiming-uniform bound), seeded per
    (seed, module, slot) so that the same slot always gets the same row whatever rank asks for it."""
    bound = 1.0 / math.sqrt(d_in)
    key = zlib.crc32(module.encode())
    rows = [np.random.default_rng([seed, key, j]).uniform(-bound, bound, d_in) for j in range(lo, hi)]
    return np.array(rows).reshape(hi - lo, d_in)


class SlotMemory:
    """The last global adapter per module (widest seen), for slots that no weighted client held in a round.

    Why: with zero-padding or slot-wise means, a slot nobody holds would become A-row = 0 and B-column = 0,
    a dead slot (both gradients vanish). It keeps its previous global value instead; a slot never aggregated
    gets a fresh LoRA slot (A row random, B column 0). B is remembered with the scale it was expressed at and
    handed back at the scale asked for (the global scale can change when the widest client is not sampled).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.slots: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.scales: dict[str, float] = {}  # module -> the scale B is expressed at (absent: unknown, as given)

    def _B_at(self, module: str, B: np.ndarray, scale: float | None) -> np.ndarray:
        s_mem = self.scales.get(module)
        return B if scale is None or s_mem is None or s_mem == scale else B * (s_mem / scale)

    def rows(self, module: str, lo: int, hi: int, d_in: int, d_out: int,
             scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(A rows, B columns at `scale`) for slots lo..hi-1: remembered where available, fresh beyond."""
        A_mem, B_mem = self.slots.get(module, (np.zeros((0, d_in)), np.zeros((d_out, 0))))
        known = min(hi, A_mem.shape[0])
        A_parts, B_parts = [A_mem[lo:known]], [self._B_at(module, B_mem[:, lo:known], scale)]
        start = max(lo, known)
        if start < hi:
            A_parts.append(fresh_A_rows(module, start, hi, d_in, self.seed))
            B_parts.append(np.zeros((d_out, hi - start)))
        return np.vstack(A_parts), np.hstack(B_parts)

    def fill_uncovered(self, module: str, A: np.ndarray, B: np.ndarray, covered: np.ndarray,
                       scale: float | None = None) -> None:
        """In place: slots with zero coverage take their remembered (or fresh) value (B at `scale`)."""
        for j in np.flatnonzero(~covered):
            A[j : j + 1], B[:, j : j + 1] = self.rows(module, j, j + 1, A.shape[1], B.shape[0], scale)

    def remember(self, module: str, A: np.ndarray, B: np.ndarray, scale: float | None = None) -> None:
        """New global slots [0, width) replace the old ones; older, wider slots are kept (re-expressed at
        `scale`, the scale of the new B)."""
        A_old, B_old = self.slots.get(module, (A[:0], B[:, :0]))
        w = A.shape[0]
        self.slots[module] = (np.vstack([A, A_old[w:]]), np.hstack([B, self._B_at(module, B_old[:, w:], scale)]))
        if scale is not None:
            self.scales[module] = float(scale)

    def snapshot(self) -> "SlotMemory":
        copy = SlotMemory(self.seed)
        copy.slots = dict(self.slots)  # arrays are replaced, never mutated, after remember()
        copy.scales = dict(self.scales)
        return copy

    def state_dict(self) -> dict:
        return {m: {"A": A.copy(), "B": B.copy(), **({"scale": np.float64(self.scales[m])} if m in self.scales else {})}
                for m, (A, B) in self.slots.items()}

    def load_state_dict(self, state: dict) -> None:
        self.slots = {m: (np.asarray(v["A"], float), np.asarray(v["B"], float)) for m, v in state.items()}
        # Checkpoints written before the scale was kept have none: their B is taken as it is.
        self.scales = {m: float(np.asarray(v["scale"])) for m, v in state.items() if "scale" in v}


def at_scale(f: LoraFactors, scale: float) -> LoraFactors:
    """The same ΔW = s·B·A with B expressed at `scale`: B·s/scale (bit-identical when the scales agree)."""
    return f if f.scale == scale else LoraFactors(A=f.A, B=f.B * (f.scale / scale), scale=scale)


def slotwise_result(
    method: str,
    updates: Sequence[dict[str, LoraFactors]],
    modules: Sequence[str],
    weights_per_module: Callable[[str], np.ndarray],
    per_slot_mean: bool,
    memory: SlotMemory,
    scale_for_rank: ScaleForRank | None,
    result_cls: type[PrefixResult] = PrefixResult,
    shrink_gamma: float = 0.0,
) -> PrefixResult:
    """Shared core of zero-padding, HetLoRA and RBLA.

    What is averaged (one scale for all ranks): A_k as sent, and B̃_k = B_k · s_k / s_g, client k's B expressed at
    the global scale s_g (the widest client's), so s_g·B̃_k·A_k = s_k·B_k·A_k is client k's own ΔW and slot j
    means the same on every client whatever the scale rule (alpha/r, rsLoRA, constant).
    Zero-padding (per_slot_mean=False): slot j = Σ_k w_k pad(X_k)[j], diluted by c_j per factor.
    RBLA (per_slot_mean=True): slot j = Σ_{k: r_k>j} w_k X_k[j] / c_j, undiluted; with shrink_gamma = γ > 0,
    B's slot j is then multiplied by c_j^γ (γ = 1: the product's slot j carries weight c_j, between RBLA's 1 and
    zero-padding's c_j²). Down: a rank-r client gets A_g[:r] and B_g[:, :r]·s_g/s_r (`rescale_B`), so its
    ΔW is s_g·B_g[:, :r]·A_g[:r]. Uncovered slots come from `memory`.
    """
    res = result_cls(method=method, scale_for_rank=scale_for_rank, rescale_B=True)
    for m in modules:
        widest = max(range(len(updates)), key=lambda k: updates[k][m].rank)
        s_g = updates[widest][m].scale
        factors = [at_scale(u[m], s_g) for u in updates]
        w = weights_per_module(m)
        A_g, B_g, c = slot_sums(factors, w)
        covered = c > 0
        if per_slot_mean:
            A_g[covered] /= c[covered, None]
            B_g[:, covered] /= c[covered]
            if shrink_gamma:
                B_g[:, covered] *= c[covered] ** shrink_gamma
        memory.fill_uncovered(m, A_g, B_g, covered, s_g)
        res.A[m], res.B[m], res.scale[m] = A_g, B_g, s_g
        res.seen_scales[m] = {u[m].rank: u[m].scale for u in reversed(updates)}
        res.slot_weights[m] = c
        memory.remember(m, A_g, B_g, s_g)
    snap = memory.snapshot()
    res.extend = lambda m, lo, hi: snap.rows(m, lo, hi, res.A[m].shape[1], res.B[m].shape[0], res.scale[m])
    return res


def scale_ratios(ranks: Sequence[int], scales: Sequence[float]) -> list[float]:
    """s_k / s_g (s_g the widest client's scale): the factor by which client k's B enters the average.
    Client-level DP clips each client's change in these coordinates (see `Strategy.contribution_scales`)."""
    s_g = scales[max(range(len(ranks)), key=lambda k: ranks[k])]
    return [s / s_g for s in scales]
