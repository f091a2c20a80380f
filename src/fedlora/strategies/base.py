"""The contract every aggregation method implements: pure NumPy, no torch, no engine.

ΔW = scale · B · A with A (r x d_in) and B (d_out x r), the PEFT layout (see ALGORITHMS.md).

Wire format for the byte counts (`uplink_nbytes`, `downlink_nbytes`): every transmitted value is a float32,
i.e. `WIRE_BYTES = 4` bytes per value; headers and module names are not counted.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np

Update = Mapping[str, "LoraFactors"]
ScaleForRank = Callable[[int], float]

from .types import PART_NAMES, WIRE_BYTES, LoraFactors, Roles, part_shape, parts_nbytes  # noqa: F401  (re-exported)


@dataclass
class AggregationResult:
    """What a round of aggregation produces.

    - `effective_delta(module)`: the global model's weight relative to the base weights it had before this round
      (adapter delta plus anything merged into the base), d_out x d_in.
    - `downlink(rank)`: the factors a client of that rank starts the next round from ({} for FLoRA).
    - `base_delta`: dense deltas every client merges into its frozen base weights (FLoRA, FedEx).
    - `base_delta_factors`: the same deltas as (B, A) low-rank factors, i.e. what is transmitted.
    - `downlink_nbytes(rank)`: bytes sent to a client of that rank (float32 wire format).
    """

    base_delta: dict[str, np.ndarray] = field(default_factory=dict)
    base_delta_factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def effective_delta(self, module: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def downlink(self, rank: int) -> dict[str, LoraFactors]:  # pragma: no cover - abstract
        raise NotImplementedError

    def downlink_nbytes(self, rank: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def base_delta_nbytes(self) -> int:
        """Bytes of the factored base deltas (sent to every client, sampled or not)."""
        return WIRE_BYTES * sum(B.size + A.size for B, A in self.base_delta_factors.values())


class Strategy(ABC):
    """Base class of every method: subclass it, implement `aggregate`, and `register` it with its options.

    MUST override:
    - `aggregate(updates, weights) -> AggregationResult` (abstract: a class without it cannot be instantiated).

    MAY override (the defaults are correct for a stateless method without client-side rules):
    - the class flags below (each says what the rest of fedlora may assume about the method);
    - `state_dict()` / `load_state_dict(state)`: state kept across rounds; it must survive a checkpoint/resume;
    - `contribution_scales(ranks, scales)`: used by client-level DP (default: factors enter as sent);
    - the client-side hooks, which ClientTrainer calls on every client (no-ops by default):
      `client_penalty` (λ of a penalty on the tail slots [kept_slots(r), r); 0.0 = none; the trainer leaves it
      off under DP-SGD), `kept_slots(rank)`, `tail_norm(A, B)` and `pruned_rank(rank, tail_before, tail_after)`
      (the trainer reads `tail_norm` before and after training and asks `pruned_rank` for the next round's rank
      only when `clients_change_rank`). HetLoRA overrides all four.

    Its user options are a pydantic model registered with it (`register("name", options=MyOptions)`, see
    fedlora.strategies.registry); their validated values reach `__init__` as keyword arguments, beside the
    keyword arguments fedlora passes itself:
    - `scale_for_rank`: callable r -> the LoRA scale a rank-r client uses (e.g. `lambda r: alpha / r`). Used to
      label (and, for FFA and FlexLoRA, to build) the downlink of a rank not present in the round's updates.
      Without it, a rank is served only if seen in the round or if the ranks seen fit one scale law
      unambiguously (see `resolve_scale`); servers should always pass it.
    - `seed`: seeds the few deterministic random fills (fresh A rows for slots no client ever held).
    - `initial_factors`: module -> LoraFactors of the widest rank, the global adapter before round 1 (the
      seeded PEFT init every client derives). FFA takes its shared A from it (so any rank can be served and
      every client's A is checked against it from round 1); zero-padding, HetLoRA and RBLA use it for slots no
      sampled client held yet. The other methods ignore it.
    A subclass's `__init__` accepts these three (pass them on to `super().__init__`).
    """

    name: ClassVar[str] = ""  # set by `register`
    trains_A: ClassVar[bool] = True  # False for FFA: A is frozen and shared
    sends_A: ClassVar[bool] = True  # False for FFA: only B goes up and down
    # Whether A travels down to clients; None: the same as up. FedSVD sends a new A down but only B up.
    receives_A: ClassVar[bool | None] = None
    supports_mixed_ranks: ClassVar[bool] = True
    # Why a method without mixed ranks refuses them (one line, shown by `fedlora run`).
    mixed_ranks_refusal: ClassVar[str] = "it averages A and B element-wise"
    # Why a method cannot train under sample-level DP-SGD (None: it can).
    sample_dp_refusal: ClassVar[str | None] = None
    fresh_lora_each_round: ClassVar[bool] = False  # FLoRA: every round starts from A random, B = 0
    # True when the global model's change this round, `result.effective_delta(m)`, equals the exact aggregate
    # ΔW* = Σ p_k s_k B_k A_k of ALGORITHMS.md (up to float error; for FFA while every A is bit-identical, which
    # FFA checks). Methods that average factors (FedIT, zero-padding, RBLA, LoRA-FAIR) or weight by update norms
    # (HetLoRA) are not exact.
    exact: ClassVar[bool] = False
    # True when results carry `base_delta`s that every client, sampled or not, merges into its frozen base weights
    # each round (FLoRA, FedEx): the base must stay writable (not quantized) and every client must get them.
    merges_into_base: ClassVar[bool] = False
    # True when the aggregate is a slot-wise weighted sum of what clients send with data-independent
    # coefficients: client-level DP noise can then be added to the sum of the sent factors.
    linear: ClassVar[bool] = False
    secure_sum: ClassVar[bool | None] = None  # aggregate = weighted sum of the uploads (SecAgg-ready); None: = linear
    # True when clients may change their own rank between rounds (HetLoRA's self-pruning): the server then
    # accepts an update's `next_rank` in 1..rank; otherwise a client keeps the rank the server assigned.
    clients_change_rank: ClassVar[bool] = False
    # True when slot j of the aggregate is averaged over the clients that hold it (RBLA), not over all of them
    # (zero-padding, FFA): client-level DP then divides each slot's noisy sum by its own expected count.
    per_slot_mean: ClassVar[bool] = False

    def __init__(
        self,
        scale_for_rank: ScaleForRank | None = None,
        seed: int = 0,
        initial_factors: Mapping[str, LoraFactors] | None = None,
    ) -> None:
        self.scale_for_rank = scale_for_rank
        self.seed = int(seed)
        self.initial_factors: dict[str, LoraFactors] = {
            m: _checked_factors(f, None, m, f"{self.name}: initial_factors") for m, f in (initial_factors or {}).items()
        }

    @abstractmethod
    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> AggregationResult:
        """One round: the clients' factors (module -> LoraFactors each) and weights -> the global result."""

    def contribution_scales(self, ranks: Sequence[int], scales: Sequence[float]) -> list[float]:
        """Per client, the factor by which a change in what it sends enters the aggregate's coordinates
        (client-level DP clips and noises there). Default 1: factors are averaged as sent."""
        return [1.0] * len(ranks)

    # -- client-side hooks: called by the trainer on every client, no-ops unless a method overrides them ------
    @property
    def client_penalty(self) -> float:
        """Weight λ of a penalty λ·Σ_modules ‖B[:, k:]‖_F·‖A[k:, :]‖_F (k = `kept_slots(r)`) added to the client's
        loss without DP (HetLoRA). Default 0.0: no penalty, the trainer adds nothing."""
        return 0.0

    def kept_slots(self, rank: int) -> int:
        """Slots [0, k) of a rank-r client are free, [k, r) its penalised tail. Default r: no tail."""
        return rank

    def tail_norm(self, A: np.ndarray, B: np.ndarray) -> float:
        """The tail's size for one module's (A, B), read before and after local training and passed (summed
        over modules) to `pruned_rank`. Default 0.0."""
        return 0.0

    def pruned_rank(self, rank: int, tail_before: float, tail_after: float) -> int:
        """The rank the client uses from the next round (asked only when `clients_change_rank`). Default: the
        same rank."""
        return rank

    @classmethod
    def downlink_A(cls) -> bool:
        """Whether the downlink carries A (else the client already holds it: FFA's seeded A)."""
        return cls.sends_A if cls.receives_A is None else bool(cls.receives_A)

    # -- what moves each round, and how a sent part maps to factors -------------------------------------------
    def roles(self, round_idx: int) -> Roles:
        """What a client trains, sends and receives in round `round_idx` (1-based). Default: from the class
        flags, the same every round. RoLoRA alternates; FedSA keeps B on the client; Fed-SB moves only R."""
        return Roles(train=("A", "B") if self.trains_A else ("B",), up=("A", "B") if self.sends_A else ("B",),
                     down=("A", "B") if self.downlink_A() else ("B",))

    def starting_factors(self, init: Mapping[str, LoraFactors]) -> dict[str, LoraFactors]:
        """The global adapter before round 1, from the seeded PEFT init (A seeded, B = 0). Default: that init."""
        return dict(init)

    def to_parts(self, module: str, f: LoraFactors, parts: Sequence[str]) -> dict[str, np.ndarray]:
        """The arrays of `parts` of one module's factors, as they go on the wire."""
        return {p: {"A": f.A, "B": f.B}[p] for p in parts}

    def from_parts(self, module: str, arrays: Mapping[str, np.ndarray], ref: LoraFactors) -> LoraFactors:
        """Factors from sent parts; every part not sent is the reference's (what the other side already holds)."""
        return LoraFactors(A=arrays["A"] if "A" in arrays else ref.A, B=arrays["B"] if "B" in arrays else ref.B,
                           scale=ref.scale)

    def core_basis(self) -> dict[str, np.ndarray]:
        """module -> the fixed A0 (orthonormal rows) of methods that train only R in A = R·A0 (Fed-SB)."""
        raise NotImplementedError(f"{self.name} does not train an r x r core")

    def uplink_nbytes(self, update: Update, round_idx: int = 1) -> int:
        """Bytes a client sends for `update` in round `round_idx` (float32 wire format)."""
        parts = self.roles(round_idx).up
        return WIRE_BYTES * sum(int(np.prod(part_shape(p, f.rank, f.B.shape[0], f.A.shape[1])))
                                for f in update.values() for p in parts)

    # Strategies with state across rounds override these; the state must survive a checkpoint/resume.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


# The registry's storage: name -> Strategy subclass, name -> options model. Filled and read only through
# fedlora.strategies.registry (register, unregister, get_strategy, ...).
_REGISTRY: dict[str, type[Strategy]] = {}
_OPTIONS: dict[str, type] = {}


def factors_nbytes(factors: LoraFactors, with_A: bool = True) -> int:
    """Wire bytes of one module's factors (float32 per value)."""
    return WIRE_BYTES * (factors.B.size + (factors.A.size if with_A else 0))


# --------------------------------------------------------------------------------------------------------------
# Shared validation and small pure helpers
# --------------------------------------------------------------------------------------------------------------


def normalize_weights(weights: Sequence[float], n: int, method: str = "") -> np.ndarray:
    """Check weights (length n, finite, >= 0, not all zero) and return them summing to 1."""
    where = f"{method}: " if method else ""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != n:
        raise ValueError(f"{where}got {w.size} weights for {n} clients")
    for k, wk in enumerate(w):
        if not np.isfinite(wk) or wk < 0:
            raise ValueError(f"{where}client {k}: weight {wk} must be finite and >= 0")
    total = w.sum()
    if total <= 0:
        raise ValueError(f"{where}all client weights are zero")
    return w / total


def validate_updates(
    updates: Sequence[Update],
    weights: Sequence[float],
    method: str = "",
    same_ranks: bool = False,
) -> tuple[list[dict[str, LoraFactors]], np.ndarray, list[str]]:
    """The one validation every `aggregate` runs.

    Returns (float64 copies of the updates, weights normalised to sum 1, sorted module names). Raises ValueError
    naming the client index and module for: empty updates, bad weights, mismatched module sets, non-2-D or
    inconsistent A/B shapes, d_in/d_out differing between clients, non-finite values or scales, and, when
    `same_ranks`, a rank or scale differing from client 0's.
    """
    where = f"{method}: " if method else ""
    if len(updates) == 0:
        raise ValueError(f"{where}no client updates to aggregate")
    p = normalize_weights(weights, len(updates), method)
    modules = sorted(updates[0].keys())
    if not modules:
        raise ValueError(f"{where}client 0 sent no modules")
    out: list[dict[str, LoraFactors]] = []
    for k, upd in enumerate(updates):
        names = set(upd.keys())
        if names != set(modules):
            missing, extra = sorted(set(modules) - names), sorted(names - set(modules))
            raise ValueError(
                f"{where}client {k}: module set differs from client 0's (missing {missing}, unexpected {extra})"
            )
        out.append({m: _checked_factors(upd[m], k, m, where) for m in modules})
    for m in modules:
        ref = out[0][m]
        for k in range(1, len(out)):
            f = out[k][m]
            if f.A.shape[1] != ref.A.shape[1] or f.B.shape[0] != ref.B.shape[0]:
                raise ValueError(
                    f"{where}client {k}, module {m!r}: d_out x d_in = {f.B.shape[0]} x {f.A.shape[1]} differs "
                    f"from client 0's {ref.B.shape[0]} x {ref.A.shape[1]}"
                )
            if same_ranks and f.rank != ref.rank:
                raise ValueError(
                    f"{where}client {k}, module {m!r}: rank {f.rank} differs from client 0's rank {ref.rank} "
                    f"({method or 'this method'} cannot take mixed ranks)"
                )
            if same_ranks and not math.isclose(f.scale, ref.scale, rel_tol=1e-12):
                raise ValueError(
                    f"{where}client {k}, module {m!r}: scale {f.scale} differs from client 0's {ref.scale} "
                    f"({method or 'this method'} averages factors under one common scale)"
                )
    return out, p, modules


def _checked_factors(f: LoraFactors, k: int | None, m: str, where: str) -> LoraFactors:
    tag = f"{where}client {k}, module {m!r}" if k is not None else f"{where}, module {m!r}"
    if not isinstance(f, LoraFactors):
        raise ValueError(f"{tag}: expected LoraFactors, got {type(f).__name__}")
    A = np.asarray(f.A, dtype=np.float64)
    B = np.asarray(f.B, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"{tag}: A and B must be 2-D, got A{A.shape} B{B.shape}")
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"{tag}: A is {A.shape} (r x d_in) but B is {B.shape} (d_out x r): ranks disagree")
    if A.shape[0] < 1:
        raise ValueError(f"{tag}: rank must be >= 1")
    if not np.isfinite(A).all():
        raise ValueError(f"{tag}: A has non-finite values")
    if not np.isfinite(B).all():
        raise ValueError(f"{tag}: B has non-finite values")
    scale = float(f.scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{tag}: scale {f.scale} must be finite and > 0")
    return LoraFactors(A=A, B=B, scale=scale)


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Σ p_k x_k with p = weights normalised to sum 1 (e.g. the server's non-LoRA tensors, a classifier head)."""
    if len(arrays) == 0:
        raise ValueError("weighted_mean: no arrays")
    p = normalize_weights(weights, len(arrays), "weighted_mean")
    xs = [np.asarray(a, dtype=np.float64) for a in arrays]
    for k, x in enumerate(xs):
        if x.shape != xs[0].shape:
            raise ValueError(f"weighted_mean: client {k}: shape {x.shape} differs from client 0's {xs[0].shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"weighted_mean: client {k}: non-finite values")
    return np.tensordot(p, np.stack(xs), axes=1)


def product_fro_norm(B: np.ndarray, A: np.ndarray) -> float:
    """‖B A‖_F from the r x r Gram matrices, never forming the d_out x d_in product:
    ‖BA‖_F² = trace((BᵀB)(AAᵀ)) = Σ (BᵀB) ∘ (AAᵀ) (both symmetric)."""
    return math.sqrt(max(float(np.sum((B.T @ B) * (A @ A.T))), 0.0))


def resolve_scale(rank: int, seen: Mapping[int, float], scale_for_rank: ScaleForRank | None, method: str) -> float:
    """The scale a rank-`rank` client uses.

    In order: `scale_for_rank(rank)` if given; the scale seen for that rank in the updates; else, when at least
    two distinct ranks were seen and exactly one of the usual laws fits them all (constant, alpha/r as in PEFT,
    alpha/sqrt(r) as in rsLoRA), that law. Anything else raises ValueError asking for `scale_for_rank`.
    """
    if scale_for_rank is not None:
        s = float(scale_for_rank(rank))
        if not math.isfinite(s) or s <= 0:
            raise ValueError(f"{method}: scale_for_rank({rank}) = {s} must be finite and > 0")
        return s
    if rank in seen:
        return seen[rank]
    if len(seen) >= 2:
        laws = [lambda r: 1.0, lambda r: 1.0 / r, lambda r: 1.0 / math.sqrt(r)]
        fits = []
        for law in laws:
            alphas = [s / law(r) for r, s in seen.items()]
            if max(alphas) - min(alphas) <= 1e-9 * max(alphas):
                fits.append(alphas[0] * law(rank))
        if len(fits) == 1:
            return fits[0]
    raise ValueError(
        f"{method}: no scale known for rank {rank} (ranks seen this round: {sorted(seen)}); "
        "construct the strategy with scale_for_rank=lambda r: alpha / r"
    )


def scales_by_rank(updates: Sequence[Mapping[str, LoraFactors]], module: str) -> dict[int, float]:
    """rank -> scale of the first client of that rank in the updates (for one module)."""
    seen: dict[int, float] = {}
    for upd in updates:
        f = upd[module]
        seen.setdefault(f.rank, f.scale)
    return seen
